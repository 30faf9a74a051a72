"""Prefect task of a one-shot pruning method (bonsai/methods/): load, prune, check, save a checkpoint.

The checkpoint has the Bonsai format (bonsai.checkpoint.save_pruned): `kept_units`, one entry in `rounds`,
plus `method_summary` (sizes, costs) and `method_details` (what the method decided). An intact checkpoint
(size + hash sidecar) is reused, as the Bonsai rounds are.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from prefect import task

from bonsai.architectures import non_embedding_params, total_params
from bonsai.artifacts import record_artifact
from bonsai.checkpoint import load_for_pruning, read_record, save_pruned
from bonsai.config import COMPENSATED_METHODS
from bonsai.errors import BonsaiError
from bonsai.evaluate import window_nll
from bonsai.methods import PeakRSS, count_nonzero_non_embedding, run_method
from tasks.prune_tasks import TASK_OPTS, _reuse, _windows

SPARSITY_TOLERANCE = 0.005  # as flows/prune.py: within ±0.5 points of the target


@task(**TASK_OPTS)
def one_shot_task(ckpt: dict, windows: dict, config: dict, method_dir: str, record: dict) -> dict:
    """Prune `ckpt` with `config["method"]` to `config["sparsity"]` in one shot; returns the checkpoint ref
    with its `rounds` and `method_summary`."""
    path = Path(method_dir) / "checkpoint"
    sha = _reuse(path, f"{config['method']} checkpoint")
    reused = sha is not None
    if sha is None:
        model, tokenizer, kept = load_for_pruning(ckpt["path"])  # a private copy: it is modified in place
        win = _windows(windows["path"], windows["sha256"])
        n0, total0 = non_embedding_params(model), total_params(model)
        with PeakRSS() as rss:
            result = run_method(
                config["method"],
                model,
                kept,
                win,
                sparsity=config["sparsity"],
                batch_size=config["eval_batch_size"],
                seed=config["seed"],
                outlier_m=config["mosaic_outlier_m"],
                lam=config["mosaic_lambda"],
                structural_share=config["structural_share"],
                # only the methods that can compensate get the knob (mosaic & co. validate to "none")
                **(
                    {"compensation": config["compensation"], "refit_damping": config["refit_damping"]}
                    if config["method"] in COMPENSATED_METHODS
                    else {}
                ),
            )
        seconds = rss.seconds
        t0 = time.perf_counter()
        calib_nll = float(window_nll(model, win, config["eval_batch_size"], desc="calibration after pruning").mean())
        n1, nonzero = non_embedding_params(model), count_nonzero_non_embedding(model)
        size = nonzero if result.basis == "nonzero" else n1
        summary = {
            "method": result.method,
            "basis": result.basis,
            "non_embedding_params_before": n0,
            "total_params_before": total0,
            "dense_nll": float(result.dense_nll.mean()),
            "sparsity": 1 - size / n0,
            "dense_sparsity": 1 - n1 / n0,
            "nonzero_non_embedding_params_after": nonzero,
            "forward_tokens": int(result.forward_tokens + win.size),  # method's passes + the check pass
            "backward_passes": int(result.backward_passes),
            "peak_rss_mb": rss.peak_mb,
            "method_seconds": seconds,
            "check_seconds": time.perf_counter() - t0,
        }
        rounds = [
            {
                "round": 0,
                "budget": round(config["sparsity"] * n0),
                "non_embedding_params": n1,
                "total_params": total_params(model),
                "calib_nll": calib_nll,
                "removed_attn_groups": int(result.removed.get("removed_attn_groups", 0)),
                "removed_mlp_channels": int(result.removed.get("removed_mlp_channels", 0)),
                "nonzero_non_embedding_params": nonzero,
            }
        ]
        save_pruned(
            model,
            tokenizer,
            path,
            {
                **record,
                "rounds": rounds,
                "kept_units": result.kept,
                "method_summary": summary,
                "method_details": result.details,
            },
        )
        sha = record_artifact(path)
    rec = read_record(path)
    return {"path": str(path), "sha256": sha, "reused": reused, "rounds": rec["rounds"],
            "method_summary": rec["method_summary"],
            "method_details": rec.get("method_details", {})}


def one_shot_summary(ckpt: dict, target: float, source_model: str, out: str, started: float) -> dict:
    """The prune summary of a one-shot checkpoint (the Bonsai loop's keys, plus the method's costs); refuses a
    result off the target by more than 0.5 points (sparse24: its projection sparsity must be exactly 0.5)."""
    ms, final = ckpt["method_summary"], ckpt["rounds"][-1]
    if ms["method"] == "sparse24":
        got = ckpt["method_details"]["projection_sparsity"]
        if abs(got - 0.5) > 1e-9 and ckpt["method_details"].get("dense_tail_weights", 0) == 0:
            raise BonsaiError(f"sparse24 zeroed {got:.4f} of the projection weights, not 0.5")
    elif abs(ms["sparsity"] - target) > SPARSITY_TOLERANCE:
        raise BonsaiError(
            f"{ms['method']}: realised sparsity {ms['sparsity']:.4f} misses the target {target} by more than 0.5 points"
        )
    return {
        "out": str(out),
        "source_model": source_model,
        "target_sparsity": target,
        "sparsity": ms["sparsity"],
        "non_embedding_params_before": ms["non_embedding_params_before"],
        "non_embedding_params_after": final["non_embedding_params"],
        "total_params_before": ms["total_params_before"],
        "total_params_after": final["total_params"],
        "total_sparsity": 1 - final["total_params"] / ms["total_params_before"],
        "calib_ppl_before": math.exp(ms["dense_nll"]),
        "calib_ppl_after": math.exp(final["calib_nll"]),
        "rounds": len(ckpt["rounds"]),
        "forward_tokens": ms["forward_tokens"],
        "forward_tokens_computed": 0 if ckpt["reused"] else ms["forward_tokens"],
        "wall_seconds": time.time() - started,
        "method": ms["method"],
        "sparsity_basis": ms["basis"],
        "dense_sparsity": ms["dense_sparsity"],
        "nonzero_non_embedding_params_after": ms["nonzero_non_embedding_params_after"],
        "backward_passes": ms["backward_passes"],
        "peak_rss_mb": ms["peak_rss_mb"],
    }
