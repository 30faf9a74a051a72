"""Step 1: a per-unit prior importance from one forward pass over the calibration windows.

Forward pre-hooks on o_proj and down_proj accumulate, per input feature, the sum and the sum of squares of the
activations over all tokens. A unit's activation is its block of o_proj inputs (a KV group's query heads) or its
down_proj input channel.
- wanda [default]: RMS over tokens of each feature × mean |W| of the weight column it feeds, averaged over the
  unit's features (for an MLP channel exactly RMS(activation) × mean |column of down|).
- fluctuation (FLAP): activation variance over tokens × mean squared weight of the column, averaged likewise.
- magnitude: mean |W| over every weight the unit owns.
- random: uniform noise from the seed (a baseline).
The same pass also yields the dense model's per-window loss, so the round's baseline costs no extra forward.

`massive_units` flags the units that carry massive activations (Sun et al. 2024, "Massive activations in large
language models"): a few down_proj input channels whose peak magnitude is hundreds of times their module's typical
peak. They act as fixed biases that attention relies on everywhere downstream; removing one collapses the model
however little the removal moves the loss on a handful of windows, so they are never candidates.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from bonsai.architectures import attn_unit_rows, decoder_layers, head_dim, unit_heads
from bonsai.evaluate import window_nll
from bonsai.units import ATTN, MLP

# Rows of a hooked input turned into float64 at a time. Converting a whole batch (tens of MB per projection, two
# projections per layer) made the allocator's heap grow by about the model's size over one pass
# (benchmarks/results/memory.json); chunks of this many rows keep each temporary near one megabyte.
STAT_ROWS = 128


class ActivationStats:
    """Per-feature running sums of the inputs to o_proj and down_proj of every layer (float64)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.sum: dict[tuple[int, str], torch.Tensor] = {}
        self.sumsq: dict[tuple[int, str], torch.Tensor] = {}
        self.absmax: dict[tuple[int, str], torch.Tensor] = {}
        self.tokens = 0
        self._handles = []
        for li, layer in enumerate(decoder_layers(model)):
            for kind, module in (
                (ATTN, getattr(layer.self_attn, "o_proj", None)),
                (MLP, getattr(layer.mlp, "down_proj", None)),
            ):
                if module is not None:
                    self._handles.append(module.register_forward_pre_hook(self._hook((li, kind))))

    def _hook(self, key):
        def pre_hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if key not in self.sum:
                self.sum[key] = torch.zeros(x.shape[-1], dtype=torch.float64)
                self.sumsq[key] = torch.zeros(x.shape[-1], dtype=torch.float64)
                self.absmax[key] = torch.zeros(x.shape[-1], dtype=torch.float64)
            for rows in x.split(STAT_ROWS):
                rows = rows.double()
                self.sum[key] += rows.sum(0).cpu()
                self.sumsq[key] += (rows * rows).sum(0).cpu()
                torch.maximum(self.absmax[key], rows.abs().amax(0).cpu(), out=self.absmax[key])

        return pre_hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def mean(self, key) -> torch.Tensor:
        return self.sum[key] / self.tokens

    def mean_square(self, key) -> torch.Tensor:
        return self.sumsq[key] / self.tokens


def collect_activation_stats(
    model: nn.Module, windows: np.ndarray, batch_size: int
) -> tuple[ActivationStats, np.ndarray]:
    """One dense pass: activation statistics and the per-window mean NLL of the dense model."""
    stats = ActivationStats(model)
    try:
        nll = window_nll(model, windows, batch_size=batch_size, desc="prior pass")
    finally:
        stats.remove()
    stats.tokens = int(np.prod(np.asarray(windows).shape))  # every hooked projection sees each token once
    return stats, nll


# A feature is massive when its peak |activation| over the calibration tokens is this many times the median peak
# of its projection's inputs (the paper reports ~1,000x; ordinary outlier features stay within ~10-70x).
MASSIVE_FACTOR = 100.0


def massive_units(model: nn.Module, units: pd.DataFrame, stats: ActivationStats) -> np.ndarray:
    """Bool per unit: some feature of the unit has a peak |activation| >= MASSIVE_FACTOR x its module's median."""
    width = {ATTN: unit_heads(model.config) * head_dim(model.config), MLP: 1}
    out = np.zeros(len(units), dtype=bool)
    for (li, kind), rows in units.groupby(["layer", "kind"], sort=True):
        peak = stats.absmax[(li, kind)]
        massive = peak >= MASSIVE_FACTOR * peak.median().clamp_min(torch.finfo(torch.float64).tiny)
        order = rows.sort_values("index")
        out[order["unit"].to_numpy()] = massive.reshape(len(order), width[kind]).any(1).numpy()
    return out


def _per_feature_score(method: str, stats: ActivationStats, key, weight_cols: torch.Tensor) -> torch.Tensor:
    """Score of each input feature of o_proj/down_proj; weight_cols is W (out × in) of that projection."""
    w = weight_cols.detach().double().cpu()
    if method == "wanda":
        return stats.mean_square(key).sqrt() * w.abs().mean(0)
    var = (stats.mean_square(key) - stats.mean(key) ** 2).clamp_min(0)
    return var * (w * w).mean(0)


def unit_prior(
    model: nn.Module, units: pd.DataFrame, method: str, *, stats: ActivationStats | None, seed: int
) -> np.ndarray:
    """Prior importance per row of the unit table (higher = more important)."""
    if method == "random":
        return np.random.default_rng(seed).random(len(units))
    layers = decoder_layers(model)
    width = {ATTN: unit_heads(model.config) * head_dim(model.config), MLP: 1}
    prior = np.zeros(len(units), dtype=np.float64)
    for (li, kind), rows in units.groupby(["layer", "kind"], sort=True):
        layer = layers[li]
        order = rows.sort_values("index")
        if method == "magnitude":
            scores = _magnitude(layer, kind, len(order), attn_unit_rows(model.config))
        else:
            if stats is None:
                raise ValueError(f"prior {method!r} needs activation statistics")
            proj = layer.self_attn.o_proj if kind == ATTN else layer.mlp.down_proj
            feat = _per_feature_score(method, stats, (li, kind), proj.weight)
            scores = feat.reshape(len(order), width[kind]).mean(1).numpy()
        prior[order["unit"].to_numpy()] = scores
    return prior


def _magnitude(layer: nn.Module, kind: str, n: int, owned_rows: tuple[str, ...]) -> np.ndarray:
    if kind == ATTN:
        a = layer.self_attn
        owned = [getattr(a, name).weight.detach() for name in owned_rows]
        total = sum(w.abs().double().reshape(n, -1).sum(1) for w in owned)
        total = total + a.o_proj.weight.detach().abs().double().T.reshape(n, -1).sum(1)
        count = (sum(w.numel() for w in owned) + a.o_proj.weight.numel()) // n
        return (total / count).numpy()
    m = layer.mlp
    total = (
        m.gate_proj.weight.detach().abs().double().sum(1)
        + m.up_proj.weight.detach().abs().double().sum(1)
        + m.down_proj.weight.detach().abs().double().sum(0)
    )
    return (total / (3 * m.gate_proj.in_features)).numpy()
