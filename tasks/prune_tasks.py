"""Prefect tasks of one Bonsai round. Thin wrappers over `bonsai` functions.

Each task reads its inputs from files, writes one artifact (Parquet table or checkpoint directory) under a name
derived from its inputs, and returns a small dict: `path`, `sha256` and a few scalars. Tensors never travel
between tasks. A task whose artifact already exists intact (size + hash check) returns it without recomputing,
which is what makes an interrupted prune resumable shard by shard.
"""

from __future__ import annotations

import threading
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from bonsai.architectures import non_embedding_params, total_params
from bonsai.artifacts import discard, read_table, record_artifact, verified_sha, write_table
from bonsai.checkpoint import load_for_pruning, read_record, save_pruned
from bonsai.compensation import compensate_and_shrink
from bonsai.data import load_windows
from bonsai.evaluate import kl_to_reference, mean_nll, reference_log_probs, window_nll
from bonsai.masking import SLICE_MIN_DROP, UnitMasker, dropped_share, sliced_submodel
from bonsai.memory import cap_heap_growth
from bonsai.prior import collect_activation_stats, massive_units, unit_prior
from bonsai.regression import estimate_importance
from bonsai.sampling import candidate_mask, sample_masks
from bonsai.selection import removable_params, select_removals
from bonsai.units import ATTN, MLP, unit_table

TASK_OPTS = dict(cache_policy=NO_CACHE, persist_result=False)


def _reuse(path: Path, what: str) -> str | None:
    """sha256 of an intact finished artifact, else None (and any partial leftover is removed)."""
    sha = verified_sha(path)
    if sha is not None:
        get_run_logger().info("reused %s: %s", what, path)
        return sha
    if path.exists():
        aside = discard(path)
        get_run_logger().warning("recomputing %s: %s is incomplete or corrupt (set aside as %s)", what, path,
                                 aside.name)
    return None


# A masked evaluation hooks into the process's one cached model: shards that share a process (a Dask worker with
# several threads) take turns on it.
_MODEL_LOCK = threading.Lock()


def _match_dask_threads() -> None:
    """Inside a Dask worker process, torch gets as many threads as the worker has (1 for the local clusters of
    `flows.prune.shard_runner`): N single-thread workers on N cores must not each start a core-wide pool."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except ValueError:  # not running in a Dask worker: the process's own torch setting stands
        return
    torch.set_num_threads(worker.state.nthreads)
    cap_heap_growth()  # the worker process runs its own forward passes (bonsai/memory.py)


@lru_cache(maxsize=1)
def _checkpoint(path: str, sha: str):
    """The model of a checkpoint, loaded once per process (keyed by content hash, never passed between tasks)."""
    return load_for_pruning(path)


def _take_checkpoint(path: str, sha: str):
    """The cached model of a checkpoint, handed over to be modified in place: the cache forgets it, so no later
    task sees the modified weights under the old hash, and the process never holds a second copy (peak memory:
    one model, not two, while a round shrinks)."""
    with _MODEL_LOCK:
        loaded = _checkpoint(path, sha)
        _checkpoint.cache_clear()
    return loaded


@lru_cache(maxsize=2)
def _windows(path: str, sha: str) -> np.ndarray:
    return load_windows(path)[0]


@task(**TASK_OPTS)
def prior_task(
    ckpt: dict,
    windows: dict,
    prior: str,
    p_round: float,
    batch_size: int,
    seed: int,
    round_dir: str,
    sample_windows: int = 0,
) -> dict:
    """Step 1-2: activation statistics in one dense pass → prior per unit, this round's candidates."""
    path = Path(round_dir) / "prior.parquet"
    sha = _reuse(path, "prior table")
    reused = sha is not None
    if sha is None:
        model, _, kept = _checkpoint(ckpt["path"], ckpt["sha256"])
        units = unit_table(model, kept)
        stats, nll = collect_activation_stats(model, _windows(windows["path"], windows["sha256"]), batch_size)
        scored = sample_windows or len(nll)
        units["prior"] = unit_prior(model, units, prior, stats=stats, seed=seed)
        units["massive"] = massive_units(model, units, stats)
        units["candidate"] = candidate_mask(units, units["prior"].to_numpy(), p_round, units["massive"].to_numpy())
        meta = {
            "dense_nll": float(nll.mean()),
            # the windows sub-models are scored on (and the check pass after the round reads)
            "scored_nll": float(nll[:scored].mean()),
            "non_embedding_params": non_embedding_params(model),
            "total_params": total_params(model),
            "tokens": int(_windows(windows["path"], windows["sha256"]).size),
            "removable_params": removable_params(units, units["massive"].to_numpy()),
            "min_unit_cost": int(units["cost"].min()),
        }
        sha = write_table(units, path, meta)
    _, meta = read_table(path)
    return {"path": str(path), "sha256": sha, "reused": reused, **meta}


