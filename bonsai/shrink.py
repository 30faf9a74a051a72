"""Step 7: physically slice the removed units out of the weights, so the model really gets smaller.

Attention loses whole KV groups (rows of q/k/v, columns of o); the MLP loses channels (rows of gate/up, columns
of down). A module left with no unit is replaced by an empty module (the residual passes through). Slices are
copied into fresh contiguous tensors so the saved checkpoint holds only what is kept.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from bonsai.architectures import decoder_layers, head_dim, query_head_units, unit_heads
from bonsai.remote.modeling_bonsai import EmptyAttention, EmptyMLP
from bonsai.units import ATTN


def _slice_linear(
    lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> nn.Linear:
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if rows is not None:
        w = w.index_select(0, rows)
        b = b.index_select(0, rows) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols)
    # index_select made fresh tensors; clone what it did not touch, so nothing shares the source's storage
    w = w.clone() if rows is None and cols is None else w
    b = b.clone() if b is not None and rows is None else b
    # the new module adopts those tensors: built on the meta device, it skips a random initialisation that costs
    # more than the slicing itself (this runs once per sub-model in sliced evaluation, bonsai.masking)
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device="meta")
    new.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if b is not None:
        new.bias = nn.Parameter(b, requires_grad=lin.bias.requires_grad)
    return new


def _feature_index(kept_units: np.ndarray, width: int) -> torch.Tensor:
    idx = (kept_units[:, None] * width + np.arange(width)[None, :]).reshape(-1)
    return torch.from_numpy(idx.astype(np.int64))


def shrink_model(
    model: nn.Module, units: pd.DataFrame, remove: np.ndarray, kept: dict[str, list[list[int]]]
) -> dict[str, list[list[int]]]:
    """Remove the units flagged in `remove` (bool per unit-table row) in place; return the updated `kept`
    record (original indices still present, per kind and layer)."""
    layers = decoder_layers(model)
    hd, uh = head_dim(model.config), unit_heads(model.config)
    shared_kv = query_head_units(model.config)
    new_kept = {kind: [list(v) for v in per_layer] for kind, per_layer in kept.items()}
    for (li, kind), rows in units.groupby(["layer", "kind"], sort=True):
        rows = rows.sort_values("index")
        drop = remove[rows["unit"].to_numpy()]
        if not drop.any():
            continue
        keep_pos = rows["index"].to_numpy()[~drop]
        new_kept[kind][li] = [kept[kind][li][i] for i in keep_pos]
        layer = layers[li]
        if kind == ATTN:
            attn = layer.self_attn
            if len(keep_pos) == 0:
                layer.self_attn = EmptyAttention(attn.layer_idx, hd)
                continue
            q_idx = _feature_index(keep_pos, uh * hd)
            attn.q_proj = _slice_linear(attn.q_proj, rows=q_idx)
            attn.o_proj = _slice_linear(attn.o_proj, cols=q_idx)
            if shared_kv:  # query heads left the one KV group: every kept head still reads the shared k / v
                attn.num_key_value_groups = len(keep_pos)
            else:
                kv_idx = _feature_index(keep_pos, hd)
                attn.k_proj = _slice_linear(attn.k_proj, rows=kv_idx)
                attn.v_proj = _slice_linear(attn.v_proj, rows=kv_idx)
        else:
            mlp = layer.mlp
            if len(keep_pos) == 0:
                layer.mlp = EmptyMLP()
                continue
            ch = torch.from_numpy(keep_pos.astype(np.int64))
            mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=ch)
            mlp.up_proj = _slice_linear(mlp.up_proj, rows=ch)
            mlp.down_proj = _slice_linear(mlp.down_proj, cols=ch)
            mlp.intermediate_size = len(keep_pos)
    return new_kept
