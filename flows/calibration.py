"""Calibration / evaluation data flow: a model source and a text source → a Parquet table of token windows."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from tasks.data_tasks import materialize_model_task, prepare_windows_task


def model_context_length(model_path: str) -> int:
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    return int(cfg.get("max_position_embeddings") or 2048)


@flow(name="bonsai-calibration")
def calibration_flow(
    model: str,
    source: str = "self",
    n_windows: int = 8,
    seq_len: int = 128,
    seed: int = 0,
    purpose: str = "calibration",
    out_dir: str = "data/windows",
) -> dict:
    """Prepare `n_windows` windows of `seq_len` tokens (0 = the model's full context) from `source`."""
    model_ref = materialize_model_task(model)
    seq_len = seq_len or model_context_length(model_ref["path"])
    return prepare_windows_task(model_ref, source, n_windows, seq_len, seed, purpose, out_dir)
