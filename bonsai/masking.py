"""Evaluate sub-models by masking units inside the forward pass (step 4), with no weight copies.

A dropped KV group contributes nothing through o_proj, and a dropped MLP channel nothing through down_proj, so
zeroing those inputs is exactly the forward of the physically sliced model (tested to 1e-5). A module that loses
every unit is removed whole when sliced, bias included (e.g. FLAP's compensation bias), so its output is zeroed.
Query heads of KV group g are heads g·G … g·G+G−1 (the order `repeat_kv` uses), i.e. one contiguous block of
o_proj inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from torch import nn

from bonsai.architectures import decoder_layers, head_dim, unit_heads
from bonsai.shrink import shrink_model
from bonsai.units import ATTN

# Evaluate a sub-model on sliced weights (`sliced_submodel`) when it drops at least this share of the units'
# parameters; below it, copying the kept weights costs about what the smaller matmuls save (the measured
# crossover is in benchmarks/results/eval_throughput.json, from benchmarks/eval_throughput.py).
SLICE_MIN_DROP = 0.15


def dropped_share(units: pd.DataFrame, keep: np.ndarray) -> float:
    """Share of the units' parameters that the sub-model `keep` drops (a proxy for the compute it saves)."""
    cost = units["cost"].to_numpy()
    return float(cost[~keep[units["unit"].to_numpy()]].sum() / cost.sum())


@contextmanager
def sliced_submodel(
    model: nn.Module, units: pd.DataFrame, keep: np.ndarray, kept: dict[str, list[list[int]]]
) -> Iterator[nn.Module]:
    """`model` as the sub-model `keep`, physically sliced (`shrink_model`) for the duration, then restored.

    The same forward as UnitMasker's (dropping a unit's inputs to o_proj/down_proj ≡ removing it) with smaller
    matmuls. Only the sliced projections are new tensors; embeddings, norms and the untouched modules are shared,
    and the original modules are put back on exit, so the model is unchanged afterwards.
    """
    layers = decoder_layers(model)
    saved = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        saved.append((layer, attn, mlp, dict(attn._modules), dict(mlp._modules), dict(vars(attn)), dict(vars(mlp))))
    try:
        shrink_model(model, units, ~keep, kept)
        yield model
    finally:
        for layer, attn, mlp, attn_modules, mlp_modules, attn_vars, mlp_vars in saved:
            attn._modules.clear()
            attn._modules.update(attn_modules)
            mlp._modules.clear()
            mlp._modules.update(mlp_modules)
            vars(attn).update(attn_vars)  # e.g. num_key_value_groups, which shrink_model rewrites for query heads
            vars(mlp).update(mlp_vars)  # e.g. intermediate_size, which shrink_model rewrites
            layer.self_attn, layer.mlp = attn, mlp


class UnitMasker:
    """Context manager: `with UnitMasker(model, units) as m: m.set(keep); model(...)`.

    `keep` is a bool vector over the rows of the unit table; `set(None)` restores the dense model. Modules whose
    units are all kept skip the multiply, so the dense forward pays nothing.
    """

    def __init__(self, model: nn.Module, units: pd.DataFrame):
        self.model = model
        layers = decoder_layers(model)
        width = {ATTN: unit_heads(model.config) * head_dim(model.config), "mlp": 1}
        self._targets: list[tuple[nn.Module, np.ndarray, int]] = []
        for (layer, kind), rows in units.groupby(["layer", "kind"], sort=True):
            module = layers[layer].self_attn.o_proj if kind == ATTN else layers[layer].mlp.down_proj
            self._targets.append((module, rows.sort_values("index")["unit"].to_numpy(), width[kind]))
        self._masks: dict[int, torch.Tensor | None] = {}
        self._emptied: set[int] = set()
        self._handles: list = []

    def set(self, keep: np.ndarray | None) -> None:
        self._emptied = set()
        for i, (module, unit_ids, width) in enumerate(self._targets):
            if keep is None or keep[unit_ids].all():
                self._masks[i] = None
                continue
            if module.bias is not None and not keep[unit_ids].any():
                self._emptied.add(i)
            per_unit = torch.from_numpy(keep[unit_ids].astype(np.float32))
            self._masks[i] = per_unit.repeat_interleave(width).to(module.weight.dtype)

    def _hook(self, i: int):
        def pre_hook(_module, args):
            mask = self._masks.get(i)
            if mask is None:
                return None
            return (args[0] * mask.to(args[0].device),) + args[1:]

        return pre_hook

    def _bias_hook(self, i: int):
        def hook(_module, _args, output):
            return torch.zeros_like(output) if i in self._emptied else None

        return hook

    def __enter__(self) -> UnitMasker:
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, (m, _, _) in enumerate(self._targets)]
        self._handles += [
            m.register_forward_hook(self._bias_hook(i))
            for i, (m, _, _) in enumerate(self._targets)
            if m.bias is not None
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._masks = {}
        self._emptied = set()
