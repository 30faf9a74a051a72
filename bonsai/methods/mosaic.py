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

mosaic_composite — the same ratios, then structure: a provisional Mosaic mask at the full budget leaves each
unit (KV group: rows of q/k/v, columns of o; MLP channel: rows of gate/up, column of down) some surviving
importance mass; units whose rows/columns became (almost) entirely zero, or whose remaining mass per owned
parameter is smallest, are removed physically (cost-aware, bonsai.selection) up to `structural_share` of the
budget; the rest of the budget is then zeroed by Mosaic inside the shrunk model (norms of the kept features,
no second pass). Both the dense-equivalent size (what the checkpoint stores) and the non-zero count are
reported; the non-zero count meets the target.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bonsai.architectures import attn_unit_rows, head_dim, non_embedding_params, unit_heads
from bonsai.errors import BonsaiError
from bonsai.methods.common import (
    MethodResult,
    check_sizes,
    collect_projection_norms,
    count_nonzero_non_embedding,
    fit_removals,
    projections,
    removed_counts,
    target_removed,
    wanda_scores,
    zeros_outside_projections,
)
from bonsai.shrink import shrink_model
from bonsai.units import ATTN, MLP, unit_table


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


def _unit_mass(model: nn.Module, units, norms: dict, projs, counts) -> np.ndarray:
    """Importance mass per unit that survives the provisional mask (counts per projection)."""
    uh, hd = unit_heads(model.config), head_dim(model.config)
    owned_rows = attn_unit_rows(model.config)
    per_module: dict[tuple[int, str], torch.Tensor] = {}
    for (li, name, lin), k in zip(projs, counts, strict=True):
        if name in ("k_proj", "v_proj") and name not in owned_rows:
            continue  # one shared KV head: no query-head unit owns it
        s = wanda_scores(lin, norms[(li, name)]).double()
        s = s.masked_fill(row_mask(s, int(k)), 0.0)
        if name in ("q_proj", "k_proj", "v_proj"):
            n = lin.out_features // ((uh if name == "q_proj" else 1) * hd)
            part, key = s.sum(1).reshape(n, -1).sum(1), (li, ATTN)
        elif name == "o_proj":
            n = lin.in_features // (uh * hd)
            part, key = s.sum(0).reshape(n, -1).sum(1), (li, ATTN)
        elif name == "down_proj":
            part, key = s.sum(0), (li, MLP)
        else:
            part, key = s.sum(1), (li, MLP)
        per_module[key] = part if key not in per_module else per_module[key] + part
    mass = np.zeros(len(units), dtype=np.float64)
    for (li, kind), rows in units.groupby(["layer", "kind"], sort=True):
        order = rows.sort_values("index")
        mass[order["unit"].to_numpy()] = per_module[(li, kind)].cpu().numpy()
    return mass


def _kept_norms(model: nn.Module, units, remove: np.ndarray, norms: dict) -> dict:
    """Input norms re-indexed to the shrunk model (o_proj / down_proj lose the removed units' features)."""
    width = {ATTN: unit_heads(model.config) * head_dim(model.config), MLP: 1}
    out = dict(norms)
    for (li, kind), rows in units.groupby(["layer", "kind"], sort=True):
        rows = rows.sort_values("index")
        pos = rows["index"].to_numpy()[~remove[rows["unit"].to_numpy()]]
        w = width[kind]
        feats = torch.from_numpy((pos[:, None] * w + np.arange(w)[None, :]).reshape(-1).astype(np.int64))
        name = "o_proj" if kind == ATTN else "down_proj"
        out[(li, name)] = norms[(li, name)][feats]
    return out


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
) -> MethodResult:
    n0, _ = check_sizes(model)
    norms, nll = collect_projection_norms(model, windows, batch_size)
    budget = target_removed(n0, sparsity)
    units = unit_table(model, kept)
    projs, _, _, _, counts = _plan(model, norms, _check_target(model, n0, sparsity), outlier_m, lam)
    mass = _unit_mass(model, units, norms, projs, counts)
    score = mass / units["cost"].to_numpy(dtype=np.float64)
    structural_budget = round(structural_share * budget)
    remove = fit_removals(units, score, structural_budget)
    new_norms = _kept_norms(model, units, remove, norms)
    new_kept = shrink_model(model, units, remove, kept)
    dense_after = non_embedding_params(model)
    structural = n0 - dense_after
    zeros = max(0, budget - structural - zeros_outside_projections(model))
    table = mosaic_prune(model, new_norms, zeros, outlier_m, lam) if zeros > 0 else []
    return MethodResult(
        method="mosaic_composite",
        kept=new_kept,
        dense_nll=nll,
        forward_tokens=int(np.asarray(windows).size),
        basis="nonzero",
        removed=removed_counts(units, remove),
        details={
            "outlier_m": outlier_m,
            "lambda": lam,
            "structural_share": structural_share,
            "structural_params_removed": int(structural),
            "unstructured_zeros": int(zeros),
            "dense_equivalent_non_embedding_params": int(dense_after),
            "nonzero_non_embedding_params": count_nonzero_non_embedding(model),
            "dense_sparsity": structural / n0,
            "allocation": table,
        },
    )
