"""What the one-shot methods share: the result record, budgets, global cost-aware selection, projection input
norms (one hooked calibration pass), non-zero counting and a peak-RSS sampler.

Sizes are non-embedding parameters, as in the Bonsai loop: a target sparsity s asks for round(s · n0) of the
input model's n0 non-embedding parameters to go. Structured methods remove them (the checkpoint shrinks);
unstructured ones (mosaic, sparse24, the unstructured part of mosaic_composite) zero them (`basis="nonzero"`:
the checkpoint keeps its shapes and the zeros are stored densely).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from bonsai.architectures import decoder_layers, embedding_params, non_embedding_params
from bonsai.errors import BonsaiError
from bonsai.evaluate import window_nll
from bonsai.prior import STAT_ROWS
from bonsai.remote.modeling_bonsai import EmptyAttention, EmptyMLP
from bonsai.selection import check_reachable, removable_params, select_removals

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# q/k/v read the same input (the attention's normed hidden state), and so do gate/up
_INPUT_OF = {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj",
             "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"}


@dataclass
class MethodResult:
    """What a one-shot method did to the model (modified in place)."""

    method: str
    kept: dict[str, list[list[int]]]  # original indices of the units still present
    dense_nll: np.ndarray  # per-window NLL of the input model, from the calibration pass
    forward_tokens: int  # tokens through the model (calibration / gradient passes)
    backward_passes: int = 0
    basis: str = "dense"  # "dense": size = stored parameters; "nonzero": size = non-zero parameters
    removed: dict[str, int] = field(default_factory=dict)  # removed_attn_groups / removed_mlp_channels
    details: dict[str, Any] = field(default_factory=dict)  # method-specific, JSON-serialisable


def target_removed(n0: int, sparsity: float) -> int:
    return round(sparsity * n0)


def removed_counts(units: pd.DataFrame, remove: np.ndarray) -> dict[str, int]:
    by_kind = units[remove].groupby("kind").size().to_dict()
    return {"removed_attn_groups": int(by_kind.get("attn", 0)), "removed_mlp_channels": int(by_kind.get("mlp", 0))}


def fit_removals(units: pd.DataFrame, score: np.ndarray, budget: int) -> np.ndarray:
    """Bool per unit: every unit is a candidate, lowest score first, cost-aware (see select_removals)."""
    return select_removals(units, np.asarray(score, dtype=np.float64), np.ones(len(units), dtype=bool), budget)


def freed_params(units: pd.DataFrame, remove: np.ndarray) -> int:
    """Parameters that removing the flagged units frees (residuals of emptied modules included)."""
    freed = int(units["cost"].to_numpy()[remove].sum())
    for _, rows in units.groupby(["layer", "kind"]):
        if remove[rows["unit"].to_numpy()].all():
            freed += int(rows["residual"].iloc[0])
    return freed


def global_select(units: pd.DataFrame, score: np.ndarray, budget: int, n0: int, sparsity: float) -> np.ndarray:
    """Cost-aware global selection of the units to remove (lowest score first) to free `budget` parameters."""
    check_reachable(removable_params(units), 0, n0, sparsity)
    return fit_removals(units, score, budget)


def per_cost(units: pd.DataFrame, score: np.ndarray) -> np.ndarray:
    """A unit's summed score divided by the parameters it owns, so attention groups and MLP channels compare."""
    return np.asarray(score, dtype=np.float64) / units["cost"].to_numpy(dtype=np.float64)


def dense_pass(model: nn.Module, windows: np.ndarray, batch_size: int) -> np.ndarray:
    return window_nll(model, windows, batch_size=batch_size, desc="calibration pass")


def projections(model: nn.Module):
    """(layer index, name, linear) for every q/k/v/o/gate/up/down still present."""
    for li, layer in enumerate(decoder_layers(model)):
        for name in PROJECTIONS:
            parent = layer.mlp if name in ("gate_proj", "up_proj", "down_proj") else layer.self_attn
            if isinstance(parent, (EmptyAttention, EmptyMLP)):
                continue
            yield li, name, getattr(parent, name)


class ProjectionInputNorms:
    """Per-input-feature sum of squares of every projection's input over the calibration tokens (float64).

    q/k/v share one input and gate/up another, so four hooks per layer cover the seven projections.
    `norm(li, name)` is the L2 norm ‖X_j‖ over tokens of input feature j of that projection (Wanda's ‖X‖)."""

    def __init__(self, model: nn.Module):
        self.sumsq: dict[tuple[int, str], torch.Tensor] = {}
        self._handles = []
        for li, name, lin in projections(model):
            if _INPUT_OF[name] == name:
                self._handles.append(lin.register_forward_pre_hook(self._hook((li, name))))

    def _hook(self, key):
        def pre_hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sq = sum((rows.double() ** 2).sum(0).cpu() for rows in x.split(STAT_ROWS))
            self.sumsq[key] = sq if key not in self.sumsq else self.sumsq[key] + sq

        return pre_hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def norm(self, li: int, name: str) -> torch.Tensor:
        return self.sumsq[(li, _INPUT_OF[name])].sqrt()

    def as_dict(self) -> dict[tuple[int, str], torch.Tensor]:
        """(layer, projection) -> input-feature norms, for every projection that was hooked."""
        out = {}
        for (li, src), _ in self.sumsq.items():
            for name, feeds in _INPUT_OF.items():
                if feeds == src:
                    out[(li, name)] = self.norm(li, name)
        return out


def collect_projection_norms(
    model: nn.Module, windows: np.ndarray, batch_size: int
) -> tuple[dict[tuple[int, str], torch.Tensor], np.ndarray]:
    """One dense pass: input-feature norms of every projection and the per-window NLL of the dense model."""
    collector = ProjectionInputNorms(model)
    try:
        nll = dense_pass(model, windows, batch_size)
    finally:
        collector.remove()
    return collector.as_dict(), nll


def wanda_scores(lin: nn.Linear, norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖ per weight (float32, out × in)."""
    return lin.weight.detach().abs().float() * norm.float().to(lin.weight.device)[None, :]


def count_nonzero_non_embedding(model: nn.Module) -> int:
    """Non-zero entries among the non-embedding parameters (embeddings / LM head excluded, tied counted once)."""
    emb = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
           for p in m.parameters()}
    return int(sum(int(torch.count_nonzero(p.detach())) for p in model.parameters() if id(p) not in emb))


def zeros_outside_projections(model: nn.Module) -> int:
    """Exact zeros among non-embedding parameters that no projection weight holds (biases, norms)."""
    proj = {id(lin.weight) for _, _, lin in projections(model)}
    emb = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
           for p in m.parameters()}
    return int(sum(p.numel() - int(torch.count_nonzero(p.detach())) for p in model.parameters()
                   if id(p) not in proj and id(p) not in emb))


def check_sizes(model: nn.Module) -> tuple[int, int]:
    n0 = non_embedding_params(model)
    if n0 <= 0:
        raise BonsaiError("the model has no non-embedding parameters to prune")
    return n0, embedding_params(model)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Context manager sampling this process's resident set size every `interval` seconds; `.peak_mb` after
    exit is the largest sample (process-wide: it includes whatever the process already held)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = _rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-rss")
        self._thread.start()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.seconds = time.perf_counter() - self.started

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20
