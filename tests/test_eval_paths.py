"""The two ways a shard evaluates a sub-model agree: hooks on the full model (UnitMasker) and physically sliced
weights (sliced_submodel, used when a sub-model drops a large share), and the model is unchanged afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_biased_llama, tiny_model

from bonsai.checkpoint import load_for_pruning
from bonsai.evaluate import mean_nll
from bonsai.masking import SLICE_MIN_DROP, UnitMasker, dropped_share, sliced_submodel
from bonsai.units import ATTN, MLP, full_kept, unit_table
from tasks.prune_tasks import _submodel_utilities


def _keep(units, share: float, seed: int, empty=None) -> np.ndarray:
    keep = np.random.default_rng(seed).random(len(units)) >= share
    if empty is not None:  # one module loses every unit
        keep[units.index[(units.layer == empty[0]) & (units.kind == empty[1])]] = False
    return keep


def _snapshot(model):
    return [(name, type(m)) for name, m in model.named_modules()], {
        k: v.clone() for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "llama_with_biases"])
@pytest.mark.parametrize("empty", [None, (1, ATTN), (0, MLP)])
def test_sliced_submodel_matches_masking_and_restores_the_model(family, empty):
    model = tiny_biased_llama() if family == "llama_with_biases" else tiny_model(family)
    units = unit_table(model)
    keep = _keep(units, 0.5, seed=3, empty=empty)
    ids = torch.randint(0, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    modules, weights = _snapshot(model)
    with torch.no_grad():
        dense = model(ids).logits
        with UnitMasker(model, units) as masker:
            masker.set(keep)
            masked = model(ids).logits
        with sliced_submodel(model, units, keep, full_kept(model)) as sub:
            sliced = sub(ids).logits
            assert sum(p.numel() for p in sub.parameters()) < sum(weights[k].numel() for k in weights)
        after = model(ids).logits
    assert (masked - sliced).abs().max().item() <= 1e-5
    assert (dense - sliced).abs().max().item() > 1e-3  # the sub-model really differs
    assert torch.equal(after, dense)
    assert _snapshot(model)[0] == modules
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_dropped_share_counts_parameters():
    model = tiny_model("llama")
    units = unit_table(model)
    keep = np.ones(len(units), dtype=bool)
    assert dropped_share(units, keep) == 0.0
    mlp = (units.kind == MLP).to_numpy()
    keep[mlp] = False
    expected = units.cost[mlp].sum() / units.cost.sum()
    assert dropped_share(units, keep) == pytest.approx(expected)


def test_shard_evaluation_slices_large_drops_and_matches_masking(stories_dir):
    """A shard with one light and one heavy sub-model: the heavy one goes the sliced way, same NLL as masking."""
    model, _, kept = load_for_pruning(stories_dir)
    units = unit_table(model, kept)
    light, heavy = _keep(units, 0.1, seed=0), _keep(units, 0.6, seed=1)
    assert dropped_share(units, light) < SLICE_MIN_DROP <= dropped_share(units, heavy)
    win = np.random.default_rng(0).integers(3, model.config.vocab_size, size=(4, 32))
    rows = _submodel_utilities(
        {"path": str(stories_dir), "sha256": "test"}, win, np.stack([light, heavy]), 0, 2, "loss", 2, "test"
    )
    with UnitMasker(model, units) as masker:
        expected = []
        for keep in (light, heavy):
            masker.set(keep)
            expected.append(mean_nll(model, win, 2, desc=None))
    assert [r[0] for r in rows] == [0, 1]
    assert [r[2] for r in rows] == pytest.approx(expected, rel=1e-6, abs=0)
    assert [r[1] for r in rows] == pytest.approx([-e for e in expected], rel=1e-6, abs=0)
