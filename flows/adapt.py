"""Adaptation flow: LoRA fine-tuning of a pruned checkpoint with distillation from its dense source, merged back
into a plain pruned checkpoint whose record says what was done (``adaptation``) and what it bought (held-out
perplexity before → after). The training itself lives in `bonsai.adapt`; this flow only orders the tasks.
"""

# No `from __future__ import annotations`: Prefect validates the flow's parameters from their annotations, and
# a string annotation "AdaptConfig" would not resolve there (see flows/prune.py).
import json
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from bonsai import __version__
from bonsai.adapt import AdaptConfig, check_adaptable, loss_summary
from bonsai.checkpoint import publish_checkpoint, read_record
from bonsai.errors import BonsaiError
from bonsai.report import original_shapes_from_config, write_report
from bonsai.workdir import WorkDirLock, check_output_dir, check_work_dir
from flows.calibration import calibration_flow
from tasks.adapt_tasks import adapt_merge_task, adapt_perplexity_task, adapt_train_task
from tasks.data_tasks import materialize_model_task, record_source


@flow(name="bonsai-adapt")
def adapt_flow(
    pruned: str,
    out: str,
    config: AdaptConfig,
    data: str | None = None,
    teacher: str | None = None,
    eval_data: str = "self",
    eval_windows: int = 32,
    eval_seq_len: int | None = None,
    eval_batch_size: int = 8,
    work_dir: str | None = None,
    overwrite: bool = False,
    report_dir: str | None = None,
) -> dict:
    """Adapt the pruned checkpoint `pruned` and write the merged result to `out`; returns the `adaptation` entry.

    `data`: training text (default: the calibration source in the pruning record; `self` is text sampled from
    the teacher). `teacher`: the dense model (default: the record's source). `eval_data` / `eval_windows` /
    `eval_seq_len`: held-out windows for perplexity before and after (`self` is teacher text with a seed of its
    own, so never the training text; `eval_windows=0` skips the measurement). `work_dir` (default `OUT.work`)
    keeps windows, training states and the merged checkpoint; running again continues from them.
    """
    cfg = config.validate()
    log = get_run_logger()
    record = check_adaptable(pruned, out)
    if eval_windows < 0 or eval_batch_size < 1 or (eval_seq_len is not None and eval_seq_len < 2):
        raise BonsaiError("eval_windows must be >= 0, eval_batch_size >= 1 and eval_seq_len >= 2")
    work = Path(work_dir or f"{out}.work")
    check_output_dir(out, overwrite=overwrite)
    check_work_dir(work)
    with WorkDirLock(work):  # one run per work directory (re-entrant: the CLI already holds it)
        pruned_ref = materialize_model_task(pruned)
        teacher_source = teacher or record_source(pruned_ref["path"])
        teacher_ref = materialize_model_task(teacher_source)
        if teacher_ref["sha256"] != record.get("source_sha256"):
            log.warning("teacher %s is not the model %s was pruned from (content hash differs)", teacher_source, pruned)
        data = data or record["calibration"]["source"]
        windows = calibration_flow(
            teacher_source, data, cfg.n_windows, cfg.seq_len, cfg.seed, "calibration", str(work / "windows")
        )
        held_out = None
        if eval_windows:
            held_out = calibration_flow(
                teacher_source,
                eval_data,
                eval_windows,
                eval_seq_len or cfg.seq_len,
                cfg.seed,
                "evaluation",
                str(work / "windows"),
            )
        ppl_before = adapt_perplexity_task(pruned_ref, held_out, eval_batch_size, str(work)) if held_out else None

        trained = adapt_train_task(pruned_ref, teacher_ref, windows, cfg.to_dict(), str(work))
        adaptation = {
            "tool": f"bonsai-adapt {__version__}",
            "method": "LoRA (peft) on all linear projections, loss = CE + kl_weight * KL(teacher || student), merged",
            "config": cfg.to_dict(),
            "steps": trained["step"],
            "resumed_from": trained["resumed_from"],
            "train_seconds": trained["train_seconds"],
            "tokens_seen": trained["step"] * cfg.batch_size * cfg.seq_len,
            "teacher": teacher_source,
            "teacher_sha256": teacher_ref["sha256"],
            "pruned_weights_sha256": record["weights_sha256"],
            "data": {
                "source": data,
                "n_windows": windows["n_windows"],
                "seq_len": windows["seq_len"],
                "windows_sha256": windows["sha256"],
            },
            **loss_summary(trained["losses"]),
        }
        merged = adapt_merge_task(pruned_ref, trained, cfg.to_dict(), str(work), adaptation)
        if held_out:
            ppl_after = adapt_perplexity_task(merged, held_out, eval_batch_size, str(work))
            adaptation["eval"] = {
                "data": eval_data,
                "n_windows": held_out["n_windows"],
                "seq_len": held_out["seq_len"],
                "windows_sha256": held_out["sha256"],
                "ppl_before": ppl_before,
                "ppl_after": ppl_after,
            }
        publish_checkpoint(merged["path"], out, {"adaptation": adaptation}, overwrite=overwrite)
        ev = adaptation.get("eval")
        create_markdown_artifact(
            f"### Bonsai adaptation\n\n| key | value |\n|---|---|\n| steps | {adaptation['steps']} |\n"
            f"| training loss | {adaptation['loss_start']:.4f} → {adaptation['loss_end']:.4f} |\n"
            + (f"| held-out ppl | {ev['ppl_before']:.3f} → {ev['ppl_after']:.3f} |\n" if ev else ""),
            key="bonsai-adapt",
            description=f"adaptation of {pruned}",
        )
        if report_dir:
            _write_report(out, report_dir, teacher_ref["path"])
        return adaptation


def _write_report(out: str, report_dir: str, dense_dir: str) -> None:
    dense_config = json.loads((Path(dense_dir) / "config.json").read_text())
    write_report(
        Path(report_dir),
        record=read_record(out),
        eval_metrics=None,
        zeroshot=None,
        speed=None,
        title="Bonsai adaptation report",
        original_shapes=original_shapes_from_config(dense_config),
    )
