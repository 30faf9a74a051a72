"""Prefect tasks that materialise the model and the token windows as files."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from prefect import get_run_logger, task

from bonsai.architectures import PRUNED_TYPES, family_of
from bonsai.artifacts import content_key, record_artifact
from bonsai.checkpoint import is_pruned_checkpoint, load_for_pruning, read_record, sha256_file
from bonsai.data import SELF_SOURCE, load_windows, prepare_windows, save_windows, window_bos
from bonsai.sources import load_tokenizer, model_fingerprint, resolve_model_source
from tasks.prune_tasks import TASK_OPTS, _reuse


@task(**TASK_OPTS)
def materialize_model_task(source: str) -> dict:
    """Resolve a hub id / local dir / GGUF / alias to a local safetensors directory and its content hash."""
    path = resolve_model_source(source)
    family_of(SimpleNamespace(**json.loads((path / "config.json").read_text())))  # unsupported: fail before work
    return {"path": str(path), "sha256": model_fingerprint(path), "source": source}


def _source_digest(source: str) -> str:
    p = Path(source)
    return sha256_file(p) if p.is_file() else source


@task(**TASK_OPTS)
def prepare_windows_task(
    model: dict, source: str, n_windows: int, seq_len: int, seed: int, purpose: str, out_dir: str
) -> dict:
    """Token windows (Parquet) for calibration or evaluation; `self` samples text from `model`."""
    tokenizer = load_tokenizer(Path(model["path"]))
    model_type = json.loads((Path(model["path"]) / "config.json").read_text()).get("model_type")
    bos = window_bos(tokenizer, PRUNED_TYPES.get(model_type, model_type))
    key = content_key(model["sha256"], _source_digest(source), n_windows, seq_len, seed, purpose, f"bos={bos}")
    path = Path(out_dir) / f"{purpose}-{key}.parquet"
    sha = _reuse(path, f"{purpose} windows")
    if sha is None:
        # only self-generated text needs the weights; a text file needs the tokenizer alone
        loaded = load_for_pruning(model["path"], in_memory=False)[0] if source == SELF_SOURCE else None
        if is_pruned_checkpoint(model["path"]) and source == SELF_SOURCE:
            get_run_logger().warning("self-generated %s text comes from the pruned model itself", purpose)
        windows, meta = prepare_windows(
            source, tokenizer, n_windows=n_windows, seq_len=seq_len, seed=seed, purpose=purpose, model=loaded,
            model_type=PRUNED_TYPES.get(model_type, model_type),
        )
        save_windows(path, windows, meta)
        sha = record_artifact(path)
    return {"path": str(path), "sha256": sha, "n_windows": n_windows, "seq_len": seq_len, "source": source,
            "bos_per_window": bool(load_windows(path)[1].get("bos_per_window", False))}


def record_source(path: str) -> str | None:
    """The source model a pruned checkpoint came from (None for an unpruned model): its resolved local path
    when that still exists, else the source as the user gave it."""
    if not is_pruned_checkpoint(path):
        return None
    record = read_record(path)
    local = record.get("source_path")
    return local if local and Path(local).is_dir() else record.get("source_model")
