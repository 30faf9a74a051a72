"""Weight compensation after a structured removal: the kept columns of o_proj / down_proj take over what the
removed units contributed, from forward passes only.

A unit's contribution reaches the residual stream through its columns of o_proj (a KV group's query-head
features) or down_proj (an MLP channel). With x the input of such a projection over calibration tokens and
x̃ = [x; 1], the module computes y = [W, b] x̃. Removing features R keeps K; the compensated weights W' over
K' = K ∪ {bias} minimise

    E‖[W, b] x̃ − W' x̃_K'‖² + λ‖W' − [W, b]_K'‖²,   so   W' = [W, b]_K' + [W, b]_R A_RK' (A_K'K' + λI)⁻¹,

where A = E[x̃ x̃ᵀ] is the input's second-moment matrix (its last row/column the feature means). Modes:
- ``refit``: that least-squares solution, λ = damping × mean diagonal of A_KK (the OBS/SlimGPT-style update;
  the ridge pulls towards the current weights, so removing nothing returns them exactly). The damping is
  cross-validated per projection unless fixed: the calibration windows fall into two folds (even / odd index),
  each grid value is fitted on one fold and scored by the output error it leaves on the other, and the best is
  refitted on both. Few tokens for many features (a wide down_proj, a small calibration set) then get a strong
  ridge, plenty of tokens a weak one, with no constant tuned to one model;
- ``bias``: only the bias moves, b' = b + W_R E[x_R] (FLAP's bias compensation: a removed feature is replaced
  by its mean);
- ``none``: no change.

A bias is created on a projection that had none (the checkpoint records it per layer). A module that loses every
unit is removed whole (bonsai.shrink) and gets no compensation.

The second moments come from one hooked forward pass per group of layers. Layers are compensated group by group,
first to last, each group's statistics read from a model whose earlier groups are already pruned and
compensated, so a group also absorbs what the groups before it changed; the group size is chosen so that the
accumulators of one group fit `max_bytes`. A pass does not start at the embeddings: it starts from the cached
inputs of the previous group's first layer (the previous group, now compensated, is run again to produce this
group's inputs), so all groups together cost about two passes through the layers whatever their number, and the
memory budget can stay small.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from bonsai.architectures import decoder_layers, head_dim, unit_heads
from bonsai.config import COMPENSATIONS
from bonsai.shrink import shrink_model
from bonsai.units import ATTN

# Ridge strengths tried when the damping is cross-validated, relative to the kept inputs' mean second moment.
DAMPING_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
# The statistics accumulators of one group of layers may take this share of the model's own parameter bytes (a
# group holds at least one layer whatever the budget).
MEMORY_SHARE = 0.1


def target_projection(model: nn.Module, layer: int, kind: str) -> nn.Linear:
    """The projection through which a module's units reach the residual stream (o_proj / down_proj)."""
    block = decoder_layers(model)[layer]
    return block.self_attn.o_proj if kind == ATTN else block.mlp.down_proj


def unit_width(model: nn.Module, kind: str) -> int:
    """Input features of o_proj / down_proj per unit: a KV group's query-head features, or one channel."""
    return unit_heads(model.config) * head_dim(model.config) if kind == ATTN else 1


