"""The Bonsai pruning loop — the only place it lives. CLI, DVC stages and deployments all run this flow.

prior statistics → antithetic sub-model masks → evaluation shards → importance regression → selection + shrink,
repeated until the target sparsity. Every step writes an artifact named by its inputs under the work directory,
so running the same command again after a crash reuses every finished shard and round.
"""

# No `from __future__ import annotations` in this module: `prune_flow.serve(...)` (deploy/serve.py) pickles the flow
# function by value into each run's process, and a string annotation "PruneConfig" then fails to resolve in
# Prefect's parameter validation ("`Prune_FlowModel` is not fully defined").
import contextlib
import math
import os
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm.auto import tqdm

from bonsai import __version__
from bonsai.artifacts import content_key
from bonsai.checkpoint import publish_checkpoint
from bonsai.config import METHOD_KNOBS, SHARED_METHOD_KNOBS, PruneConfig
from bonsai.errors import BonsaiError
from bonsai.selection import check_reachable, round_budget
from bonsai.workdir import WorkDirLock, check_output_dir, check_work_dir
from flows.calibration import calibration_flow
from tasks.data_tasks import materialize_model_task
from tasks.method_tasks import one_shot_summary, one_shot_task
from tasks.prune_tasks import evaluate_shard_task, prior_task, regression_task, sample_task, shrink_task

SPARSITY_TOLERANCE = 0.005  # the realised sparsity must land within ±0.5 points of the target


def _round_markdown(r: int, summary: dict, n0: int) -> str:
    sparsity = 1 - summary["non_embedding_params"] / n0
    return (
        f"### Bonsai round {r}\n\n| sparsity | calibration ppl | attention groups removed | MLP channels removed |\n"
        f"|---|---|---|---|\n| {sparsity:.2%} | {math.exp(summary['calib_nll']):.3f} | "
        f"{summary['removed_attn_groups']} | {summary['removed_mlp_channels']} |\n"
    )


@flow(name="bonsai-prune", task_runner=ThreadPoolTaskRunner(max_workers=1))
def prune_flow(config: PruneConfig, out: str, work_dir: str | None = None, overwrite: bool = False) -> dict:
    """Prune `config.model` to `config.sparsity` and write a loadable checkpoint to `out`."""
    cfg = config.validate()
    work = Path(work_dir or f"{out}.work")
    check_output_dir(out, overwrite=overwrite)
    check_work_dir(work)
    with WorkDirLock(work):  # one run per work directory (re-entrant: the CLI already holds it)
        return _prune(cfg, out, work, overwrite)


