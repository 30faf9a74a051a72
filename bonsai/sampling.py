"""Steps 2-3: choose this round's candidate units and sample sub-models as antithetic pairs.

Per module (one layer's attention or MLP), the units with the lowest prior — a share 2·p of the module, where p
is the round's share of the current model (p_iter of the original size, so p grows as the model shrinks) — are
candidates; the rest stay in every sub-model. Each pair of sub-models: the first drops a prior-weighted sample
(probability ∝ max prior − prior, so weak units are dropped more often) of about p of the module's units from its
candidates — p·n stochastically rounded, drawn per pair and module — and its partner drops the remaining
candidates. Pairs make every candidate appear dropped and kept equally often; the per-module rounding keeps the
columns of small modules (a layer's few KV groups) from being copies of each other.

With ``module_share="uniform"`` the first sub-model of a pair drops a share of each module's candidates drawn
uniformly from [0, 1] per pair and module instead of about p of the module. The expected size of a sub-model is
the same, but how much each module loses now varies widely between sub-models, which is what a regression needs
to tell which modules (layers, attention vs MLP) can give up units.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def _module_groups(units: pd.DataFrame):
    for _, rows in units.groupby(["layer", "kind"], sort=True):
        yield rows["unit"].to_numpy()


def module_counts(n_units: int, p_round: float) -> tuple[int, float]:
    """(candidates, expected number dropped by the first sub-model of a pair) for a module of n_units."""
    n_cand = min(n_units, max(1, math.ceil(2 * p_round * n_units)))
    return n_cand, min(float(n_cand), p_round * n_units)


def candidate_mask(
    units: pd.DataFrame, prior: np.ndarray, p_round: float, protected: np.ndarray | None = None
) -> np.ndarray:
    """Bool per unit: True for this round's candidates (lowest prior per module; ties by position). `protected`
    units (massive activations, bonsai.prior.massive_units) are never candidates."""
    cand = np.zeros(len(units), dtype=bool)
    for ids in _module_groups(units):
        n_cand, _ = module_counts(len(ids), p_round)
        if protected is not None:
            ids = ids[~protected[ids]]
        order = ids[np.lexsort((ids, prior[ids]))]
        cand[order[:n_cand]] = True
    return cand


def sample_masks(
    units: pd.DataFrame,
    prior: np.ndarray,
    candidates: np.ndarray,
    p_round: float,
    n_samples: int,
    seed: int,
    module_share: str = "fixed",
) -> np.ndarray:
    """(n_samples, n_units) bool keep-masks; rows 2k and 2k+1 are an antithetic pair."""
    if module_share not in ("fixed", "uniform"):
        raise ValueError(f"unknown module_share {module_share!r}")
    rng = np.random.default_rng(seed)
    keep = np.ones((n_samples, len(units)), dtype=bool)
    modules = []
    for ids in _module_groups(units):
        cand_ids = ids[candidates[ids]]
        if len(cand_ids) == 0:
            continue
        expected_drop = min(module_counts(len(ids), p_round)[1], float(len(cand_ids)))
        p = prior[cand_ids]
        weight = (p.max() - p) + 1e-9 * (np.abs(p).max() + 1.0)  # every candidate keeps a chance
        modules.append((cand_ids, expected_drop, weight / weight.sum()))
    for pair in range(n_samples // 2):
        for cand_ids, expected_drop, prob in modules:
            # stochastic rounding, drawn per pair and module: a module with few units (3 KV groups) drops one
            # in some first halves and not others, so its column is not a copy of every other small module's
            if module_share == "uniform":
                expected_drop = rng.random() * len(cand_ids)
            n_drop = int(expected_drop) + int(rng.random() < expected_drop - int(expected_drop))
            dropped = rng.choice(cand_ids, size=n_drop, replace=False, p=prob)
            keep[2 * pair, dropped] = False
            keep[2 * pair + 1, np.setdiff1d(cand_ids, dropped)] = False
    return keep
