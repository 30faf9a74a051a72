"""Evaluation flow: perplexity of a model on held-out windows, with KL / top-1 agreement to a reference."""

from __future__ import annotations

from prefect import flow

from bonsai.sources import cache_root
from flows.calibration import calibration_flow
from tasks.data_tasks import materialize_model_task, record_source
from tasks.eval_tasks import continuation_task, evaluate_task, write_metrics, zeroshot_task


@flow(name="bonsai-evaluate")
def evaluation_flow(
    model: str,
    data: str = "self",
    n_windows: int = 32,
    seq_len: int = 256,
    seed: int = 0,
    reference: str | None = None,
    batch_size: int = 8,
    json_path: str | None = None,
    windows_dir: str | None = None,
    zeroshot_tasks: list[str] | None = None,
    zeroshot_dir: str | None = None,
    zeroshot_limit: int | None = None,
) -> dict:
    """Evaluate `model` on `n_windows` non-overlapping windows of `data`.

    `data="self"` is text sampled from the dense model (the reference, else the pruned model's recorded source),
    with a seed different from calibration's, so it is held out. `zeroshot_tasks` adds lm-eval accuracies
    (`zeroshot_dir`: local task files, e.g. ../shared/assets/zeroshot; without it the stock tasks need the hub).
    """
    model_ref = materialize_model_task(model)
    ref_ref = materialize_model_task(reference) if reference else None
    text_model = reference or (record_source(model_ref["path"]) if data == "self" else None) or model
    windows = calibration_flow(
        text_model, data, n_windows, seq_len, seed, "evaluation", windows_dir or str(cache_root() / "windows")
    )
    metrics = evaluate_task(model_ref, windows, batch_size, ref_ref, json_path)
    if zeroshot_tasks:
        metrics["zeroshot"] = zeroshot_task(model_ref, zeroshot_tasks, zeroshot_dir, zeroshot_limit, batch_size)
    if json_path:
        write_metrics(json_path, metrics)
    return metrics


GENERATION_PROMPT = "Once upon a time,"


@flow(name="bonsai-heldout-report")
def heldout_report_flow(
    pruned: str,
    dense: str,
    data: str = "self",
    n_windows: int = 16,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    prompt: str = GENERATION_PROMPT,
    max_new_tokens: int = 32,
) -> dict:
    """What a prune cost on text it never saw: perplexity of the dense and the pruned model on the same held-out
    windows (self-generated with the evaluation seed unless `data` names text), KL / top-1 agreement of the pruned
    model to the dense one, and both models' greedy continuation of `prompt`."""
    metrics = evaluation_flow(pruned, data=data, n_windows=n_windows, seq_len=seq_len, seed=seed, reference=dense,
                              batch_size=batch_size)
    dense_ref, pruned_ref = materialize_model_task(dense), materialize_model_task(pruned)
    return {
        "data": data,
        "n_windows": metrics["n_windows"],
        "seq_len": metrics["seq_len"],
        "dense_ppl": metrics["reference_ppl"],
        "pruned_ppl": metrics["ppl"],
        "kl": metrics["kl"],
        "top1_agreement": metrics["top1_agreement"],
        "prompt": prompt,
        "dense_continuation": continuation_task(dense_ref, prompt, max_new_tokens),
        "pruned_continuation": continuation_task(pruned_ref, prompt, max_new_tokens),
    }
