"""Mosaic (projection pruning, arXiv 2504.06323) and its composite with structural removal.

mosaic — unstructured, the model keeps its shapes (zeros stored densely):
- per-weight importance S_ij = |W_ij| · ‖X_j‖ (the Wanda metric; ‖X_j‖ = L2 norm over calibration tokens of
  input feature j of that projection, from hooks on every q/k/v/o/gate/up/down input);
- per projection, the outlier ratio D_p = share of its scores above M × its mean score (M = mosaic_outlier_m);
- per-projection sparsity s_p = s̄ + λ · t_p, where s̄ is the mean sparsity the budget needs over all
  projection weights and t_p ∈ [−1, 1] is (size-weighted mean of d) − d_p, scaled so the largest deviation is
  1, with d_p = D_p min-max normalised: more outliers → less pruning, every s_p within s̄ ± λ
  (λ = mosaic_lambda, capped at s̄ and 1 − s̄), and Σ_p size_p · s_p equal to the budget. Integer counts per
  projection are rounded by largest remainder so the zeros add up to the budget exactly;
- inside a projection the lowest-S weights of each output row go (Wanda's per-output comparison group), the
  same count in every row up to one.
The budget is round(sparsity · n0) non-embedding parameters (n0 as before pruning), so the realised sparsity
1 − non-zero / n0 equals the target to the parameter (exact zeros already present outside the projections,
e.g. in norms, count towards it).

mosaic_composite — structure first, then Mosaic: `structural_share` of the budget is removed as whole units
(KV groups or query heads, MLP channels) chosen by a structured importance, FLAP's fluctuation metric
standardised per module, in one global cost-aware ranking in which no module may lose more than
STRUCTURAL_CAP_FACTOR times the structural half's mean share of its units and massive-activation units never go;
the kept o_proj / down_proj columns are compensated (the refit of bonsai.compensation by default). A second
pass over the shrunk model gives the input norms with which Mosaic's per-projection ratios zero the rest of the
budget. Both the dense-equivalent size (what the checkpoint stores) and the non-zero count are reported; the
non-zero count meets the target.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from bonsai.architectures import non_embedding_params
from bonsai.compensation import compensate_and_shrink
from bonsai.errors import BonsaiError
from bonsai.methods.common import (
    MethodResult,
    check_sizes,
    collect_projection_norms,
    count_nonzero_non_embedding,
    freed_params,
    projections,
    removed_counts,
    target_removed,
    wanda_scores,
    zeros_outside_projections,
)
from bonsai.methods.flap import added_bias_params, flap_scores
from bonsai.prior import collect_activation_stats, massive_units
from bonsai.selection import removable_params, select_removals
from bonsai.units import unit_table


def outlier_ratio(scores: torch.Tensor, m: float) -> float:
    return float((scores > m * scores.mean()).double().mean())


def allocate(sizes: np.ndarray, outliers: np.ndarray, zeros: int, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(per-projection sparsity, integer zero counts summing to `zeros`) — see the module docstring."""
    sizes = np.asarray(sizes, dtype=np.float64)
    total = sizes.sum()
    if zeros > total:
        raise BonsaiError(f"cannot zero {zeros:,} weights: the projections hold {int(total):,}")
    mean = zeros / total
    lam = max(0.0, min(lam, mean, 1.0 - mean))
    o = np.asarray(outliers, dtype=np.float64)
    d = (o - o.min()) / (o.max() - o.min()) if o.max() > o.min() else np.zeros_like(o)
    dev = (sizes * d).sum() / total - d  # positive: fewer outliers than average → prune more
    scale = np.abs(dev).max()
    ratios = mean + (lam * dev / scale if scale > 0 else 0.0)
    exact = np.clip(ratios * sizes, 0, sizes)
    counts = np.floor(exact).astype(np.int64)
    short = int(zeros - counts.sum())
    frac = exact - counts
    for i in sorted(range(len(counts)), key=lambda j: (-frac[j], j)):
        if short <= 0:
            break
        if counts[i] < sizes[i]:
            counts[i] += 1
            short -= 1
    if short != 0:
        raise BonsaiError("Mosaic allocation could not distribute the zeros exactly")  # unreachable by design
    return ratios, counts


