"""2:4 semi-structured Wanda: in every group of 4 consecutive input weights of every row of every
q/k/v/o/gate/up/down, keep the 2 with the largest |W| · ‖X‖ and zero the other 2 (the pattern sparse tensor
cores accelerate). The parameter count is unchanged; the zeros are stored densely. Exactly half of the
projection weights go whatever the target, so the prune flow asks for sparsity 0.5 and checks the projection
sparsity (the non-embedding sparsity is a little lower: norms are never pruned). A row length not divisible
by 4 leaves its last (in_features mod 4) weights dense."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bonsai.methods.common import MethodResult, check_sizes, collect_projection_norms, projections, wanda_scores


def mask_2_of_4(scores: torch.Tensor) -> torch.Tensor:
    """Bool mask (True = zero) of the 2 lowest scores in each group of 4 consecutive columns."""
    rows, cols = scores.shape
    full = cols - cols % 4
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if full:
        groups = scores[:, :full].reshape(rows, full // 4, 4)
        low = torch.sort(groups, dim=-1, stable=True).indices[..., :2]
        mask[:, :full] = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, low, True).reshape(rows, full)
    return mask


def sparse24(
    model: nn.Module, kept: dict, windows: np.ndarray, *, sparsity: float = 0.5, batch_size: int, seed: int = 0
) -> MethodResult:
    check_sizes(model)
    norms, nll = collect_projection_norms(model, windows, batch_size)
    zeroed, total, dense_tails = 0, 0, 0
    for li, name, lin in projections(model):
        mask = mask_2_of_4(wanda_scores(lin, norms[(li, name)]))
        with torch.no_grad():
            lin.weight.masked_fill_(mask.to(lin.weight.device), 0.0)
        zeroed += int(mask.sum())
        total += lin.weight.numel()
        dense_tails += lin.in_features % 4 * lin.out_features
    return MethodResult(
        method="sparse24",
        kept={k: [list(v) for v in per_layer] for k, per_layer in kept.items()},
        dense_nll=nll,
        forward_tokens=int(np.asarray(windows).size),
        basis="nonzero",
        details={
            "pattern": "2:4 along the input dimension, Wanda score",
            "projection_sparsity": zeroed / total,
            "zeroed_weights": zeroed,
            "dense_tail_weights": dense_tails,
        },
    )