class SecondMoments:
    """Forward pre-hooks accumulating E[x̃ x̃ᵀ] (x̃ = [x; 1]) of the inputs of chosen projections (float32 sums,
    solved in float64), in two folds: the windows of even and of odd index (`offset` = the index of the batch's
    first window, set by the caller before each batch). `moments(key)` is the ((d+1) × (d+1)) matrix over every
    token, `fold_moments(key)` the two folds' own, from which a damping is cross-validated."""

    def __init__(self, model: nn.Module, keys: list[tuple[int, str]]):
        self._sums: dict[tuple[int, str], list[torch.Tensor]] = {}
        self._tokens: dict[tuple[int, str], list[int]] = {}
        self.offset = 0
        self._handles = [
            target_projection(model, li, kind).register_forward_pre_hook(self._hook((li, kind))) for li, kind in keys
        ]

    def _hook(self, key):
        def pre_hook(_module, args):
            x = args[0].detach().float()  # (batch, seq, d)
            x = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)], dim=-1)
            sums = self._sums.setdefault(key, [None, None])
            tokens = self._tokens.setdefault(key, [0, 0])
            for fold in (0, 1):
                rows = x[(self.offset + fold) % 2 :: 2].reshape(-1, x.shape[-1])
                if not len(rows):
                    continue
                gram = (rows.T @ rows).cpu()
                sums[fold] = gram if sums[fold] is None else sums[fold].add_(gram)
                tokens[fold] += rows.shape[0]

        return pre_hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def moments(self, key) -> torch.Tensor:
        sums = [g for g in self._sums[key] if g is not None]
        return sum(g.double() for g in sums) / sum(self._tokens[key])

    def fold_moments(self, key) -> list[torch.Tensor]:
        """The two folds' moments; fewer than two when the windows were too few to split."""
        return [g.double() / n for g, n in zip(self._sums[key], self._tokens[key], strict=True) if g is not None]


def _refit_delta(wb: torch.Tensor, keep_aug: torch.Tensor, moments: torch.Tensor, lams) -> list[torch.Tensor]:
    """The least-squares update of the kept columns (|K'| of them) for each ridge λ in `lams` (absolute): one
    Cholesky solve per λ (a few times cheaper than one eigendecomposition shared by all of them)."""
    removed = torch.cat([~keep_aug[:-1], torch.tensor([False])])
    a_kk = moments[keep_aug][:, keep_aug]
    rhs = wb[:, removed] @ moments[removed][:, keep_aug]  # (out × |K'|): the removed features seen through K'
    eye = torch.eye(a_kk.shape[0], dtype=a_kk.dtype)
    out = []
    for lam in lams:
        factor, info = torch.linalg.cholesky_ex(a_kk + lam * eye)
        if info:  # not positive definite in floating point (λ tiny against a huge diagonal): solve it directly
            out.append(torch.linalg.solve(a_kk + lam * eye, rhs.T).T)
        else:
            out.append(torch.cholesky_solve(rhs.T, factor).T)
    return out


def _held_out_error(wb: torch.Tensor, keep_aug: torch.Tensor, delta: torch.Tensor, moments: torch.Tensor) -> float:
    """E‖[W, b] x̃ − W' x̃_K'‖² over the tokens `moments` summarise, W' = [W, b]_K' + delta."""
    diff = wb.clone()
    diff[:, keep_aug] = -delta  # the kept part differs by the update; the removed part is all of it
    return float(((diff @ moments) * diff).sum())


def compensated_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    keep: torch.Tensor,
    moments: torch.Tensor,
    mode: str,
    damping: float | None = None,
    folds: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W' over the kept input features, b') for one projection; float64. `keep` is a bool per input feature,
    `moments` the (d+1) × (d+1) second moments of [x; 1] (module docstring). A `damping` of None is
    cross-validated: each of DAMPING_GRID is fitted on one fold of `folds` and scored by the output error on the
    other, and the one with the least total error is refitted on all of `moments`."""
    if mode not in COMPENSATIONS:
        raise ValueError(f"unknown compensation {mode!r}; choose one of {', '.join(COMPENSATIONS)}")
    w = weight.detach().double().cpu()
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.detach().double().cpu()
    removed = ~keep
    if mode == "none" or not removed.any():
        return w[:, keep], b
    mean = moments[:-1, -1]
    if mode == "bias":
        return w[:, keep], b + w[:, removed] @ mean[removed]
    keep_aug = torch.cat([keep, torch.tensor([True])])  # K' = kept features and the constant
    wb = torch.cat([w, b[:, None]], dim=1)
    if damping is None:
        damping = cross_validated_damping(wb, keep_aug, folds)
    (delta,) = _refit_delta(wb, keep_aug, moments, [damping * _ridge_scale(moments, keep_aug)])
    new = wb[:, keep_aug] + delta
    return new[:, :-1], new[:, -1]


def _ridge_scale(moments: torch.Tensor, keep_aug: torch.Tensor) -> float:
    """λ is relative to the kept features' mean second moment (1 when no feature is kept: only the constant)."""
    diag = torch.diagonal(moments)[:-1][keep_aug[:-1]]
    return float(diag.mean()) if len(diag) else 1.0


