"""FLAP (An et al., AAAI 2024): fluctuation metric, adaptive global allocation, bias compensation.

- Metric: fluctuation, as `unit_prior(..., "fluctuation")` — the variance over calibration tokens of each
  o_proj/down_proj input feature times the mean squared weight of the column it feeds.
- Allocation (FLAP's AL-AM): per-feature scores are standardised within each module ((s − mean) / std over one
  layer's attention features, likewise over its MLP channels, as FLAP's `standarlization` over the stacked
  [layer, feature] metric does), averaged over each unit's features, then one global cost-aware selection
  removes the lowest standardised scores of all modules until the parameter target is met, so layers and kinds
  lose different shares.
- Bias compensation: a removed feature j of o_proj/down_proj is replaced by its mean over the calibration
  tokens, i.e. W[:, removed] · mean(x[removed]) is added to that projection's bias (created when absent; the
  checkpoint records it per layer in `bonsai_layers[i]["o_bias"/"down_bias"]`). A module that loses every unit
  becomes empty and gets no compensation.
The biases created count towards the size: the removal budget grows by the bias parameters added, recomputed
until it is stable, so the final size lands on the target.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from bonsai.architectures import decoder_layers, head_dim, unit_heads
from bonsai.compensation import compensate_and_shrink
from bonsai.methods.common import MethodResult, check_sizes, global_select, removed_counts, target_removed
from bonsai.prior import ActivationStats, _per_feature_score, collect_activation_stats
from bonsai.units import ATTN, MLP, unit_table


def flap_scores(model: nn.Module, units: pd.DataFrame, stats: ActivationStats) -> np.ndarray:
    """FLAP's order of operations (its `standarlization` over axis 1 of the stacked [layer, feature] metric):
    the fluctuation metric per o_proj/down_proj input feature (as `unit_prior(..., "fluctuation")` computes it),
    standardised over the features of each module ((s − mean) / std, one layer's attention or MLP), then
    averaged over each unit's features (an MLP channel is one feature, a KV group its query heads' features).
    The z-scores of all modules then meet in one global ranking."""
    width = {ATTN: unit_heads(model.config) * head_dim(model.config), MLP: 1}
    z = np.zeros(len(units), dtype=np.float64)
    for (li, kind), rows in units.groupby(["layer", "kind"], sort=True):
        feat = _per_feature_score("fluctuation", stats, (li, kind), _target(model, li, kind).weight)
        std = feat.std() if feat.numel() > 1 else torch.tensor(0.0, dtype=feat.dtype)
        zf = (feat - feat.mean()) / std if std > 0 else torch.zeros_like(feat)
        order = rows.sort_values("index")
        z[order["unit"].to_numpy()] = zf.reshape(len(order), width[kind]).mean(1).numpy()
    return z


def _target(model: nn.Module, li: int, kind: str) -> nn.Linear:
    layer = decoder_layers(model)[li]
    return layer.self_attn.o_proj if kind == ATTN else layer.mlp.down_proj


def _partial_modules(units: pd.DataFrame, remove: np.ndarray):
    """(layer, kind, removed positions) of modules that lose some but not all of their units."""
    for (li, kind), rows in units.groupby(["layer", "kind"], sort=True):
        rows = rows.sort_values("index")
        drop = remove[rows["unit"].to_numpy()]
        if drop.any() and not drop.all():
            yield int(li), kind, rows["index"].to_numpy()[drop]


def added_bias_params(model: nn.Module, units: pd.DataFrame, remove: np.ndarray) -> int:
    """Parameters that compensation adds: one bias per partially pruned o_proj/down_proj that has none."""
    total = 0
    for li, kind, _ in _partial_modules(units, remove):
        lin = _target(model, li, kind)
        total += lin.out_features if lin.bias is None else 0
    return total


def compensation_vectors(
    model: nn.Module, units: pd.DataFrame, remove: np.ndarray, stats: ActivationStats
) -> dict[tuple[int, str], torch.Tensor]:
    """Per partially pruned module: W[:, removed features] · mean(removed features) (float64)."""
    width = {ATTN: unit_heads(model.config) * head_dim(model.config), "mlp": 1}
    out = {}
    for li, kind, positions in _partial_modules(units, remove):
        w = width[kind]
        feats = torch.from_numpy((positions[:, None] * w + np.arange(w)[None, :]).reshape(-1).astype(np.int64))
        weight = _target(model, li, kind).weight.detach().double().cpu()
        out[(li, kind)] = weight[:, feats] @ stats.mean((li, kind))[feats]
    return out


def apply_compensation(model: nn.Module, comp: dict[tuple[int, str], torch.Tensor]) -> None:
    """Add each compensation vector to its projection's bias, creating the bias when absent."""
    for (li, kind), vec in comp.items():
        lin = _target(model, li, kind)
        vec = vec.to(dtype=lin.weight.dtype, device=lin.weight.device)
        with torch.no_grad():
            if lin.bias is None:
                lin.bias = nn.Parameter(vec.clone())
            else:
                lin.bias.add_(vec)


def select(
    model: nn.Module, units: pd.DataFrame, z: np.ndarray, budget: int, n0: int, sparsity: float, compensate: bool
) -> tuple[np.ndarray, int]:
    """Removal mask whose freed parameters minus the compensation biases it creates meet `budget`."""
    extra, seen = 0, set()
    while True:
        remove = global_select(units, z, budget + extra, n0, sparsity)
        new_extra = added_bias_params(model, units, remove) if compensate else 0
        if new_extra == extra or new_extra in seen:
            return remove, new_extra
        seen.add(extra)
        extra = new_extra


def flap(
    model: nn.Module,
    kept: dict,
    windows: np.ndarray,
    *,
    sparsity: float,
    batch_size: int,
    seed: int = 0,
    compensation: str = "bias",
    refit_damping: float | None = None,
) -> MethodResult:
    """`compensation`: ``bias`` (published FLAP, from the score pass's means), ``refit`` (bonsai.compensation's
    least-squares refit in its place) or ``none``."""
    n0, _ = check_sizes(model)
    units = unit_table(model, kept)
    stats, nll = collect_activation_stats(model, windows, batch_size)
    z = flap_scores(model, units, stats)
    remove, extra = select(model, units, z, target_removed(n0, sparsity), n0, sparsity, compensation != "none")
    comp = compensation_vectors(model, units, remove, stats) if compensation == "bias" else {}
    new_kept, comp_tokens = compensate_and_shrink(
        model, units, remove, kept, windows, mode="refit" if compensation == "refit" else "none",
        batch_size=batch_size, damping=refit_damping,
    )
    apply_compensation(model, comp)
    return MethodResult(
        method="flap",
        kept=new_kept,
        dense_nll=nll,
        forward_tokens=int(np.asarray(windows).size) + comp_tokens,
        removed=removed_counts(units, remove),
        details={
            "metric": "fluctuation (standardised per module kind)",
            "compensation": compensation,
            "bias_params_added": int(extra),
        },
    )
