"""Prefect tasks of post-pruning adaptation: train LoRA adapters (resumable), merge them, measure perplexity.

Like every task here they take and return paths, content hashes and scalars, never tensors. The training state
lives under ``<work>/train-<key>``, the key naming everything the trajectory depends on (pruned weights, teacher,
training windows, knobs except the step count), so a rerun with more steps continues the same run and a changed
knob starts a new one beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import get_run_logger, task

from bonsai.adapt import AdaptConfig, attach_lora, load_state, merge_adapter, train_adapter
from bonsai.artifacts import content_key, record_artifact
from bonsai.checkpoint import load_for_pruning, read_record, save_pruned, write_json_atomic
from bonsai.data import load_windows
from bonsai.evaluate import perplexity
from tasks.prune_tasks import TASK_OPTS, _reuse


def _run_key(pruned: dict, teacher: dict, windows: dict, cfg: AdaptConfig) -> str:
    return content_key(pruned["sha256"], teacher["sha256"], windows["sha256"], cfg.trajectory())


@task(**TASK_OPTS)
def adapt_train_task(pruned: dict, teacher: dict, windows: dict, config: dict, work_dir: str) -> dict:
    """Train (or continue training) the adapters to `config["steps"]`; returns the final state's directory, the
    step it resumed from and the per-step losses."""
    cfg = AdaptConfig(**config).validate()
    key = _run_key(pruned, teacher, windows, cfg)
    state_dir = Path(work_dir) / f"train-{key}"
    student = attach_lora(load_for_pruning(pruned["path"])[0], cfg)
    teacher_model = load_for_pruning(teacher["path"])[0]
    started = time.perf_counter()
    result = train_adapter(student, teacher_model, load_windows(windows["path"])[0], cfg, state_dir)
    if result["resumed_from"]:
        get_run_logger().info(
            "adaptation resumed at step %d of %d from %s", result["resumed_from"], cfg.steps, state_dir
        )
    return {**result, "key": key, "train_seconds": time.perf_counter() - started}


@task(**TASK_OPTS)
def adapt_merge_task(pruned: dict, trained: dict, config: dict, work_dir: str, adaptation: dict) -> dict:
    """The adapters of the final state merged into the pruned weights, saved as a plain pruned checkpoint whose
    record carries `adaptation`."""
    cfg = AdaptConfig(**config).validate()
    path = Path(work_dir) / f"merged-{trained['key']}-{trained['step']:08d}"
    sha = _reuse(path, "merged checkpoint")
    if sha is None:
        model, tokenizer, _ = load_for_pruning(pruned["path"])
        student = attach_lora(model, cfg)
        load_state(trained["state"], student)
        save_pruned(merge_adapter(student), tokenizer, path, {**read_record(pruned["path"]), "adaptation": adaptation})
        sha = record_artifact(path)
    return {"path": str(path), "sha256": sha}


@task(**TASK_OPTS)
def adapt_perplexity_task(model: dict, windows: dict, batch_size: int, work_dir: str) -> float:
    """Perplexity of a model on stored windows, kept in the work directory so a resumed run does not redo it."""
    path = Path(work_dir) / f"ppl-{content_key(model['sha256'], windows['sha256'], batch_size)}.json"
    if path.is_file():
        return float(json.loads(path.read_text())["ppl"])
    ppl = perplexity(load_for_pruning(model["path"])[0], load_windows(windows["path"])[0], batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"ppl": ppl, "model_sha256": model["sha256"], "windows_sha256": windows["sha256"]})
    return ppl
