"""Prefect task: perplexity (and faithfulness to a reference) of a model on stored windows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task

from bonsai.artifacts import write_table
from bonsai.checkpoint import load_for_pruning, write_json_atomic
from bonsai.data import load_windows
from bonsai.evaluate import evaluation_summary, greedy_continuation
from bonsai.zeroshot import run_zeroshot
from tasks.prune_tasks import TASK_OPTS


@task(**TASK_OPTS)
def evaluate_task(
    model: dict, windows: dict, batch_size: int, reference: dict | None = None, json_path: str | None = None
) -> dict:
    """Metrics dict; with `json_path`, the per-window losses go to a Parquet beside where the metrics JSON will
    be written (by the flow, once every metric is in)."""
    loaded, _, _ = load_for_pruning(model["path"], in_memory=False)  # read-only: map, touch only what is used
    ref = load_for_pruning(reference["path"], in_memory=False)[0] if reference else None
    win, win_meta = load_windows(windows["path"])
    summary = evaluation_summary(loaded, win, batch_size=batch_size, reference=ref)
    per_window = summary.pop("per_window")
    metrics = {
        **summary,
        "model": model["source"],
        "model_sha256": model["sha256"],
        "data": windows["source"],
        "windows_sha256": windows["sha256"],
        "bos_per_window": bool(win_meta.get("bos_per_window", False)),
        "reference": reference["source"] if reference else None,
    }
    if json_path:
        out = Path(json_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_table(
            pd.DataFrame({"window": range(len(per_window)), "nll": per_window}),
            out.with_suffix(".windows.parquet"),
        )
    return metrics


def write_metrics(json_path: str, metrics: dict) -> None:
    """The metrics JSON, atomically."""
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_path, metrics)


@task(**TASK_OPTS)
def zeroshot_task(model: dict, tasks: list[str], data_dir: str | None, limit: int | None, batch_size: int) -> dict:
    """Zero-shot accuracy through lm-eval: offline task configs over `data_dir`, or the stock tasks (hub)."""
    loaded, tokenizer, _ = load_for_pruning(model["path"], in_memory=False)
    return run_zeroshot(
        loaded, tokenizer, tasks, data_dir=Path(data_dir) if data_dir else None, limit=limit, batch_size=batch_size
    )


@task(**TASK_OPTS)
def continuation_task(model: dict, prompt: str, max_new_tokens: int) -> str:
    """The model's greedy continuation of `prompt`."""
    loaded, tokenizer, _ = load_for_pruning(model["path"], in_memory=False)
    return greedy_continuation(loaded, tokenizer, prompt, max_new_tokens)