def _prune(cfg: PruneConfig, out: str, work: Path, overwrite: bool) -> dict:
    log = get_run_logger()
    started = time.time()
    model_ref = materialize_model_task(cfg.model)
    windows = calibration_flow(
        cfg.model,
        cfg.calib,
        cfg.calib_windows,
        cfg.calib_seq_len,
        cfg.seed,
        "calibration",
        str(work / "windows"),
    )
    # where shards run never changes a result, so it is not part of any artifact's key
    placement = ("workers", "scheduler")
    knobs = {
        k: v for k, v in cfg.to_dict().items() if k not in ("model", "sparsity", *placement, "calib", *METHOD_KNOBS)
    }
    base_record = {
        "tool": f"bonsai-prune {__version__}",
        "method": cfg.method,
        "preset": cfg.preset,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "source_model": cfg.model,
        "source_path": model_ref["path"],  # resolved local dir: how evaluation finds the dense source later
        "source_sha256": model_ref["sha256"],
        "calibration": {
            "source": cfg.calib,
            "n_windows": windows["n_windows"],
            "seq_len": windows["seq_len"],
            "seed": cfg.seed,
            "windows_sha256": windows["sha256"],
            "bos_per_window": windows["bos_per_window"],
        },
    }
    if cfg.method != "bonsai":  # a one-shot method (bonsai/methods/): one task, the same checkpoint and summary
        return _one_shot(cfg, out, work, overwrite, model_ref, windows, base_record, started)
    ckpt, rounds, n0, tol, removed = model_ref, [], None, 0.0, 0
    forward_tokens, computed_tokens, calib_nll_before = 0, 0, None
    n_shards = math.ceil(cfg.n_samples / cfg.shard_size)
    max_rounds = math.ceil(cfg.sparsity / cfg.p_iter) + 3
    bar = tqdm(total=math.ceil(cfg.sparsity / cfg.p_iter), desc="bonsai rounds", unit="round")
    for r in range(max_rounds):
        if n0 is not None and round(cfg.sparsity * n0) - removed <= tol:
            break
        # this round's share of the current model: p_iter of the original size, clipped at the target
        p_round = (
            min(cfg.p_iter, cfg.sparsity)
            if n0 is None
            else round_budget(n0, removed, cfg.sparsity, cfg.p_iter, r) / rounds[-1]["non_embedding_params"]
        )
        round_dir = str(work / f"round_{r:02d}-{content_key(ckpt['sha256'], windows['sha256'], knobs, r, p_round)}")
        seed_r = cfg.seed * 1000 + r
        prior_ref = prior_task(
            ckpt, windows, cfg.prior, p_round, cfg.eval_batch_size, seed_r, round_dir, cfg.sample_windows
        )
        if n0 is None:
            n0, calib_nll_before = prior_ref["non_embedding_params"], prior_ref["scored_nll"]
            total_before = prior_ref["total_params"]
            # stop once within 0.1 pt of the target (or half the cheapest unit, if that is coarser; with a channel
            # multiple the MLP goes in blocks of that many channels): a further round of sub-model evaluations to
            # move a few channels is not worth its forward passes
            tol = max(prior_ref["min_unit_cost"] * cfg.channel_multiple / 2, 0.001 * n0)
            check_reachable(prior_ref["removable_params"], 0, n0, cfg.sparsity)
        budget = round_budget(n0, removed, cfg.sparsity, cfg.p_iter, r)
        masks_ref = sample_task(prior_ref, p_round, cfg.n_samples, seed_r, round_dir, cfg.module_share)
        futures = [
            evaluate_shard_task.submit(
                ckpt,
                windows,
                masks_ref,
                k,
                k * cfg.shard_size,
                min(cfg.n_samples, (k + 1) * cfg.shard_size),
                cfg.utility,
                cfg.eval_batch_size,
                round_dir,
                cfg.sample_windows,
            )
            for k in range(n_shards)
        ]
        shard_refs = [f.result() for f in futures]
        reused = sum(s["reused"] for s in shard_refs)
        log.info("round %d: %d of %d shards reused", r, reused, n_shards)
        importance_ref = regression_task(
            prior_ref, masks_ref, shard_refs, cfg.regression, cfg.cv_folds, seed_r, round_dir
        )
        record = {**base_record, "round": r, "rounds": rounds}
        new_ckpt = shrink_task(
            ckpt,
            importance_ref,
            budget,
            windows,
            cfg.eval_batch_size,
            round_dir,
            record,
            cfg.channel_multiple,
            cfg.compensation,
            cfg.refit_damping,
            cfg.sample_windows,
        )
        summary = new_ckpt["round_summary"]
        if summary["non_embedding_params"] >= prior_ref["non_embedding_params"]:
            raise BonsaiError(f"round {r} removed nothing (budget {budget:,} parameters); lower p_iter or the target")
        ckpt, rounds = new_ckpt, new_ckpt["rounds"]
        removed = n0 - summary["non_embedding_params"]
        # prior pass over every calibration window, sub-models over the first `sample_windows`, compensation
        # statistics and the check pass (shrink)
        step_tokens = [(s["tokens"], s["reused"]) for s in shard_refs]
        step_tokens += [(prior_ref["tokens"], prior_ref["reused"]), (summary["tokens"], new_ckpt["reused"])]
        forward_tokens += sum(t for t, _ in step_tokens)
        computed_tokens += sum(t for t, was_reused in step_tokens if not was_reused)
        create_markdown_artifact(
            _round_markdown(r, summary, n0), key=f"bonsai-round-{r}", description=f"Bonsai round {r}"
        )
        bar.update(1)
        bar.set_postfix(sparsity=f"{removed / n0:.3f}", ppl=f"{math.exp(summary['calib_nll']):.2f}")
    bar.close()
    if n0 is None:
        raise BonsaiError("no pruning round ran")
    realised = removed / n0
    if abs(realised - cfg.sparsity) > SPARSITY_TOLERANCE:
        raise BonsaiError(f"realised sparsity {realised:.4f} misses the target {cfg.sparsity} by more than 0.5 points")
    final = rounds[-1]
    summary = {
        "out": str(out),
        "source_model": cfg.model,
        "target_sparsity": cfg.sparsity,
        "sparsity": realised,
        "non_embedding_params_before": n0,
        "non_embedding_params_after": final["non_embedding_params"],
        "total_params_before": total_before,
        "total_params_after": final["total_params"],
        "total_sparsity": 1 - final["total_params"] / total_before,
        "calib_ppl_before": math.exp(calib_nll_before),
        "calib_ppl_after": math.exp(final["calib_nll"]),
        "rounds": len(rounds),
        "forward_tokens": forward_tokens,  # of the whole prune, whether this invocation computed them or reused
        "forward_tokens_computed": computed_tokens,  # by this invocation (a resume reuses finished steps)
        "wall_seconds": time.time() - started,
    }
    return _publish(ckpt["path"], out, summary, "Bonsai", overwrite)