@task(**TASK_OPTS)
def sample_task(
    prior_ref: dict, p_round: float, n_samples: int, seed: int, round_dir: str, module_share: str = "fixed"
) -> dict:
    """Step 3: antithetic sub-model masks, one row per sub-model (packed keep-bitmap over all units)."""
    path = Path(round_dir) / "masks.parquet"
    sha = _reuse(path, "mask table")
    if sha is None:
        units, _ = read_table(prior_ref["path"])
        keep = sample_masks(
            units, units["prior"].to_numpy(), units["candidate"].to_numpy(), p_round, n_samples, seed, module_share
        )
        table = pd.DataFrame(
            {
                "sample": np.arange(n_samples, dtype=np.int32),
                "pair": np.arange(n_samples, dtype=np.int32) // 2,
                "n_dropped": (~keep).sum(1).astype(np.int32),
                "keep_bits": [np.packbits(row).tobytes() for row in keep],
            }
        )
        sha = write_table(table, path, {"n_units": len(units), "seed": seed, "module_share": module_share})
    return {"path": str(path), "sha256": sha, "n_samples": n_samples}


def read_keep_masks(masks_path: str) -> np.ndarray:
    table, meta = read_table(masks_path)
    bits = np.stack([np.frombuffer(b, dtype=np.uint8) for b in table["keep_bits"]])
    return np.unpackbits(bits, axis=1, count=meta["n_units"]).astype(bool)


def _submodel_utilities(
    ckpt: dict, win: np.ndarray, keep: np.ndarray, start: int, stop: int, utility: str, batch_size: int, desc: str
) -> list[tuple[int, float, float, float]]:
    """(sample, utility, mean NLL, seconds) of sub-models [start, stop) on this process's replica of the model.

    A module-level function rather than task code: on Dask the task function travels by value (cloudpickle),
    whereas this one is imported in the worker, so the lock and the model cache are the worker process's own.
    """
    _match_dask_threads()
    rows = []
    with _MODEL_LOCK:
        model, _, kept = _checkpoint(ckpt["path"], ckpt["sha256"])
        units = unit_table(model, kept)
        reference = reference_log_probs(model, win, batch_size) if utility == "kl" else None

        def utility_and_nll(m) -> tuple[float, float]:
            if reference is not None:
                kl, nll = kl_to_reference(m, win, reference, batch_size)
                return -kl, nll
            nll = mean_nll(m, win, batch_size=batch_size, desc=None)
            return (-float(np.exp(nll)) if utility == "ppl" else -nll), nll

        with UnitMasker(model, units) as masker:
            for s in tqdm(range(start, stop), desc=desc, leave=False):
                t0 = time.perf_counter()
                if dropped_share(units, keep[s]) >= SLICE_MIN_DROP:  # smaller matmuls repay the slicing copies
                    masker.set(None)
                    with sliced_submodel(model, units, keep[s], kept) as sub:
                        u, nll = utility_and_nll(sub)
                else:
                    masker.set(keep[s])
                    u, nll = utility_and_nll(model)
                rows.append((s, u, nll, time.perf_counter() - t0))
    return rows


@task(**TASK_OPTS)
def evaluate_shard_task(
    ckpt: dict,
    windows: dict,
    masks_ref: dict,
    shard: int,
    start: int,
    stop: int,
    utility: str,
    batch_size: int,
    round_dir: str,
    sample_windows: int = 0,
) -> dict:
    """Step 4: utilities of sub-models [start, stop) — masked forwards over the round's first `sample_windows`
    calibration windows (0 = all of them; the prior pass always reads all)."""
    path = Path(round_dir) / "shards" / f"shard_{shard:04d}.parquet"
    sha = _reuse(path, f"shard {shard}")
    reused = sha is not None
    if sha is None:
        keep = read_keep_masks(masks_ref["path"])
        win = _windows(windows["path"], windows["sha256"])
        win = win[:sample_windows] if sample_windows else win
        desc = f"{Path(round_dir).name} shard {shard}"
        rows = _submodel_utilities(ckpt, win, keep, start, stop, utility, batch_size, desc)
        table = pd.DataFrame(rows, columns=["sample", "utility", "mean_nll", "seconds"])
        table["sample"] = table["sample"].astype(np.int32)
        # a KL utility adds one pass of the unpruned model (the reference distributions) per shard
        passes = stop - start + (utility == "kl")
        sha = write_table(table, path, {"tokens": int(win.size) * passes})
    tokens = read_table(path)[1]["tokens"]
    return {"path": str(path), "sha256": sha, "shard": shard, "reused": reused, "tokens": tokens}


