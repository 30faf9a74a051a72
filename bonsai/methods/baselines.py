"""Structured magnitude and random baselines: `unit_prior(..., "magnitude" | "random")`, one global cost-aware
selection to the target. Neither score needs data; the calibration pass only measures the dense loss."""

from __future__ import annotations

import numpy as np
from torch import nn

from bonsai.compensation import compensate_and_shrink
from bonsai.methods.common import MethodResult, check_sizes, dense_pass, global_select, removed_counts, target_removed
from bonsai.prior import unit_prior
from bonsai.units import unit_table

NO_COMPENSATION = {"compensation": "none", "refit_damping": None}


def _baseline(
    name: str,
    model: nn.Module,
    kept: dict,
    windows: np.ndarray,
    *,
    sparsity: float,
    batch_size: int,
    seed: int,
    compensation: str,
    refit_damping: float,
) -> MethodResult:
    n0, _ = check_sizes(model)
    units = unit_table(model, kept)
    score = unit_prior(model, units, name, stats=None, seed=seed)  # magnitude: mean |w| per owned weight
    remove = global_select(units, score, target_removed(n0, sparsity), n0, sparsity)
    nll = dense_pass(model, windows, batch_size)
    new_kept, comp_tokens = compensate_and_shrink(
        model, units, remove, kept, windows, mode=compensation, batch_size=batch_size, damping=refit_damping
    )
    return MethodResult(
        method=name,
        kept=new_kept,
        dense_nll=nll,
        forward_tokens=int(np.asarray(windows).size) + comp_tokens,
        removed=removed_counts(units, remove),
        details={"score": f"unit_prior {name}" + (f" (seed {seed})" if name == "random" else "")},
    )


def magnitude(model, kept, windows, *, sparsity: float, batch_size: int, seed: int = 0, **compensation) -> MethodResult:
    """`compensation` / `refit_damping` as in bonsai.compensation (default: none, as published)."""
    return _baseline("magnitude", model, kept, windows, sparsity=sparsity, batch_size=batch_size, seed=seed,
                     **{**NO_COMPENSATION, **compensation})


def random(model, kept, windows, *, sparsity: float, batch_size: int, seed: int = 0, **compensation) -> MethodResult:
    return _baseline("random", model, kept, windows, sparsity=sparsity, batch_size=batch_size, seed=seed,
                     **{**NO_COMPENSATION, **compensation})
