"""Write and read pruned checkpoints that load like any Hugging Face model.

A pruned directory holds `model.safetensors`, the tokenizer, `config.json` (model type `bonsai_<family>`, the
per-layer shapes in `bonsai_layers`, an `auto_map` to the two code files shipped beside it), those code files,
and `pruning_record.json` (what was done, with which data, and which original units were kept). So
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works in a process that has only
transformers, and `load_pruned_model` works without remote code. Directories are written under a temporary
name and renamed into place, so a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from bonsai.architectures import family_of, layer_shapes
from bonsai.errors import BonsaiError
from bonsai.memory import release_free_memory
from bonsai.workdir import check_output_dir

REMOTE_DIR = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_bonsai.py", "modeling_bonsai.py")
RECORD_FILE = "pruning_record.json"
WEIGHTS_FILE = "model.safetensors"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename a finished temp directory to `out`; an existing `out` is swapped out first, then removed."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def pruned_config_dict(model: nn.Module) -> dict[str, Any]:
    family = family_of(model.config)
    cfg = model.config.to_dict()
    for key in ("auto_map", "_name_or_path", "transformers_version"):
        cfg.pop(key, None)
    cfg.update(
        model_type=f"bonsai_{family.model_type}",
        architectures=[family.model_class],
        auto_map={
            "AutoConfig": f"configuration_bonsai.{family.config_class}",
            "AutoModelForCausalLM": f"modeling_bonsai.{family.model_class}",
        },
        bonsai_layers=layer_shapes(model),
        bonsai={"format_version": 1, "record": RECORD_FILE},
    )
    return cfg


def save_pruned(
    model: nn.Module, tokenizer, out_dir: str | Path, record: dict[str, Any], *, overwrite: bool = False
) -> Path:
    """Write a loadable pruned checkpoint atomically (temp dir, then rename)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BonsaiError(f"output directory {out} exists and is not empty; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "config.json", pruned_config_dict(model))
        for name in REMOTE_FILES:
            shutil.copyfile(REMOTE_DIR / name, tmp / name)
        weights = tmp / WEIGHTS_FILE
        full_record = {**record, "weights_sha256": sha256_file(weights), "layer_shapes": layer_shapes(model)}
        write_json_atomic(tmp / RECORD_FILE, full_record)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_pruned_checkpoint(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and "bonsai_layers" in json.loads(cfg.read_text())


def read_record(path: str | Path) -> dict[str, Any]:
    p = Path(path) / RECORD_FILE
    if not p.is_file():
        raise BonsaiError(f"{path} has no {RECORD_FILE}; not a Bonsai-pruned checkpoint")
    return json.loads(p.read_text())


def register_auto_classes() -> None:
    """Make `Auto*` classes know the `bonsai_<family>` types in this process, so pruned checkpoints (and their
    tokenizers, and tools such as lm-eval) load here without executing the checkpoint's copy of the code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bonsai.architectures import FAMILIES
    from bonsai.remote import configuration_bonsai, modeling_bonsai

    for family in FAMILIES.values():
        config_cls = getattr(configuration_bonsai, family.config_class)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, getattr(modeling_bonsai, family.model_class), exist_ok=True)


register_auto_classes()


def load_pruned_model(path: str | Path, *, dtype: torch.dtype = torch.float32, in_memory: bool = False) -> nn.Module:
    """Load a pruned checkpoint with this package's copy of the model code (no remote code executed);
    ``in_memory``: read the weights instead of memory-mapping them (see `bonsai.sources.load_model_and_tokenizer`)."""
    from bonsai.remote import configuration_bonsai, modeling_bonsai

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    family = family_of(SimpleNamespace(model_type=cfg.get("model_type")))
    config_cls = getattr(configuration_bonsai, family.config_class)
    model_cls = getattr(modeling_bonsai, family.model_class)
    config = config_cls.from_pretrained(path)
    model = model_cls.from_pretrained(path, config=config, dtype=dtype, disable_mmap=in_memory)
    return model.eval()


def load_for_pruning(path: str | Path, *, dtype: torch.dtype = torch.float32, in_memory: bool = True):
    """(model, tokenizer, kept) for a source model or a pruned checkpoint; `kept` lists, per kind and layer,
    the original indices of the units still present. By default the weights are read into memory, not mapped:
    shrinking slices them into fresh tensors, and a mapping would stay resident behind the unsliced embedding.
    Read-only users (evaluation) pass ``in_memory=False``: a mapped model costs only the pages it touches."""
    from transformers import AutoTokenizer

    from bonsai.sources import load_model_and_tokenizer
    from bonsai.units import full_kept

    release_free_memory()  # the previous round's model was just freed: hand its pages back before reading the next
    path = Path(path)
    if is_pruned_checkpoint(path):
        model = load_pruned_model(path, dtype=dtype, in_memory=in_memory)
        tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
        return model, tokenizer, read_record(path)["kept_units"]
    model, tokenizer = load_model_and_tokenizer(path, dtype=dtype, in_memory=in_memory)
    family_of(model.config)
    return model, tokenizer, full_kept(model)


def publish_checkpoint(
    src: str | Path, out_dir: str | Path, record_updates: dict[str, Any], *, overwrite: bool = False
) -> Path:
    """Copy a finished round checkpoint to the user's output directory with the final record, atomically."""
    src, out = Path(src), Path(out_dir)
    check_output_dir(out, overwrite=overwrite)  # never replaces a directory holding files this tool did not write
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp)
        write_json_atomic(tmp / RECORD_FILE, {**read_record(src), **record_updates})
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