@task(**TASK_OPTS)
def regression_task(
    prior_ref: dict,
    masks_ref: dict,
    shard_refs: list[dict],
    method: str,
    cv_folds: int,
    seed: int,
    round_dir: str,
) -> dict:
    """Step 5: per-unit importance β from (mask, utility) pairs; candidates only (others never vary)."""
    path = Path(round_dir) / "importance.parquet"
    sha = _reuse(path, "importance table")
    if sha is None:
        units, _ = read_table(prior_ref["path"])
        keep = read_keep_masks(masks_ref["path"])
        scores = pd.concat([read_table(r["path"])[0] for r in shard_refs]).sort_values("sample")
        if len(scores) != len(keep) or not np.array_equal(scores["sample"].to_numpy(), np.arange(len(keep))):
            raise RuntimeError("shard results do not cover every sub-model exactly once")
        cand = units["candidate"].to_numpy()
        modules = units.groupby(["layer", "kind"], sort=True).ngroup().to_numpy()
        beta = np.full(len(units), np.nan)
        beta[cand] = estimate_importance(
            keep[:, cand],
            scores["utility"].to_numpy(),
            method,
            seed=seed,
            cv_folds=cv_folds,
            prior=units["prior"].to_numpy()[cand],
            modules=modules[cand],
            kinds=(units["kind"].to_numpy()[cand] == ATTN).astype(np.int64),
            costs=units["cost"].to_numpy()[cand],
        )
        units["beta"] = beta
        sha = write_table(units, path, {"method": method})
    return {"path": str(path), "sha256": sha}


@task(**TASK_OPTS)
def shrink_task(
    ckpt: dict,
    importance_ref: dict,
    budget: int,
    windows: dict,
    batch_size: int,
    round_dir: str,
    record: dict,
    channel_multiple: int = 1,
    compensation: str = "none",
    refit_damping: float | None = None,
    sample_windows: int = 0,
) -> dict:
    """Steps 6-7: remove the lowest-β candidates up to the parameter budget (MLP channels in blocks that keep
    every width a multiple of `channel_multiple`), slice the weights and compensate the kept o_proj / down_proj
    columns from every calibration window (bonsai.compensation); the check pass reads the scored windows."""
    path = Path(round_dir) / f"checkpoint-{budget}"
    sha = _reuse(path, "round checkpoint")
    reused = sha is not None
    if sha is None:
        units, _ = read_table(importance_ref["path"])
        model, tokenizer, kept = _take_checkpoint(ckpt["path"], ckpt["sha256"])
        if not unit_table(model, kept)[["layer", "kind", "index", "cost"]].equals(
            units[["layer", "kind", "index", "cost"]]
        ):
            raise RuntimeError(f"unit table {importance_ref['path']} does not match checkpoint {ckpt['path']}")
        beta = units["beta"].fillna(np.inf).to_numpy()
        remove = select_removals(units, beta, units["candidate"].to_numpy(), budget, channel_multiple)
        win = _windows(windows["path"], windows["sha256"])
        new_kept, compensation_tokens = compensate_and_shrink(
            model, units, remove, kept, win, mode=compensation, batch_size=batch_size, damping=refit_damping
        )
        scored = win[:sample_windows] if sample_windows else win
        calib_nll = float(window_nll(model, scored, batch_size, desc="calibration after round").mean())
        removed = units[remove].groupby("kind").size().to_dict()
        rounds = [
            *record.get("rounds", []),
            {
                "round": record["round"],
                "budget": budget,
                "non_embedding_params": non_embedding_params(model),
                "total_params": total_params(model),
                "calib_nll": calib_nll,
                "removed_attn_groups": int(removed.get(ATTN, 0)),
                "removed_mlp_channels": int(removed.get(MLP, 0)),
                "compensation": compensation,
                # forward tokens of this step: compensation statistics (layer-weighted) + the check pass
                "tokens": int(compensation_tokens + scored.size),
            },
        ]
        save_pruned(model, tokenizer, path, {**record, "rounds": rounds, "kept_units": new_kept})
        sha = record_artifact(path)
    rec = read_record(path)
    return {"path": str(path), "sha256": sha, "round_summary": rec["rounds"][-1], "rounds": rec["rounds"],
            "reused": reused}
