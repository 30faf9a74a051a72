"""Typed, validated pruning configuration and the two presets (`paper`, `fast`).

Resolution order: preset defaults < config file < explicit overrides (CLI flags / flow parameters).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonsai.errors import BonsaiError

PRIORS = ("wanda", "fluctuation", "magnitude", "random")
# A sub-model's utility: -perplexity (the paper), -mean NLL, or -KL(dense || sub-model) of the next-token
# distributions (the round's unpruned model as the reference, computed once per shard; lower variance: it
# compares whole distributions at every position, not one sampled token).
UTILITIES = ("ppl", "loss", "kl")
REGRESSIONS = ("lasso_cv", "ridge", "prior_scaled")
# How much of a module a sub-model drops: about p of every module (the paper), or a share drawn per pair and module
# (uniform over 0..all of its candidates), which spreads the module totals and so identifies per-module value.
MODULE_SHARES = ("fixed", "uniform")
# What the kept o_proj / down_proj columns do after a removal (bonsai.compensation): nothing, FLAP's mean-bias
# update, or a least-squares refit from the calibration inputs' second moments.
COMPENSATIONS = ("none", "bias", "refit")
# Methods that remove whole units and so can compensate, with their published compensation (Bonsai's comes from
# its preset); a run that names no compensation gets this one.
COMPENSATED_METHODS = ("bonsai", "flap", "wanda_sp", "llm_pruner", "magnitude", "random", "mosaic_composite")
PUBLISHED_COMPENSATION = {"flap": "bias", "mosaic_composite": "refit"}  # the composite is this project's own
# `bonsai` is the iterative loop of flows/prune.py; the others are one-shot baselines (bonsai/methods/).
METHODS = (
    "bonsai",
    "flap",
    "wanda_sp",
    "llm_pruner",
    "shortgpt",
    "magnitude",
    "random",
    "mosaic",
    "mosaic_composite",
    "sparse24",
)
# Knobs only the one-shot methods read (kept out of the Bonsai loop's artifact keys).
METHOD_KNOBS = ("method", "mosaic_outlier_m", "mosaic_lambda", "structural_share")
# Knobs both the loop and the one-shot methods read.
SHARED_METHOD_KNOBS = ("compensation", "refit_damping")

# Knobs a preset fixes; everything else (model, sparsity, data, seed, paths) is per run.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's setting (Dery et al. 2024, Sec. 4): 5% per round, 200 sub-models, 32 full-context windows,
    # utility = -perplexity, L1-penalised linear regression with k-fold CV on Kendall tau.
    "paper": {
        "prior": "wanda",
        "p_iter": 0.05,
        "n_samples": 200,
        "calib_windows": 32,
        "calib_seq_len": 0,  # 0 = the model's full context
        "utility": "ppl",
        "regression": "lasso_cv",
        "module_share": "fixed",
        "sample_windows": 0,
        "compensation": "none",
    },
    # CPU-friendly defaults: shorter windows, fewer sub-models, larger rounds, the prior-scaled regression (a few
    # dozen coefficients, so 24 sub-models scored on 2 windows determine them), and a separate statistics budget:
    # the prior and the compensation read all 16 windows in one pass each while sub-models are scored on the first
    # 2; after each round the kept o_proj / down_proj columns are refitted (cross-validated ridge). Windows of 256
    # tokens, not 128: on 128-token windows the sub-model scores undervalue attention (little long-range context
    # to use) and a 20% prune of SmolLM2 removed 23 KV groups instead of 2, doubling the perplexity on 512-token
    # windows. Measured in benchmarks/results/compare_smollm2.json and quality_ablation.json.
    "fast": {
        "prior": "wanda",
        "p_iter": 0.1,
        "n_samples": 24,
        "calib_windows": 16,
        "calib_seq_len": 256,
        "utility": "loss",
        "regression": "prior_scaled",
        "module_share": "fixed",
        "sample_windows": 2,
        "compensation": "refit",
    },
}


@dataclass(frozen=True)
class PruneConfig:
    model: str = "smollm2-135m"
    sparsity: float = 0.5
    preset: str = "fast"
    calib: str = "self"
    seed: int = 0
    # the preset's knobs: None = take the preset's value (so `preset` alone decides, also in deployments)
    prior: str | None = None
    p_iter: float | None = None
    n_samples: int | None = None
    calib_windows: int | None = None
    calib_seq_len: int | None = None
    utility: str | None = None
    regression: str | None = None
    module_share: str | None = None
    sample_windows: int | None = None
    compensation: str | None = None
    # refit: ridge λ = refit_damping × the mean diagonal of the kept inputs' second moments (bonsai.compensation);
    # None = cross-validated per projection on two folds of the calibration windows
    refit_damping: float | None = None
    cv_folds: int = 5
    # MLP widths stay multiples of this (bonsai.selection): 8 = the AVX2 fp32 vector width, 64 for GPU tiles
    channel_multiple: int = 1
    eval_batch_size: int = 8
    shard_size: int = 8
    workers: int = 1
    # a running Dask scheduler ("tcp://host:8786"): shards go to its workers instead of a local cluster
    scheduler: str | None = None
    method: str = "bonsai"
    mosaic_outlier_m: float = 5.0  # Mosaic: a score > M × the projection's mean score is an outlier
    mosaic_lambda: float = 0.08  # Mosaic: per-projection sparsity stays within target ± lambda
    structural_share: float = 0.5  # mosaic_composite: share of the budget removed as whole units

    def resolved(self) -> PruneConfig:
        """This config with every knob left unset taken from its preset."""
        if self.preset not in PRESETS:
            raise BonsaiError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        unset = {k: v for k, v in PRESETS[self.preset].items() if getattr(self, k) is None}
        if self.method != "bonsai" and self.compensation is None:  # a one-shot method as published
            unset["compensation"] = PUBLISHED_COMPENSATION.get(self.method, "none")
        # the preset scores sub-models on its first k windows; a run given no more windows than that scores on all
        calib_windows, k = unset.get("calib_windows", self.calib_windows), unset.get("sample_windows", 0)
        if k and isinstance(calib_windows, int) and k >= calib_windows:
            unset["sample_windows"] = 0
        return dataclasses.replace(self, **unset) if unset else self

    def validate(self) -> PruneConfig:
        """The resolved config, checked; every bad value raises a one-line BonsaiError."""
        if not self.is_resolved():
            return self.resolved().validate()
        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), _FIELD_KINDS.get(f.name)
            if v is None and "None" in str(f.type):
                continue
            if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
                raise BonsaiError(f"{f.name} must be an integer, got {v!r}")
            if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise BonsaiError(f"{f.name} must be a number, got {v!r}")
        if not 0.0 < self.sparsity < 1.0:
            raise BonsaiError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if self.prior not in PRIORS:
            raise BonsaiError(f"unknown prior {self.prior!r}; choose one of {', '.join(PRIORS)}")
        if self.utility not in UTILITIES:
            raise BonsaiError(f"unknown utility {self.utility!r}; choose one of {', '.join(UTILITIES)}")
        if self.regression not in REGRESSIONS:
            raise BonsaiError(
                f"unknown regression {self.regression!r}; choose one of {', '.join(REGRESSIONS)}"
            )
        if self.module_share not in MODULE_SHARES:
            raise BonsaiError(
                f"unknown module_share {self.module_share!r}; choose one of {', '.join(MODULE_SHARES)}"
            )
        if self.compensation not in COMPENSATIONS:
            raise BonsaiError(
                f"unknown compensation {self.compensation!r}; choose one of {', '.join(COMPENSATIONS)}"
            )
        if self.compensation != "none" and self.method not in COMPENSATED_METHODS:
            raise BonsaiError(
                f"method {self.method} takes no compensation (it applies to {', '.join(COMPENSATED_METHODS)}); "
                f"use --compensation none"
            )
        if self.refit_damping is not None and not self.refit_damping > 0:
            raise BonsaiError(f"refit_damping must be > 0, got {self.refit_damping}")
        if not 0.0 < self.p_iter < 0.5:
            raise BonsaiError(
                f"p_iter must be in (0, 0.5) so that candidates (2·p_iter) fit, got {self.p_iter}"
            )
        if self.n_samples < 2 or self.n_samples % 2:
            raise BonsaiError(
                f"n_samples must be an even number >= 2 (antithetic pairs), got {self.n_samples}"
            )
        for name in ("calib_windows", "eval_batch_size", "shard_size", "workers", "cv_folds", "channel_multiple"):
            if getattr(self, name) < 1:
                raise BonsaiError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.scheduler is not None and (not isinstance(self.scheduler, str) or not self.scheduler.strip()):
            raise BonsaiError(
                f"scheduler must be a Dask scheduler address such as tcp://host:8786, got {self.scheduler!r}"
            )
        if not 0 <= self.sample_windows <= self.calib_windows:
            raise BonsaiError(
                f"sample_windows must be in [0, calib_windows={self.calib_windows}] (0 = all), "
                f"got {self.sample_windows}"
            )
        if self.calib_seq_len < 0:
            raise BonsaiError(f"calib_seq_len must be >= 0 (0 = full context), got {self.calib_seq_len}")
        if self.regression == "lasso_cv" and self.cv_folds < 2:
            raise BonsaiError("lasso_cv needs cv_folds >= 2")
        if self.method not in METHODS:
            raise BonsaiError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "sparse24" and self.sparsity != 0.5:
            raise BonsaiError(
                f"sparse24 (2:4) zeroes exactly half of every projection's weights: sparsity must be 0.5, "
                f"got {self.sparsity}"
            )
        if not self.mosaic_outlier_m > 0:
            raise BonsaiError(f"mosaic_outlier_m must be > 0, got {self.mosaic_outlier_m}")
        if not 0.0 <= self.mosaic_lambda < 0.5:
            raise BonsaiError(f"mosaic_lambda must be in [0, 0.5), got {self.mosaic_lambda}")
        if not 0.0 <= self.structural_share <= 1.0:
            raise BonsaiError(f"structural_share must be in [0, 1], got {self.structural_share}")
        return self

    def is_resolved(self) -> bool:
        return all(getattr(self, k) is not None for k in PRESETS[self.preset]) if self.preset in PRESETS else False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


KNOWN_KEYS = {f.name for f in dataclasses.fields(PruneConfig)}
_FIELD_KINDS = {
    f.name: int if "int" in str(f.type) else float if "float" in str(f.type) else None
    for f in dataclasses.fields(PruneConfig)
}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file of config keys (a flat mapping, or one under a top-level `prune:` key)."""
    p = Path(path)
    if not p.is_file():
        raise BonsaiError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error is a bad input
        raise BonsaiError(f"cannot parse config file {p}: {str(e).splitlines()[0]}") from None
    if isinstance(data, dict) and isinstance(data.get("prune"), dict):
        data = data["prune"]
    if not isinstance(data, dict):
        raise BonsaiError(f"config file {p} must hold a mapping of keys")
    return data


def resolve_config(
    overrides: dict[str, Any] | None = None, config_file: str | Path | None = None
) -> PruneConfig:
    """Preset defaults < config file < overrides (None values in overrides mean 'not given')."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged.update(load_config_file(config_file))
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = set(merged) - KNOWN_KEYS
    if unknown:
        raise BonsaiError(f"unknown config keys: {', '.join(sorted(unknown))}")
    try:
        cfg = PruneConfig(**merged)
    except TypeError as e:
        raise BonsaiError(f"bad config: {e}") from None
    return cfg.validate()