def row_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k lowest scores, spread over rows: every row loses ⌊k/rows⌋, the rows whose next
    candidate is weakest one more."""
    rows, cols = scores.shape
    base, extra = divmod(int(k), rows)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if base >= cols:
        mask[:] = True
        return mask
    order = torch.sort(scores, dim=1, stable=True).indices
    if base:
        mask.scatter_(1, order[:, :base], True)
    if extra:
        nxt = scores.gather(1, order[:, base : base + 1]).squeeze(1)
        pick = torch.sort(nxt, stable=True).indices[:extra]
        mask[pick, order[pick, base]] = True
    return mask


def _plan(model: nn.Module, norms: dict, zeros: int, outlier_m: float, lam: float):
    projs = list(projections(model))
    if not projs:
        raise BonsaiError("no projection left to prune")
    sizes = np.array([lin.weight.numel() for _, _, lin in projs])
    outliers = np.array([outlier_ratio(wanda_scores(lin, norms[(li, name)]), outlier_m) for li, name, lin in projs])
    ratios, counts = allocate(sizes, outliers, zeros, lam)
    return projs, sizes, outliers, ratios, counts


def mosaic_prune(model: nn.Module, norms: dict, zeros: int, outlier_m: float, lam: float) -> list[dict]:
    """Zero exactly `zeros` projection weights at Mosaic's per-projection ratios; the allocation table."""
    projs, sizes, outliers, ratios, counts = _plan(model, norms, zeros, outlier_m, lam)
    table = []
    for (li, name, lin), size, o, r, k in zip(projs, sizes, outliers, ratios, counts, strict=True):
        mask = row_mask(wanda_scores(lin, norms[(li, name)]), int(k))
        with torch.no_grad():
            lin.weight.masked_fill_(mask.to(lin.weight.device), 0.0)
        table.append({"layer": li, "proj": name, "numel": int(size), "outlier_ratio": float(o),
                      "target_ratio": float(r), "sparsity": int(k) / int(size)})
    return table


def _check_target(model: nn.Module, n0: int, sparsity: float) -> int:
    zeros = target_removed(n0, sparsity) - zeros_outside_projections(model)
    if zeros < 0:
        raise BonsaiError("the model already holds more zeros outside its projections than the target asks")
    return zeros


def mosaic(
    model: nn.Module,
    kept: dict,
    windows: np.ndarray,
    *,
    sparsity: float,
    batch_size: int,
    seed: int = 0,
    outlier_m: float = 5.0,
    lam: float = 0.08,
) -> MethodResult:
    n0, _ = check_sizes(model)
    norms, nll = collect_projection_norms(model, windows, batch_size)
    zeros = _check_target(model, n0, sparsity)
    table = mosaic_prune(model, norms, zeros, outlier_m, lam)
    proj_total = sum(r["numel"] for r in table)
    return MethodResult(
        method="mosaic",
        kept={k: [list(v) for v in per_layer] for k, per_layer in kept.items()},
        dense_nll=nll,
        forward_tokens=int(np.asarray(windows).size),
        basis="nonzero",
        details={
            "outlier_m": outlier_m,
            "lambda": lam,
            "projection_sparsity": zeros / proj_total,
            "zeroed_weights": int(zeros),
            "allocation": table,
        },
    )


# A module may lose at most this many times the structural half's mean share of removable parameters as whole
# units: the guard that keeps any layer's attention or MLP from being emptied by the structural half.
STRUCTURAL_CAP_FACTOR = 2.0