def cross_validated_damping(wb: torch.Tensor, keep_aug: torch.Tensor, folds: list[torch.Tensor] | None) -> float:
    """The DAMPING_GRID value whose refit, fitted on one fold's moments, leaves the least output error on the
    other fold's (summed over both directions). `wb` = [W, b]; `keep_aug` = kept features and the constant."""
    if folds is None or len(folds) < 2:
        raise ValueError("a cross-validated damping needs the moments of two folds (two or more windows)")
    errors = torch.zeros(len(DAMPING_GRID), dtype=torch.float64)
    for fit, held in ((folds[0], folds[1]), (folds[1], folds[0])):
        deltas = _refit_delta(wb, keep_aug, fit, [d * _ridge_scale(fit, keep_aug) for d in DAMPING_GRID])
        errors += torch.tensor([_held_out_error(wb, keep_aug, dl, held) for dl in deltas])
    return DAMPING_GRID[int(torch.argmin(errors))]


def _set_projection(model: nn.Module, layer: int, kind: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Write compensated (already sliced) weights and a bias into the module's projection."""
    lin = target_projection(model, layer, kind)
    dtype, device = lin.weight.dtype, lin.weight.device
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=True, dtype=dtype, device="meta")
    new.weight = nn.Parameter(weight.to(dtype=dtype, device=device).contiguous(), requires_grad=False)
    new.bias = nn.Parameter(bias.to(dtype=dtype, device=device).contiguous(), requires_grad=False)
    parent = decoder_layers(model)[layer].self_attn if kind == ATTN else decoder_layers(model)[layer].mlp
    setattr(parent, "o_proj" if kind == ATTN else "down_proj", new)


def _touched_modules(units: pd.DataFrame, remove: np.ndarray) -> dict[tuple[int, str], np.ndarray]:
    """(layer, kind) -> keep per unit (in index order) for modules that lose some but not all units."""
    out = {}
    for (li, kind), rows in units.groupby(["layer", "kind"], sort=True):
        rows = rows.sort_values("index")
        drop = remove[rows["unit"].to_numpy()]
        if drop.any() and not drop.all():
            out[(int(li), kind)] = ~drop
    return out


def _layer_groups(model: nn.Module, layers: list[int], touched, max_bytes: int) -> list[list[int]]:
    """Consecutive layers in groups whose float32 accumulators (touched modules only) fit `max_bytes`."""
    groups: list[list[int]] = []
    size = 0
    for li in sorted(layers):
        # two folds of float32 sums per touched projection
        need = sum(2 * (target_projection(model, *k).in_features + 1) ** 2 * 4 for k in touched if k[0] == li)
        if groups and size + need <= max_bytes:
            groups[-1].append(li)
            size += need
        else:
            groups.append([li])
            size = need
    return groups


class _StopForward(Exception):
    pass


class _LayerInputs:
    """The hidden states entering decoder layer `layer`, one tensor per batch of the statistics windows: a pass that
    starts there skips every layer before it (they return the cached states instead of computing)."""

    def __init__(self, layer: int):
        self.layer = layer
        self.batches: list[torch.Tensor] = []


