"""ShortGPT (Men et al. 2024): remove whole layers with the lowest block influence.

Block influence of layer i: BI_i = 1 − mean over calibration tokens of cos(h_in, h_out), the cosine similarity
of the hidden state entering and leaving the layer. A removed layer loses its attention and its MLP entirely
(all units: EmptyAttention / EmptyMLP, which add nothing to the residual stream); its layer norms stay.

Rule to land on the target (±0.5 pt): whole layers are removed in increasing BI while a whole layer still fits
in the remaining budget. The first layer that would overshoot is pruned only partly — channel-level removal of
its units (attention KV groups and MLP channels) with the lowest Wanda score (`unit_prior(..., "wanda")`, from
the same calibration pass), cost-aware, up to the remaining budget; only if its units are too coarse to come
within half the cheapest unit of the budget does the finishing go on into the next layers in BI order.
Layers with no unit left are skipped.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bonsai.architectures import decoder_layers
from bonsai.evaluate import window_nll
from bonsai.methods.common import (
    MethodResult,
    check_sizes,
    fit_removals,
    freed_params,
    removed_counts,
    target_removed,
)
from bonsai.prior import ActivationStats, unit_prior
from bonsai.selection import check_reachable, removable_params
from bonsai.shrink import shrink_model
from bonsai.units import unit_table


class BlockInfluence:
    """Forward hooks on every decoder layer accumulating Σ cos(h_in, h_out) over tokens (float64)."""

    def __init__(self, model: nn.Module):
        layers = decoder_layers(model)
        self.cos_sum = np.zeros(len(layers), dtype=np.float64)
        self.tokens = np.zeros(len(layers), dtype=np.int64)
        self._handles = [
            layer.register_forward_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers)
        ]

    def _hook(self, i: int):
        def hook(_module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            a = h_in.detach().reshape(-1, h_in.shape[-1]).double()
            b = h_out.detach().reshape(-1, h_out.shape[-1]).double()
            self.cos_sum[i] += torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).sum().item()
            self.tokens[i] += a.shape[0]

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def influence(self) -> np.ndarray:
        return 1.0 - self.cos_sum / np.maximum(self.tokens, 1)


def layer_plan(units, bi: np.ndarray, wanda: np.ndarray, budget: int) -> tuple[np.ndarray, list[int], list[int]]:
    """(remove mask, whole layers removed in order, layers pruned only partly)."""
    remove = np.zeros(len(units), dtype=bool)
    removed, whole, partial = 0, [], []
    layer_ids = units["layer"].to_numpy()
    tol = int(units["cost"].min()) // 2 if len(units) else 0
    for li in sorted(set(layer_ids.tolist()), key=lambda i: (bi[i], i)):
        if budget - removed <= tol:
            break
        rows = units[layer_ids == li]
        cost = removable_params(rows)
        if not partial and removed + cost <= budget + tol:
            remove[rows["unit"].to_numpy()] = True
            removed += cost
            whole.append(int(li))
            continue
        # finishing: channel-level removal inside the layer that would overshoot (and, should its units be too
        # coarse to land within half the cheapest unit, inside the next layers in BI order)
        local = rows.reset_index(drop=True).assign(unit=np.arange(len(rows)))
        part = fit_removals(local, wanda[rows["unit"].to_numpy()], budget - removed)
        if part.any():
            remove[rows["unit"].to_numpy()[part]] = True
            removed += freed_params(local, part)
            partial.append(int(li))
    return remove, whole, partial


def shortgpt(
    model: nn.Module, kept: dict, windows: np.ndarray, *, sparsity: float, batch_size: int, seed: int = 0
) -> MethodResult:
    n0, _ = check_sizes(model)
    units = unit_table(model, kept)
    check_reachable(removable_params(units), 0, n0, sparsity)
    stats, blocks = ActivationStats(model), BlockInfluence(model)
    try:
        nll = window_nll(model, windows, batch_size=batch_size, desc="calibration pass")
    finally:
        stats.remove()
        blocks.remove()
    stats.tokens = int(np.asarray(windows).size)
    bi = blocks.influence()
    wanda = unit_prior(model, units, "wanda", stats=stats, seed=seed)
    remove, whole, partial = layer_plan(units, bi, wanda, target_removed(n0, sparsity))
    new_kept = shrink_model(model, units, remove, kept)
    return MethodResult(
        method="shortgpt",
        kept=new_kept,
        dense_nll=nll,
        forward_tokens=int(np.asarray(windows).size),
        removed=removed_counts(units, remove),
        details={
            "block_influence": [float(x) for x in bi],
            "removed_layers": whole,
            "partly_pruned_layers": partial,
        },
    )
