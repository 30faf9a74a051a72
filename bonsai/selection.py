"""Step 6: cost-aware global selection of the units to remove this round.

Candidates are removed in order of increasing estimated importance β until the round's parameter budget is met.
A unit that would overshoot the budget by more than half the cheapest candidate is skipped and cheaper units
further down the list fill the gap, so a round lands within half of the cheapest candidate's cost of its budget.
Emptying a module also frees its residual parameters, which count towards the budget.

With a channel multiple m > 1, MLP channels go in blocks of m (each module's lowest-β candidates first, the
first block trimmed so that what stays is a multiple of m), so every layer keeps a hardware-friendly width: GEMM
kernels work in vector-width panels and an odd width leaves a ragged, slow edge (the measured prefill speed-ups
with and without m = 8 are in benchmarks/results/eval_smollm2.json).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bonsai.errors import BonsaiError
from bonsai.units import MLP, unit_table


def removable_params(units: pd.DataFrame, protected: np.ndarray | None = None) -> int:
    """Parameters freed if every unit (and so every module) went; `protected` units (bool per unit, e.g. massive
    activations) stay, and so do the shared parameters of their modules."""
    if protected is None:
        protected = np.zeros(len(units), dtype=bool)
    table = units.assign(cost=np.where(protected, 0, units["cost"]), kept=protected)
    per_module = table.groupby(["layer", "kind"]).agg(
        cost=("cost", "sum"), residual=("residual", "first"), kept=("kept", "any")
    )
    return int(per_module["cost"].sum() + per_module["residual"][~per_module["kept"]].sum())


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
            f"sparsity {target_sparsity:g} cannot be reached without removing every prunable unit: attention "
            f"groups and MLP channels (less any carrying massive activations, which stay) hold {limit:.1%} of the "
            f"non-embedding parameters (norms stay); "
            f"choose a sparsity below {limit:.3f}"
        )


def _removal_blocks(
    units: pd.DataFrame, kinds: np.ndarray, beta: np.ndarray, cand_ids: np.ndarray, channel_multiple: int
) -> list[tuple[float, int, np.ndarray]]:
    """(key β, tie id, member units) per block, in removal order. An attention group is a block of its own; with
    `channel_multiple` m > 1 a module's MLP candidates, lowest β first, form blocks of m (the first one of
    n mod m when the module's width n is not a multiple of m), keyed by their mean β; a candidate tail too short
    for a whole block stays."""
    blocks = []
    mlp_ids = cand_ids[kinds[cand_ids] == MLP] if channel_multiple > 1 else cand_ids[:0]
    blocks.extend((float(beta[u]), int(u), np.array([u])) for u in np.setdiff1d(cand_ids, mlp_ids))
    width = units.groupby(["layer", "kind"]).size()
    layers = units["layer"].to_numpy()
    for layer in np.unique(layers[mlp_ids]):
        ids = mlp_ids[layers[mlp_ids] == layer]
        ids = ids[np.lexsort((ids, beta[ids]))]
        first = int(width[(layer, MLP)]) % channel_multiple or channel_multiple
        start, size = 0, first
        while start + size <= len(ids):
            members = ids[start : start + size]
            blocks.append((float(beta[members].mean()), int(members[0]), members))
            start, size = start + size, channel_multiple
    blocks.sort(key=lambda b: (b[0], b[1]))  # lowest β first; ties by unit id
    return blocks


def select_removals(
    units: pd.DataFrame, beta: np.ndarray, candidates: np.ndarray, budget: int, channel_multiple: int = 1
) -> np.ndarray:
    """Bool per unit: True = remove. `beta` is indexed like `units` (only candidate entries are read).

    Lowest β first; a unit (block) that would take the total more than half the cheapest whole block past the
    budget is skipped and cheaper ones further down fill the gap, so a round lands within half the cheapest
    block's cost of its budget even when the last unit in line is a large attention group. `channel_multiple`:
    MLP channels go in blocks so that every layer's MLP width stays a multiple of it (module docstring); a
    module's blocks go in order, so once one is skipped the module's later blocks are too.
    """
    remove = np.zeros(len(units), dtype=bool)
    cand_ids = np.flatnonzero(candidates)
    if budget <= 0 or len(cand_ids) == 0:
        return remove
    kinds = units["kind"].to_numpy()
    blocks = _removal_blocks(units, kinds, beta, cand_ids, channel_multiple)
    if not blocks:
        return remove
    module_key = list(zip(units["layer"].to_numpy(), kinds, strict=True))
    left_in_module: dict = {}
    for key in module_key:
        left_in_module[key] = left_in_module.get(key, 0) + 1
    costs, residuals = units["cost"].to_numpy(), units["residual"].to_numpy()
    # half the cheapest whole block (a module's first block may be shorter and is not the yardstick)
    slack = min(
        int(costs[m[0]]) * channel_multiple if kinds[m[0]] == MLP else int(costs[m].sum()) for _, _, m in blocks
    ) // 2
    skipped: set = set()  # MLP modules whose next block was skipped: taking a later one would break the width
    removed = 0
    for _, _, members in blocks:
        key = module_key[members[0]]
        if key in skipped:
            continue
        empties = left_in_module[key] == len(members)
        gain = int(costs[members].sum()) + (int(residuals[members[0]]) if empties else 0)
        if removed + gain > budget + slack:
            if channel_multiple > 1 and key[1] == MLP:
                skipped.add(key)
            continue
        remove[members] = True
        removed += gain
        left_in_module[key] -= len(members)
        if removed >= budget:
            break
    return remove


def check_reachable_from_config(model_dir: str | Path, target_sparsity: float) -> None:
    """`check_reachable` from a model directory's config alone (a weightless model on the meta device), so an
    impossible target is refused before anything is loaded or run. A pruned checkpoint is checked later, by the
    first round, which reads its recorded shapes."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bonsai.architectures import family_of, non_embedding_params

    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file() or "bonsai" in json.loads(config_file.read_text()):
        return
    config = AutoConfig.from_pretrained(model_dir)
    family_of(config)  # an unsupported architecture: its own one-line error, before any shape is read
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    check_reachable(removable_params(unit_table(model)), 0, non_embedding_params(model), target_sparsity)
