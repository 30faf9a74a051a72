"""LLM-Pruner (Ma et al., NeurIPS 2023), first-order Taylor importance per group — it uses backprop on purpose.

Gradients of the calibration loss (mean next-token NLL per window, averaged over windows) are accumulated over
the calibration windows with one backward pass per batch. A weight's importance is |w · ∂L/∂w|; a unit's is
the sum over every weight it owns (a KV group: its rows of q/k/v and columns of o, biases of q/k/v included;
an MLP channel: its rows of gate/up and column of down). Selection is global and cost-aware: units are removed
in order of importance per owned parameter (the estimated loss increase per parameter freed) until the target.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bonsai.architectures import decoder_layers, group_size, head_dim
from bonsai.evaluate import _as_windows
from bonsai.methods.common import (
    MethodResult,
    check_sizes,
    global_select,
    per_cost,
    projections,
    removed_counts,
    target_removed,
)
from bonsai.shrink import shrink_model
from bonsai.units import ATTN, unit_table


def accumulate_gradients(model: nn.Module, windows: np.ndarray, batch_size: int) -> tuple[np.ndarray, int]:
    """Gradients of the mean calibration loss on every projection (in `.grad`); per-window NLL, backward count."""
    ids = _as_windows(windows)
    n = ids.shape[0]
    params = [lin.weight for _, _, lin in projections(model)]
    params += [lin.bias for _, _, lin in projections(model) if lin.bias is not None]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    wanted = {id(p) for p in params}
    training = model.training
    nll = np.zeros(n, dtype=np.float64)
    passes = 0
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        device = next(model.parameters()).device
        for start in range(0, n, batch_size):
            batch = ids[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            per_token = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
            ).reshape(batch.shape[0], -1)
            per_window = per_token.mean(1)
            nll[start : start + batch.shape[0]] = per_window.detach().double().cpu().numpy()
            (per_window.sum() / n).backward()
            passes += 1
            del logits, per_token, per_window
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.train(training)
    return nll, passes


def taylor_unit_importance(model: nn.Module, units) -> np.ndarray:
    """Σ |w · g| over each unit's weights, from the `.grad` left by `accumulate_gradients`."""
    hd, gs = head_dim(model.config), group_size(model.config)
    layers = decoder_layers(model)
    out = np.zeros(len(units), dtype=np.float64)

    def salience(p: torch.Tensor | None) -> torch.Tensor | None:
        if p is None or p.grad is None:
            return None
        return (p.detach().double() * p.grad.detach().double()).abs().cpu()

    for (li, kind), rows in units.groupby(["layer", "kind"], sort=True):
        order = rows.sort_values("index")
        n = len(order)
        if kind == ATTN:
            a = layers[li].self_attn
            total = torch.zeros(n, dtype=torch.float64)
            for lin in (a.q_proj, a.k_proj, a.v_proj):
                total += salience(lin.weight).reshape(n, -1).sum(1)
                if lin.bias is not None:
                    total += salience(lin.bias).reshape(n, -1).sum(1)
            total += salience(a.o_proj.weight).T.reshape(n, gs * hd, -1).sum((1, 2))
        else:
            m = layers[li].mlp
            total = (
                salience(m.gate_proj.weight).sum(1)
                + salience(m.up_proj.weight).sum(1)
                + salience(m.down_proj.weight).sum(0)
            )
            for lin in (m.gate_proj, m.up_proj):
                if lin.bias is not None:
                    total += salience(lin.bias)
        out[order["unit"].to_numpy()] = total.numpy()
    return out


def clear_gradients(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def llm_pruner(
    model: nn.Module, kept: dict, windows: np.ndarray, *, sparsity: float, batch_size: int, seed: int = 0
) -> MethodResult:
    n0, _ = check_sizes(model)
    units = unit_table(model, kept)
    nll, passes = accumulate_gradients(model, windows, batch_size)
    try:
        importance = taylor_unit_importance(model, units)
    finally:
        clear_gradients(model)
    remove = global_select(units, per_cost(units, importance), target_removed(n0, sparsity), n0, sparsity)
    new_kept = shrink_model(model, units, remove, kept)
    return MethodResult(
        method="llm_pruner",
        kept=new_kept,
        dense_nll=nll,
        forward_tokens=int(np.asarray(windows).size),
        backward_passes=passes,
        removed=removed_counts(units, remove),
        details={"importance": "first-order Taylor, sum of |w * dL/dw| per unit, ranked per owned parameter"},
    )