def capped_candidates(units: pd.DataFrame, score: np.ndarray, cap: float) -> np.ndarray:
    """Bool per unit: within each module, the lowest-scored floor(cap × units) units (the others never go)."""
    candidates = np.zeros(len(units), dtype=bool)
    for _, rows in units.groupby(["layer", "kind"], sort=True):
        ids = rows["unit"].to_numpy()
        k = int(np.floor(min(cap, 1.0) * len(ids)))
        candidates[ids[np.argsort(score[ids], kind="stable")[:k]]] = True
    return candidates


def _structural_half(
    model: nn.Module, units: pd.DataFrame, score: np.ndarray, allowed: np.ndarray, budget: int, cap: float,
    compensate: bool,
) -> tuple[np.ndarray, float]:
    """(removal mask, the cap it used): lowest score first among the `allowed` units under the per-module `cap`,
    freeing `budget` parameters net of the biases a compensation creates (as FLAP's selection counts them). Where
    the modules are too coarse for the cap to reach the budget (a few large units each), the cap widens."""
    slack = int(units["cost"].min()) // 2  # what a cost-aware selection can miss the budget by
    while True:
        candidates = capped_candidates(units, score, cap) & allowed
        extra, seen = 0, set()
        while True:
            remove = select_removals(units, score, candidates, budget + extra)
            new_extra = added_bias_params(model, units, remove) if compensate else 0
            if new_extra == extra or new_extra in seen:
                break
            seen.add(extra)
            extra = new_extra
        if freed_params(units, remove) - new_extra >= budget - slack or cap >= 1.0:
            return remove, min(cap, 1.0)
        cap = min(1.0, cap * 1.5)


def mosaic_composite(
    model: nn.Module,
    kept: dict,
    windows: np.ndarray,
    *,
    sparsity: float,
    batch_size: int,
    seed: int = 0,
    outlier_m: float = 5.0,
    lam: float = 0.08,
    structural_share: float = 0.5,
    compensation: str = "refit",
    refit_damping: float | None = None,
) -> MethodResult:
    """`structural_share` of the budget as whole units, chosen by FLAP's standardised fluctuation under a
    per-module cap (massive-activation units never), the kept o_proj / down_proj compensated (`compensation`);
    then a second pass over the shrunk model and Mosaic's per-projection ratios zero the rest of the budget."""
    n0, _ = check_sizes(model)
    budget = target_removed(n0, sparsity)
    units = unit_table(model, kept)
    stats, nll = collect_activation_stats(model, windows, batch_size)
    score = flap_scores(model, units, stats)
    structural_budget = round(structural_share * budget)
    cap = STRUCTURAL_CAP_FACTOR * structural_budget / max(removable_params(units), 1)
    remove, cap = _structural_half(model, units, score, ~massive_units(model, units, stats), structural_budget, cap,
                                   compensation != "none")
    new_kept, comp_tokens = compensate_and_shrink(
        model, units, remove, kept, windows, mode=compensation, batch_size=batch_size, damping=refit_damping
    )
    dense_after = non_embedding_params(model)
    structural = n0 - dense_after  # biases the compensation created count against it
    zeros = max(0, budget - structural - zeros_outside_projections(model))
    norms, _ = collect_projection_norms(model, windows, batch_size)  # the shrunk, compensated model's inputs
    table = mosaic_prune(model, norms, zeros, outlier_m, lam) if zeros > 0 else []
    return MethodResult(
        method="mosaic_composite",
        kept=new_kept,
        dense_nll=nll,
        forward_tokens=2 * int(np.asarray(windows).size) + comp_tokens,
        basis="nonzero",
        removed=removed_counts(units, remove),
        details={
            "outlier_m": outlier_m,
            "lambda": lam,
            "structural_share": structural_share,
            "structural_metric": "fluctuation (standardised per module kind), per-module cap",
            "structural_cap": float(min(cap, 1.0)),
            "compensation": compensation,
            "structural_params_removed": int(structural),
            "unstructured_zeros": int(zeros),
            "dense_equivalent_non_embedding_params": int(dense_after),
            "nonzero_non_embedding_params": count_nonzero_non_embedding(model),
            "dense_sparsity": structural / n0,
            "allocation": table,
        },
    )
