"""Step 6: cost-aware global selection of the units to remove this round.

Candidates are removed in order of increasing estimated importance β until the round's parameter budget is met.
A unit that would overshoot the budget by more than half the cheapest candidate is skipped and cheaper units
further down the list fill the gap, so a round lands within half of the cheapest candidate's cost of its budget.
Emptying a module also frees its residual parameters, which count towards the budget.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bonsai.errors import BonsaiError


def removable_params(units: pd.DataFrame) -> int:
    """Parameters freed if every unit (and so every module) went."""
    per_module = units.groupby(["layer", "kind"]).agg(cost=("cost", "sum"), residual=("residual", "first"))
    return int(per_module["cost"].sum() + per_module["residual"].sum())


def round_budget(
    original_non_embedding: int, removed_so_far: int, target_sparsity: float, p_iter: float, round_index: int
) -> int:
    """Parameters to remove in round `round_index` (0-based): the schedule is cumulative — after round r a share
    min(target, (r+1)·p_iter) of the original is gone — so a round that fell a little short is made up by the
    next one instead of accumulating into an extra round at the end."""
    scheduled = min(target_sparsity, (round_index + 1) * p_iter)
    return max(0, round(scheduled * original_non_embedding) - removed_so_far)


def check_reachable(removable: int, removed_so_far: int, original_non_embedding: int, target_sparsity: float) -> None:
    """Refuse a target that needs removing every prunable unit (`removable`: what the current units free)."""
    limit = (removed_so_far + removable) / original_non_embedding
    if round(target_sparsity * original_non_embedding) >= removed_so_far + removable:
        raise BonsaiError(
            f"sparsity {target_sparsity:g} cannot be reached without removing every unit: attention groups "
            f"and MLP channels hold {limit:.1%} of the non-embedding parameters (norms stay); "
            f"choose a sparsity below {limit:.3f}"
        )


def select_removals(units: pd.DataFrame, beta: np.ndarray, candidates: np.ndarray, budget: int) -> np.ndarray:
    """Bool per unit: True = remove. `beta` is indexed like `units` (only candidate entries are read).

    Lowest β first; a unit that would take the total more than half the cheapest candidate past the budget is
    skipped and cheaper units further down fill the gap, so a round lands within half the cheapest candidate's
    cost of its budget even when the last unit in line is a large attention group.
    """
    remove = np.zeros(len(units), dtype=bool)
    cand_ids = np.flatnonzero(candidates)
    if budget <= 0 or len(cand_ids) == 0:
        return remove
    order = cand_ids[np.lexsort((cand_ids, beta[cand_ids]))]  # lowest β first; ties by unit id
    module_key = list(zip(units["layer"].to_numpy(), units["kind"].to_numpy(), strict=True))
    left_in_module: dict = {}
    for key in module_key:
        left_in_module[key] = left_in_module.get(key, 0) + 1
    costs, residuals = units["cost"].to_numpy(), units["residual"].to_numpy()
    slack = int(costs[cand_ids].min()) // 2
    removed = 0
    for u in order:
        key = module_key[u]
        gain = int(costs[u]) + (int(residuals[u]) if left_in_module[key] == 1 else 0)
        if removed + gain > budget + slack:
            continue
        remove[u] = True
        removed += gain
        left_in_module[key] -= 1
        if removed >= budget:
            break
    return remove
