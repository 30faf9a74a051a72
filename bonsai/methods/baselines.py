"""Structured magnitude and random baselines: `unit_prior(..., "magnitude" | "random")`, one global cost-aware
selection to the target. Neither score needs data; the calibration pass only measures the dense loss."""

from __future__ import annotations

import numpy as np
from torch import nn

from bonsai.methods.common import MethodResult, check_sizes, dense_pass, global_select, removed_counts, target_removed
from bonsai.prior import unit_prior
from bonsai.shrink import shrink_model
from bonsai.units import unit_table


def _baseline(
    name: str, model: nn.Module, kept: dict, windows: np.ndarray, *, sparsity: float, batch_size: int, seed: int
) -> MethodResult:
    n0, _ = check_sizes(model)
    units = unit_table(model, kept)
    score = unit_prior(model, units, name, stats=None, seed=seed)  # magnitude: mean |w| per owned weight
    remove = global_select(units, score, target_removed(n0, sparsity), n0, sparsity)
    nll = dense_pass(model, windows, batch_size)
    new_kept = shrink_model(model, units, remove, kept)
    return MethodResult(
        method=name,
        kept=new_kept,
        dense_nll=nll,
        forward_tokens=int(np.asarray(windows).size),
        removed=removed_counts(units, remove),
        details={"score": f"unit_prior {name}" + (f" (seed {seed})" if name == "random" else "")},
    )


def magnitude(model, kept, windows, *, sparsity: float, batch_size: int, seed: int = 0) -> MethodResult:
    return _baseline("magnitude", model, kept, windows, sparsity=sparsity, batch_size=batch_size, seed=seed)


def random(model, kept, windows, *, sparsity: float, batch_size: int, seed: int = 0) -> MethodResult:
    return _baseline("random", model, kept, windows, sparsity=sparsity, batch_size=batch_size, seed=seed)
