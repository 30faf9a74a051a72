"""The prunable units of a model and the exact number of parameters each owns.

A unit is an MLP intermediate channel (a row of gate and up, a column of down) or an attention KV group (a KV
head, the query heads that share it: rows of q/k/v, columns of o); in a model with one KV head per layer, a
query head (rows of q, columns of o; k/v belong to the module: `architectures.query_head_units`). Costs are
counted from the real weight shapes, biases included. When the last unit of a module goes, the module's shared
parameters (o/down biases, q/k norms, a shared KV head) go with it: that is the module's `residual` cost, so
removed units + emptied residuals = the drop in numel.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch import nn

from bonsai.architectures import attn_groups, attn_unit_rows, decoder_layers, mlp_channels

ATTN, MLP = "attn", "mlp"


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def attn_unit_cost(attn: nn.Module, n_groups: int, owned_rows: tuple[str, ...]) -> int:
    owned = sum(_numel(getattr(attn, name)) for name in owned_rows) + attn.o_proj.weight.numel()
    return owned // n_groups


def mlp_unit_cost(mlp: nn.Module, n_channels: int) -> int:
    owned = _numel(mlp.gate_proj) + _numel(mlp.up_proj) + mlp.down_proj.weight.numel()
    return owned // n_channels


def unit_table(model: nn.Module, kept: dict[str, list[list[int]]] | None = None) -> pd.DataFrame:
    """One row per present unit: unit, layer, kind, index (position now), orig_index (in the source model),
    cost, residual. `kept` maps kind -> per-layer original indices of the units still present (None: all)."""
    rows = []
    owned_rows = attn_unit_rows(model.config)
    for li, layer in enumerate(decoder_layers(model)):
        for kind, n, module in (
            (ATTN, attn_groups(layer, model.config), layer.self_attn),
            (MLP, mlp_channels(layer), layer.mlp),
        ):
            if n == 0:
                continue
            orig = kept[kind][li] if kept is not None else list(range(n))
            if len(orig) != n:
                raise ValueError(f"layer {li} {kind}: {n} units present but {len(orig)} recorded as kept")
            cost = attn_unit_cost(module, n, owned_rows) if kind == ATTN else mlp_unit_cost(module, n)
            residual = _numel(module) - cost * n
            rows.extend((li, kind, i, o, cost, residual) for i, o in enumerate(orig))
    table = pd.DataFrame(rows, columns=["layer", "kind", "index", "orig_index", "cost", "residual"])
    table.insert(0, "unit", np.arange(len(table), dtype=np.int64))
    return table


def full_kept(model: nn.Module) -> dict[str, list[list[int]]]:
    """`kept` record of an unpruned model: every unit of every layer."""
    layers = decoder_layers(model)
    return {
        ATTN: [list(range(attn_groups(layer, model.config))) for layer in layers],
        MLP: [list(range(mlp_channels(layer))) for layer in layers],
    }
