"""Wanda-SP (structured Wanda, the baseline of An et al. 2024): Wanda score per unit, the same share of every
module removed.

Score: `unit_prior(..., "wanda")` — RMS over calibration tokens of a unit's o_proj/down_proj input features
times the mean |W| of the columns they feed. Allocation is uniform: every module (one layer's attention or MLP)
loses the same share q = budget / (parameters all units own) of its unit parameters, as whole units with the
lowest scores. Whole units rarely divide evenly, so each module first removes floor(q · n) units; the rounding
remainder is filled with one more unit in the modules with the largest fractional parts (again if needed),
skipping any unit that would take the total more than half the cheapest unit past the budget, so the share is
uniform up to one unit per module.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from bonsai.compensation import compensate_and_shrink
from bonsai.methods.common import MethodResult, check_sizes, removed_counts, target_removed
from bonsai.prior import collect_activation_stats, unit_prior
from bonsai.selection import check_reachable, removable_params
from bonsai.units import unit_table


def uniform_select(units, score: np.ndarray, budget: int) -> np.ndarray:
    """Remove the same share of every module (lowest score first inside each), meeting `budget` overall."""
    remove = np.zeros(len(units), dtype=bool)
    modules = []
    for _, rows in units.groupby(["layer", "kind"], sort=True):
        ids = rows["unit"].to_numpy()
        modules.append((ids[np.lexsort((ids, score[ids]))], int(rows["cost"].iloc[0])))
    owned = sum(len(ids) * cost for ids, cost in modules)
    share = budget / owned if owned else 0.0
    counts = [min(len(ids), int(np.floor(share * len(ids)))) for ids, _ in modules]
    removed = sum(c * cost for c, (_, cost) in zip(counts, modules, strict=True))
    frac = [share * len(ids) - c for c, (ids, _) in zip(counts, modules, strict=True)]
    order = sorted(range(len(modules)), key=lambda i: (-frac[i], i))
    slack = min((cost for _, cost in modules), default=0) // 2
    changed = True
    while removed < budget and changed:  # usually one pass; more only when big units had to be skipped
        changed = False
        for m in order:
            ids, cost = modules[m]
            if removed >= budget:
                break
            if counts[m] < len(ids) - 1 and removed + cost <= budget + slack:
                counts[m] += 1
                removed += cost
                changed = True
    for (ids, _), c in zip(modules, counts, strict=True):
        remove[ids[:c]] = True
    return remove


def wanda_sp(
    model: nn.Module,
    kept: dict,
    windows: np.ndarray,
    *,
    sparsity: float,
    batch_size: int,
    seed: int = 0,
    compensation: str = "none",
    refit_damping: float | None = None,
) -> MethodResult:
    n0, _ = check_sizes(model)
    units = unit_table(model, kept)
    check_reachable(removable_params(units), 0, n0, sparsity)
    stats, nll = collect_activation_stats(model, windows, batch_size)
    score = unit_prior(model, units, "wanda", stats=stats, seed=seed)
    remove = uniform_select(units, score, target_removed(n0, sparsity))
    new_kept, comp_tokens = compensate_and_shrink(
        model, units, remove, kept, windows, mode=compensation, batch_size=batch_size, damping=refit_damping
    )
    shares = units.assign(removed=remove).groupby(["layer", "kind"])["removed"].mean()
    return MethodResult(
        method="wanda_sp",
        kept=new_kept,
        dense_nll=nll,
        forward_tokens=int(np.asarray(windows).size) + comp_tokens,
        removed=removed_counts(units, remove),
        details={"module_share_removed": {f"{li}.{kind}": float(v) for (li, kind), v in shares.items()}},
    )
