"""Weight compensation after a structured removal (bonsai.compensation), on tiny random models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_models import tiny_biased_llama, tiny_model

from bonsai.architectures import decoder_layers, non_embedding_params
from bonsai.checkpoint import load_pruned_model, save_pruned
from bonsai.compensation import (
    SecondMoments,
    _layer_groups,
    _statistics_pass,
    _touched_modules,
    compensate_and_shrink,
    compensated_weights,
    cross_validated_damping,
    grows_params,
    target_projection,
)
from bonsai.methods import run_method
from bonsai.prior import collect_activation_stats, massive_units, unit_prior
from bonsai.sampling import candidate_mask
from bonsai.units import full_kept, unit_table


def _tokens(seed: int, n: int, seq: int = 16, vocab: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(n, seq), dtype=np.int64)


def _low_rank_inputs(model, rank: int = 4):
    """Make the inputs of o_proj / down_proj correlated, as in trained models (a random init has near-independent
    features, which no compensation can exploit): v_proj, gate_proj and up_proj become rank `rank`."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in decoder_layers(model):
            for lin in (layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
                out_f, in_f = lin.weight.shape
                a, b = torch.randn(out_f, rank, generator=g), torch.randn(rank, in_f, generator=g)
                lin.weight.copy_(a @ b * lin.weight.std() / (a @ b).std())
    return model


def _moments(x: torch.Tensor) -> torch.Tensor:
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    return xa.T @ xa / x.shape[0]


def test_refit_with_nothing_removed_returns_the_original_weights():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    moments = _moments(torch.randn(64, 8, generator=g, dtype=torch.float64))
    keep = torch.ones(8, dtype=torch.bool)
    for mode in ("none", "bias", "refit"):
        w2, b2 = compensated_weights(w, b, keep, moments, mode)
        assert torch.equal(w2, w.double()) and torch.equal(b2, b.double())


def test_refit_recovers_a_removed_feature_that_the_kept_ones_explain():
    """Feature 7 = 2·x0 − x3 + 0.5: least squares moves its weight onto x0, x3 and the bias exactly; the mean-bias
    update (FLAP) only removes the mean error."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, generator=g, dtype=torch.float64)
    x[:, 7] = 2 * x[:, 0] - x[:, 3] + 0.5
    w, b = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    keep = torch.ones(8, dtype=torch.bool)
    keep[7] = False
    y = x @ w.T + b
    errors = {}
    for mode in ("none", "bias", "refit"):
        w2, b2 = compensated_weights(w, b, keep, _moments(x), mode, damping=1e-9)
        errors[mode] = float(((x[:, keep] @ w2.T + b2) - y).pow(2).mean() / y.pow(2).mean())
    assert errors["refit"] < 1e-8 < errors["bias"] < errors["none"], errors


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_compensation_lowers_the_output_error_on_held_out_tokens(family):
    """Remove 30% of the units by Wanda (never a module's only unit); logits error to the dense model on windows
    not used for the statistics: refit < none, and the model keeps its size budget up to the biases it adds."""
    dense = _low_rank_inputs(tiny_model(family, seed=2))
    calib, held_out = _tokens(3, n=24), torch.from_numpy(_tokens(4, n=8))
    units = unit_table(dense)
    stats, _ = collect_activation_stats(dense, calib, batch_size=8)
    score = unit_prior(dense, units, "wanda", stats=stats, seed=0) / units["cost"].to_numpy()
    # a module of one unit (gemma3's single KV group) would go whole: nothing left to compensate
    score[units.groupby(["layer", "kind"])["unit"].transform("size").to_numpy() == 1] = np.inf
    remove = np.zeros(len(units), dtype=bool)
    remove[np.argsort(score)[: int(0.3 * len(units))]] = True
    with torch.no_grad():
        reference = dense(held_out).logits
    errors, sizes = {}, {}
    for mode in ("none", "bias", "refit"):
        model = copy.deepcopy(dense)
        _, tokens = compensate_and_shrink(model, units, remove, full_kept(model), calib, mode=mode, batch_size=8)
        assert (tokens > 0) == (mode != "none")
        with torch.no_grad():
            errors[mode] = float((model(held_out).logits - reference).pow(2).mean())
        sizes[mode] = non_embedding_params(model)
    assert errors["refit"] < 0.9 * errors["none"], errors
    assert sizes["refit"] - sizes["none"] == grows_params(dense, units, remove, "refit") > 0


def test_layer_groups_follow_the_memory_budget_and_every_grouping_compensates():
    dense = _low_rank_inputs(tiny_biased_llama(seed=5))
    calib, held_out = _tokens(6, n=24), torch.from_numpy(_tokens(7, n=8))
    units = unit_table(dense)
    remove = np.zeros(len(units), dtype=bool)
    remove[units.index[units["index"] % 3 == 0]] = True  # a third of every module, in both layers
    touched = _touched_modules(units, remove)
    assert _layer_groups(dense, [0, 1], touched, max_bytes=1) == [[0], [1]]
    assert _layer_groups(dense, [0, 1], touched, max_bytes=2**30) == [[0, 1]]
    with torch.no_grad():
        reference = dense(held_out).logits
    errors = {}
    for name, mode, max_bytes in (("none", "none", 2**30), ("one group", "refit", 2**30), ("per layer", "refit", 1)):
        model = copy.deepcopy(dense)
        compensate_and_shrink(model, units, remove, full_kept(model), calib, mode=mode, max_bytes=max_bytes)
        with torch.no_grad():
            errors[name] = float((model(held_out).logits - reference).pow(2).mean())
    assert max(errors["one group"], errors["per layer"]) < 0.9 * errors["none"], errors


def test_compensated_checkpoint_reloads_bitwise_and_is_deterministic(tmp_path):
    """Biases created on o_proj / down_proj are recorded and reload exactly; the same inputs give the same bits."""
    dense = tiny_model("llama", seed=8)
    calib = _tokens(9, n=12)
    units = unit_table(dense)
    remove = np.zeros(len(units), dtype=bool)
    remove[units.index[units["index"] % 2 == 1]] = True
    states = []
    for _ in range(2):
        model = copy.deepcopy(dense)
        kept = compensate_and_shrink(model, units, remove, full_kept(model), calib, mode="refit")[0]
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert target_projection(model, 0, "mlp").bias is not None
    out = save_pruned(model, None, tmp_path / "refit", {"kept_units": kept})
    reloaded = load_pruned_model(out)
    ids = torch.from_numpy(_tokens(10, n=2))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert len(decoder_layers(reloaded)) == len(decoder_layers(dense))


@pytest.mark.parametrize("method", ["wanda_sp", "magnitude", "flap"])
def test_one_shot_methods_take_the_refit(method):
    dense = _low_rank_inputs(tiny_model("qwen2", seed=11))
    calib, held_out = _tokens(12, n=24), torch.from_numpy(_tokens(13, n=8))
    with torch.no_grad():
        reference = dense(held_out).logits
    errors = {}
    for comp in ("none", "refit"):
        model = copy.deepcopy(dense)
        result = run_method(method, model, full_kept(model), calib, sparsity=0.3, batch_size=8, compensation=comp)
        assert (result.forward_tokens > calib.size) == (comp == "refit")
        with torch.no_grad():
            errors[comp] = float((model(held_out).logits - reference).pow(2).mean())
    assert errors["refit"] < errors["none"], errors
    with pytest.raises(ValueError, match="takes no compensation"):
        run_method("mosaic", copy.deepcopy(dense), full_kept(dense), calib, sparsity=0.3, batch_size=8,
                   compensation="refit")


def test_massive_activation_channels_are_never_candidates():
    """A down_proj input channel made ~1000x larger than the rest (its gate/up rows scaled) is flagged massive and
    kept out of the candidates even when the prior ranks it lowest; ordinary channels are not flagged."""
    model = tiny_model("llama", seed=14)
    with torch.no_grad():
        mlp = decoder_layers(model)[1].mlp
        mlp.gate_proj.weight[7] *= 40.0
        mlp.up_proj.weight[7] *= 40.0
    units = unit_table(model)
    stats, _ = collect_activation_stats(model, _tokens(15, n=8), batch_size=8)
    massive = massive_units(model, units, stats)
    channel = units.index[(units["layer"] == 1) & (units["kind"] == "mlp") & (units["index"] == 7)][0]
    assert massive[channel] and massive.sum() == 1
    prior = unit_prior(model, units, "wanda", stats=stats, seed=0)
    prior[channel] = -1.0  # the lowest prior of its module: the first candidate without the guard
    assert candidate_mask(units, prior, 0.2)[channel]
    guarded = candidate_mask(units, prior, 0.2, massive)
    assert not guarded[channel] and guarded.sum() == candidate_mask(units, prior, 0.2).sum()


def test_cross_validated_damping_follows_the_token_budget():
    """Correlated features (rank 3 + noise): with fewer tokens than features the fit overfits its fold and the
    cross-validation picks a ridge at least 10x stronger than with thousands of tokens."""
    g = torch.Generator().manual_seed(16)
    mix = torch.randn(3, 24, generator=g, dtype=torch.float64)
    w = torch.randn(6, 24, generator=g, dtype=torch.float64)
    wb = torch.cat([w, torch.zeros(6, 1, dtype=torch.float64)], dim=1)
    keep_aug = torch.ones(25, dtype=torch.bool)
    keep_aug[:8] = False
    chosen = {}
    for n in (8000, 16):
        folds = []
        for _ in range(2):
            x = torch.randn(n // 2, 3, generator=g, dtype=torch.float64) @ mix
            folds.append(_moments(x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)))
        chosen[n] = cross_validated_damping(wb, keep_aug, folds)
    assert chosen[16] >= 10 * chosen[8000], chosen
    with pytest.raises(ValueError, match="two folds"):
        cross_validated_damping(wb, keep_aug, folds[:1])


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_pass_from_cached_layer_inputs_sees_what_a_full_pass_sees(family):
    """Statistics of layer 1 from a pass that starts at the cached inputs of layer 1 (layer 0 skipped) equal those
    of a pass from the embeddings, on families with one mask for all layers and with sliding / full layers."""
    model = tiny_model(family, seed=17)
    windows, keys = _tokens(18, n=10), [(1, "attn"), (1, "mlp")]
    full = SecondMoments(model, keys)
    inputs = _statistics_pass(model, windows, 4, 1, full, None, 1)
    full.remove()
    assert inputs.layer == 1 and len(inputs.batches) == 3
    resumed = SecondMoments(model, keys)
    again = _statistics_pass(model, windows, 4, 1, resumed, inputs, 1)
    resumed.remove()
    for key in keys:
        assert torch.allclose(full.moments(key), resumed.moments(key), rtol=1e-6, atol=1e-7)
        assert all(torch.equal(a, b) for a, b in zip(full.fold_moments(key), resumed.fold_moments(key), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(inputs.batches, again.batches, strict=True))
    ids = torch.from_numpy(windows[:2])
    with torch.no_grad():  # every skipped layer has its own forward back
        assert torch.equal(model(ids).logits, tiny_model(family, seed=17)(ids).logits)
