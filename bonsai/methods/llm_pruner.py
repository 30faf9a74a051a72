"""LLM-Pruner (Ma et al., NeurIPS 2023), first-order Taylor importance per group — it uses backprop on purpose.

Gradients of the calibration loss (mean next-token NLL per window, averaged over windows) are accumulated over
the calibration windows with one backward pass per batch. A weight's importance is |w · ∂L/∂w|; a unit's is
the sum over every weight it owns (a KV group: its rows of q/k/v and columns of o, biases of q/k/v included;
an MLP channel: its rows of gate/up and column of down). Selection is global and cost-aware: units are removed
in order of importance per owned parameter (the estimated loss increase per parameter freed) until the target.

As in LLM-Pruner, the first and last decoder layers are not pruned: they are the most sensitive, and the paper's
scripts (horseee/LLM-Pruner, `--block_*_layer_start 4 --block_*_layer_end 30` on the 32 layers of LLaMA-7B)
keep the first four and the last two. `protected_layers` scales that share (4/32 and 2/32, at least one layer
each) to the model's depth; the other layers are pruned more so that the whole model still reaches the target,
and a target the unprotected layers cannot carry is refused.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bonsai.architectures import attn_unit_rows, decoder_layers, head_dim, unit_heads
from bonsai.compensation import compensate_and_shrink
from bonsai.errors import BonsaiError
from bonsai.evaluate import _as_windows
from bonsai.methods.common import (
    MethodResult,
    check_sizes,
    per_cost,
    projections,
    removed_counts,
    target_removed,
)
from bonsai.selection import removable_params, select_removals
from bonsai.units import ATTN, unit_table

# LLM-Pruner's setting on LLaMA-7B: of 32 layers, the first 4 and the last 2 are left alone
PAPER_FIRST, PAPER_LAST, PAPER_LAYERS = 4, 2, 32


def protected_layers(n_layers: int, first: int | None = None, last: int | None = None) -> tuple[int, int]:
    """How many leading and trailing layers stay unpruned: given, or the paper's share scaled to `n_layers`
    (at least one each)."""
    if first is None:
        first = max(1, round(n_layers * PAPER_FIRST / PAPER_LAYERS))
    if last is None:
        last = max(1, round(n_layers * PAPER_LAST / PAPER_LAYERS))
    if first < 0 or last < 0:
        raise BonsaiError(f"protected layer counts must be >= 0, got first={first}, last={last}")
    return first, last


def accumulate_gradients(
    model: nn.Module, windows: np.ndarray, batch_size: int, layers: set[int] | None = None
) -> tuple[np.ndarray, int]:
    """Gradients of the mean calibration loss on the projections of `layers` (None: all) in `.grad`; per-window
    NLL, backward count. Only those parameters require grad, so the backward pass stops at the first of them."""
    ids = _as_windows(windows)
    n = ids.shape[0]
    lins = [lin for li, _, lin in projections(model) if layers is None or li in layers]
    params = [lin.weight for lin in lins] + [lin.bias for lin in lins if lin.bias is not None]
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


def taylor_unit_importance(model: nn.Module, units, only_layers: set[int] | None = None) -> np.ndarray:
    """Σ |w · g| over each unit's weights, from the `.grad` left by `accumulate_gradients`; NaN for units of
    layers outside `only_layers` (they have no gradients)."""
    hd, uh = head_dim(model.config), unit_heads(model.config)
    owned_rows = attn_unit_rows(model.config)
    layers = decoder_layers(model)
    out = np.full(len(units), np.nan, dtype=np.float64)

    def salience(p: torch.Tensor | None) -> torch.Tensor | None:
        if p is None or p.grad is None:
            return None
        return (p.detach().double() * p.grad.detach().double()).abs().cpu()

    for (li, kind), rows in units.groupby(["layer", "kind"], sort=True):
        if only_layers is not None and li not in only_layers:
            continue
        order = rows.sort_values("index")
        n = len(order)
        if kind == ATTN:
            a = layers[li].self_attn
            total = torch.zeros(n, dtype=torch.float64)
            for lin in (getattr(a, name) for name in owned_rows):
                total += salience(lin.weight).reshape(n, -1).sum(1)
                if lin.bias is not None:
                    total += salience(lin.bias).reshape(n, -1).sum(1)
            total += salience(a.o_proj.weight).T.reshape(n, uh * hd, -1).sum((1, 2))
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


def check_protected_reachable(
    units, n0: int, sparsity: float, eligible: np.ndarray, first: int, last: int, n_layers: int
) -> None:
    """Refuse a target that the unprotected layers cannot carry without being emptied completely."""
    carry = removable_params(units[eligible]) if eligible.any() else 0
    if target_removed(n0, sparsity) >= carry:
        raise BonsaiError(
            f"llm_pruner keeps the first {first} and last {last} of {n_layers} layers unpruned (as LLM-Pruner does); "
            f"the other layers hold {carry / n0:.1%} of the non-embedding parameters, so sparsity {sparsity:g} "
            f"cannot be reached; choose a sparsity below {carry / n0:.3f}"
        )


def llm_pruner(
    model: nn.Module,
    kept: dict,
    windows: np.ndarray,
    *,
    sparsity: float,
    batch_size: int,
    seed: int = 0,
    protect_first: int | None = None,
    protect_last: int | None = None,
    compensation: str = "none",
    refit_damping: float | None = None,
) -> MethodResult:
    """`protect_first` / `protect_last`: leading / trailing layers left unpruned (None: the paper's share)."""
    n0, _ = check_sizes(model)
    units = unit_table(model, kept)
    n_layers = len(decoder_layers(model))
    first, last = protected_layers(n_layers, protect_first, protect_last)
    pruned_layers = set(range(first, n_layers - last))
    eligible = units["layer"].isin(pruned_layers).to_numpy()
    check_protected_reachable(units, n0, sparsity, eligible, first, last, n_layers)
    nll, passes = accumulate_gradients(model, windows, batch_size, pruned_layers)
    try:
        importance = taylor_unit_importance(model, units, pruned_layers)
    finally:
        clear_gradients(model)
    budget = target_removed(n0, sparsity)
    remove = select_removals(units, per_cost(units, importance), eligible, budget)
    new_kept, comp_tokens = compensate_and_shrink(
        model, units, remove, kept, windows, mode=compensation, batch_size=batch_size, damping=refit_damping
    )
    return MethodResult(
        method="llm_pruner",
        kept=new_kept,
        dense_nll=nll,
        forward_tokens=int(np.asarray(windows).size) + comp_tokens,
        backward_passes=passes,
        removed=removed_counts(units, remove),
        details={
            "importance": "first-order Taylor, sum of |w * dL/dw| per unit, ranked per owned parameter",
            "protected_layers": sorted(set(range(n_layers)) - pruned_layers),
        },
    )
