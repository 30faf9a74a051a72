"""One-shot pruning methods, each a selectable `method` of the prune flow (the iterative `bonsai` loop lives in
flows/prune.py). Every method takes the model (modified in place), its `kept` record and the calibration
windows, and returns a `MethodResult`; the task in tasks/method_tasks.py saves the result as a checkpoint of
the same format as Bonsai's.

| method            | score (one calibration pass unless noted)           | allocation                  | kind         |
|-------------------|-----------------------------------------------------|-----------------------------|--------------|
| flap              | fluctuation, standardised per module kind           | global, + bias compensation | structured   |
| wanda_sp          | Wanda per unit                                      | same share of every module  | structured   |
| llm_pruner        | Σ abs(w · dL/dw) per unit (backward passes)         | global, per owned parameter | structured   |
| shortgpt          | block influence 1 − cos(h_in, h_out)                | whole layers, then channels | structured   |
| magnitude, random | mean abs(w) per unit / uniform noise                | global                      | structured   |
| mosaic            | abs(W)·‖X‖ per weight, outlier ratio per projection | per projection, target ± λ  | unstructured |
| mosaic_composite  | fluctuation per unit, then mosaic per weight        | units (capped), then mosaic | both         |
| sparse24          | abs(W)·‖X‖ per weight                               | 2 of every 4 inputs per row | 2:4          |
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import nn

from bonsai.config import COMPENSATED_METHODS, METHODS
from bonsai.methods.baselines import magnitude, random
from bonsai.methods.common import MethodResult, PeakRSS, count_nonzero_non_embedding
from bonsai.methods.flap import flap
from bonsai.methods.llm_pruner import llm_pruner
from bonsai.methods.mosaic import mosaic, mosaic_composite
from bonsai.methods.shortgpt import shortgpt
from bonsai.methods.sparse24 import sparse24
from bonsai.methods.wanda_sp import wanda_sp

ONE_SHOT: dict[str, Callable[..., MethodResult]] = {
    "flap": flap,
    "wanda_sp": wanda_sp,
    "llm_pruner": llm_pruner,
    "shortgpt": shortgpt,
    "magnitude": magnitude,
    "random": random,
    "mosaic": mosaic,
    "mosaic_composite": mosaic_composite,
    "sparse24": sparse24,
}
assert set(ONE_SHOT) == set(METHODS) - {"bonsai"}, "bonsai.config.METHODS and the registry disagree"

__all__ = ["ONE_SHOT", "MethodResult", "PeakRSS", "count_nonzero_non_embedding", "run_method"]


def run_method(
    method: str,
    model: nn.Module,
    kept: dict,
    windows: np.ndarray,
    *,
    sparsity: float,
    batch_size: int,
    seed: int = 0,
    outlier_m: float = 5.0,
    lam: float = 0.08,
    structural_share: float = 0.5,
    compensation: str | None = None,
    refit_damping: float | None = None,
) -> MethodResult:
    """Run one one-shot method on `model` (in place). `compensation` None: the method's published one."""
    if method not in ONE_SHOT:
        raise ValueError(f"{method!r} is not a one-shot method; choose one of {', '.join(ONE_SHOT)}")
    kwargs = dict(sparsity=sparsity, batch_size=batch_size, seed=seed)
    if method in ("mosaic", "mosaic_composite"):
        kwargs.update(outlier_m=outlier_m, lam=lam)
    if method == "mosaic_composite":
        kwargs["structural_share"] = structural_share
    if compensation is not None:
        if method not in COMPENSATED_METHODS:
            raise ValueError(f"{method} takes no compensation; it applies to {', '.join(COMPENSATED_METHODS)}")
        kwargs.update(compensation=compensation, refit_damping=refit_damping)
    return ONE_SHOT[method](model, kept, windows, **kwargs)