def _one_shot(cfg, out, work, overwrite, model_ref, windows, base_record, started) -> dict:
    method_knobs = {
        k: getattr(cfg, k) for k in (*METHOD_KNOBS, *SHARED_METHOD_KNOBS, "sparsity", "seed", "eval_batch_size")
    }
    method_dir = work / f"{cfg.method}-{content_key(model_ref['sha256'], windows['sha256'], method_knobs)}"
    ckpt = one_shot_task(model_ref, windows, cfg.to_dict(), str(method_dir), base_record)
    summary = one_shot_summary(ckpt, cfg.sparsity, cfg.model, out, started)
    return _publish(ckpt["path"], out, summary, cfg.method, overwrite)


def _publish(checkpoint: str, out: str, summary: dict, method: str, overwrite: bool) -> dict:
    """The finished checkpoint to `out` with its summary in the record, and the summary as a Prefect artifact."""
    publish_checkpoint(checkpoint, out, {"summary": summary}, overwrite=overwrite)
    table = "".join(f"| {k} | {v} |\n" for k, v in summary.items())
    create_markdown_artifact(
        f"### {method} summary\n\n| key | value |\n|---|---|\n{table}",
        key="bonsai-summary",
        description=f"{method} prune summary",
    )
    return summary


def shard_runner(cfg: PruneConfig):
    """Where the evaluation shards run: in-process for one worker, else on Dask.

    One worker keeps the thread runner (one shard at a time, torch uses every core; no cluster start-up).
    Several workers are Dask worker *processes* with one thread each: a sub-model evaluation alters the model it
    runs on (hooks, or sliced modules swapped in), so each worker process holds its own model replica (loaded
    once, `_checkpoint`), and one torch thread per worker keeps N workers from oversubscribing N cores. A
    scheduler address sends the shards to that cluster's workers (started e.g. `dask worker ADDR --nworkers N
    --nthreads 1`); `workers` is then unused.
    """
    if cfg.scheduler is None and cfg.workers == 1:
        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    if cfg.scheduler is not None:
        return DaskTaskRunner(address=cfg.scheduler)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": cfg.workers,
            "threads_per_worker": 1,
            "processes": True,
            # no web UI; the scheduler's own HTTP endpoint (health, metrics) cannot be turned off, so it takes a free
            # loopback port instead of Dask's default 8787 (which `None` means)
            "dashboard_address": "127.0.0.1:0",
            "scheduler_kwargs": {"dashboard": False},
        },
    )


def _one_api_for_workers():
    """Dask workers run their tasks under this process's Prefect settings (prefect-dask ships the settings
    context), but with no `PREFECT_API_URL` each worker would start a temporary API of its own (seconds each, and
    their task runs and logs would land in databases nobody sees). Start this process's temporary API now (the
    flow would start the same one) and name it in the settings, so every worker reports to it."""
    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return contextlib.nullcontext()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return temporary_settings({PREFECT_API_URL: server.api_url})


def run_prune(cfg: PruneConfig, out: str, work_dir: str | None = None, overwrite: bool = False) -> dict:
    """Run the flow with its shards on the runner `shard_runner` picks for the config."""
    runner = shard_runner(cfg.validate())
    if isinstance(runner, ThreadPoolTaskRunner):
        return prune_flow.with_options(task_runner=runner)(cfg, out, work_dir=work_dir, overwrite=overwrite)
    # shard tasks find the checkpoint, windows and masks by path: a Dask worker need not share this process's
    # working directory, so the work directory goes to them as an absolute path
    work_dir = os.path.abspath(work_dir or f"{out}.work")
    with _one_api_for_workers():
        return prune_flow.with_options(task_runner=runner)(cfg, out, work_dir=work_dir, overwrite=overwrite)