def _statistics_pass(
    model: nn.Module,
    windows: np.ndarray,
    batch_size: int,
    last_layer: int,
    moments: SecondMoments,
    start: _LayerInputs | None,
    capture_at: int,
) -> _LayerInputs:
    """Run the windows through decoder layers from `start.layer` (its cached inputs; from the embeddings without
    them) to `last_layer`, the rest not being needed; return the inputs of layer `capture_at` for the next pass."""
    layers = decoder_layers(model)
    captured = _LayerInputs(capture_at)
    batch_index = [0]

    def stop(*_):
        raise _StopForward

    def capture(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.batches.append(hidden.detach().clone())

    handles = [layers[last_layer].register_forward_hook(stop),
               layers[capture_at].register_forward_pre_hook(capture, with_kwargs=True)]
    skipped = range(start.layer) if start is not None else range(0)
    for li in skipped:  # the layer before the start hands over the cached states, earlier ones pass them on
        if li == start.layer - 1:
            layers[li].forward = lambda hidden_states, *a, **k: start.batches[batch_index[0]]
        else:
            layers[li].forward = lambda hidden_states, *a, **k: hidden_states
    ids = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for b, first in enumerate(range(0, len(ids), batch_size)):
                moments.offset, batch_index[0] = first, b
                try:
                    model(input_ids=ids[first : first + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
        for li in skipped:
            del layers[li].forward  # back to the class's forward
    return captured


def grows_params(model: nn.Module, units: pd.DataFrame, remove: np.ndarray, mode: str) -> int:
    """Parameters that compensation adds: a bias on every partially pruned projection that has none."""
    if mode == "none":
        return 0
    return sum(
        target_projection(model, li, kind).out_features
        for li, kind in _touched_modules(units, remove)
        if target_projection(model, li, kind).bias is None
    )


def compensate_and_shrink(
    model: nn.Module,
    units: pd.DataFrame,
    remove: np.ndarray,
    kept: dict[str, list[list[int]]],
    windows: np.ndarray,
    *,
    mode: str,
    batch_size: int = 8,
    damping: float | None = None,
    max_bytes: int | None = None,
) -> tuple[dict[str, list[list[int]]], int]:
    """Remove the flagged units (as `shrink_model`) and compensate the kept o_proj / down_proj columns.

    Returns the updated `kept` record and the forward tokens the statistics passes cost (0 for ``none``), each
    pass counted for the share of the decoder layers it runs: a pass through layers a..b of L counts (b-a+1)/L of
    its tokens."""
    if mode not in COMPENSATIONS:
        raise ValueError(f"unknown compensation {mode!r}; choose one of {', '.join(COMPENSATIONS)}")
    touched = _touched_modules(units, remove)
    if mode == "none" or not touched:
        return shrink_model(model, units, remove, kept), 0
    if max_bytes is None:
        max_bytes = int(MEMORY_SHARE * sum(p.numel() * p.element_size() for p in model.parameters()))
    tokens = 0
    layer_of = units["layer"].to_numpy()
    n_layers = len(decoder_layers(model))
    new_kept = kept
    inputs = None  # inputs of the previous group's first layer: the next pass starts there
    for group in _layer_groups(model, sorted(set(layer_of[remove].tolist())), touched, max_bytes):
        keys = [k for k in touched if k[0] in group]
        solved = {}
        if keys:
            first = 0 if inputs is None else inputs.layer
            moments = SecondMoments(model, keys)
            try:
                inputs = _statistics_pass(model, windows, batch_size, max(group), moments, inputs, min(group))
            finally:
                moments.remove()
            tokens += int(np.asarray(windows).size) * (max(group) + 1 - first) // n_layers
            for li, kind in keys:
                lin = target_projection(model, li, kind)
                keep = torch.from_numpy(np.repeat(touched[(li, kind)], unit_width(model, kind)))
                solved[(li, kind)] = compensated_weights(
                    lin.weight, lin.bias, keep, moments.moments((li, kind)), mode, damping,
                    moments.fold_moments((li, kind)),
                )
            del moments
        # slice the group's layers (q/k/v, gate/up and the projections' columns), then set the solved projections:
        # the next group's statistics see this group pruned and compensated
        new_kept = shrink_model(model, units, remove & np.isin(layer_of, group), new_kept)
        for (li, kind), (weight, bias) in solved.items():
            _set_projection(model, li, kind, weight, bias)
    return new_kept, tokens
