"""Core library on random tiny models of every supported family: masking, slicing, costs, checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TINY_CONFIGS, tiny_biased_llama, tiny_model

from bonsai.architectures import family_of, non_embedding_params, total_params
from bonsai.checkpoint import load_pruned_model, save_pruned, sha256_file
from bonsai.errors import BonsaiError
from bonsai.masking import UnitMasker
from bonsai.prior import collect_activation_stats, unit_prior
from bonsai.sampling import candidate_mask, module_counts, sample_masks
from bonsai.selection import check_reachable, round_budget, select_removals
from bonsai.shrink import shrink_model
from bonsai.units import ATTN, MLP, full_kept, unit_table

FAMILIES = sorted(TINY_CONFIGS)
FRESH_LOAD = Path(__file__).with_name("fresh_load.py")


def _random_keep(units, seed, empty_module=(1, ATTN)):
    keep = np.random.default_rng(seed).random(len(units)) > 0.4
    layer, kind = empty_module
    keep[units.index[(units.layer == layer) & (units.kind == kind)]] = False  # one module loses every unit
    return keep


def _expected_drop(units, remove):
    drop = int(units.cost[remove].sum())
    for _, rows in units.groupby(["layer", "kind"]):
        if remove[rows.unit].all():
            drop += int(rows.residual.iloc[0])
    return drop


@pytest.mark.parametrize("family", [*FAMILIES, "llama_with_biases"])
@pytest.mark.parametrize("empty_module", [(1, ATTN), (0, MLP)])
def test_masked_forward_equals_sliced_forward_and_costs_match(family, empty_module):
    model = tiny_biased_llama() if family == "llama_with_biases" else tiny_model(family)
    units = unit_table(model)
    keep = _random_keep(units, seed=1, empty_module=empty_module)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), UnitMasker(model, units) as masker:
        masker.set(keep)
        masked = model(ids).logits
        masker.set(None)
        dense = model(ids).logits
    before = total_params(model)
    shrink_model(model, units, ~keep, full_kept(model))
    with torch.no_grad():
        sliced = model(ids).logits
    assert (masked - sliced).abs().max().item() <= 1e-5
    assert (dense - sliced).abs().max().item() > 1e-3  # the mask really changed the function
    assert before - total_params(model) == _expected_drop(units, ~keep)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_round_trip_and_generate(family, tmp_path):
    model = tiny_model(family)
    units = unit_table(model)
    keep = _random_keep(units, seed=2)
    kept = shrink_model(model, units, ~keep, full_kept(model))
    out = save_pruned(model, None, tmp_path / "pruned", {"kept_units": kept})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == f"bonsai_{family}"
    assert cfg["bonsai_layers"][1]["attn_groups"] == 0
    reloaded = load_pruned_model(out)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
        assert total_params(reloaded) == total_params(model)
        # cached incremental decoding equals the full forward (the emptied layer keeps the cache in step)
        reloaded.generation_config.eos_token_id = None  # generate all 6 tokens, no EOS suppression needed
        gen = reloaded.generate(ids, max_new_tokens=6, do_sample=False)
        full = reloaded(gen).logits[0, ids.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(full, gen[0, ids.shape[1] :])


def test_fresh_process_loads_with_only_transformers(tmp_path):
    """A pruned directory loads with trust_remote_code in a process that cannot import this project."""
    model = tiny_model("qwen3")
    units = unit_table(model)
    shrink_model(model, units, ~_random_keep(units, seed=3), full_kept(model))
    out = save_pruned(model, None, tmp_path / "pruned", {})
    res = subprocess.run(
        [sys.executable, str(FRESH_LOAD), str(out), "--no-tokenizer"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["params"] == total_params(model)
    assert info["class"] == "BonsaiQwen3ForCausalLM"
    assert info["generated"] > 0


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(BonsaiError, match="supported model types: gemma3_text, llama, mistral, qwen2, qwen3"):
        family_of(GPT2Config())


def test_prior_scores_are_finite_and_random_is_seeded():
    model = tiny_model("llama")
    units = unit_table(model)
    windows = np.random.default_rng(0).integers(0, 96, size=(3, 16))
    stats, nll = collect_activation_stats(model, windows, batch_size=2)
    assert nll.shape == (3,)
    for method in ("wanda", "fluctuation", "magnitude"):
        prior = unit_prior(model, units, method, stats=stats, seed=0)
        assert np.isfinite(prior).all() and (prior > 0).all()
    a = unit_prior(model, units, "random", stats=None, seed=5)
    assert np.array_equal(a, unit_prior(model, units, "random", stats=None, seed=5))
    assert not np.array_equal(a, unit_prior(model, units, "random", stats=None, seed=6))


def test_wanda_prior_of_mlp_channel_is_rms_times_mean_abs_column():
    model = tiny_model("llama")
    units = unit_table(model)
    windows = np.random.default_rng(0).integers(0, 96, size=(2, 8))
    captured = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    stats, _ = collect_activation_stats(model, windows, batch_size=2)
    handle.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()
    w = model.model.layers[0].mlp.down_proj.weight.detach().double()
    expected = (x.pow(2).mean(0).sqrt() * w.abs().mean(0)).numpy()
    prior = unit_prior(model, units, "wanda", stats=stats, seed=0)
    rows = units[(units.layer == 0) & (units.kind == MLP)].sort_values("index")
    np.testing.assert_allclose(prior[rows.unit.to_numpy()], expected, rtol=1e-6)


def test_candidates_and_antithetic_pairs():
    model = tiny_model("llama")
    units = unit_table(model)
    prior = np.random.default_rng(0).random(len(units))
    cand = candidate_mask(units, prior, p_round=0.1)
    for _, rows in units.groupby(["layer", "kind"]):
        n_cand, _ = module_counts(len(rows), 0.1)
        ids = rows.unit.to_numpy()
        assert cand[ids].sum() == n_cand
        assert prior[ids][cand[ids]].max() <= prior[ids][~cand[ids]].min()  # candidates have the lowest prior
    keep = sample_masks(units, prior, cand, 0.1, n_samples=10, seed=0)
    assert keep[:, ~cand].all()  # non-candidates are never dropped
    pair_drops = ~keep[0::2] | ~keep[1::2]
    assert (pair_drops[:, cand]).all()  # each pair drops every candidate exactly once between its two halves
    assert not (~keep[0::2] & ~keep[1::2]).any()
    assert np.array_equal(keep, sample_masks(units, prior, cand, 0.1, n_samples=10, seed=0))
    assert not np.array_equal(keep, sample_masks(units, prior, cand, 0.1, n_samples=10, seed=1))


def test_small_modules_are_not_collinear():
    """3 KV groups per layer, p=0.1: one attention candidate per layer, dropped in ~30% of first halves.
    Its column must differ between layers, or the regression cannot tell the layers' attention apart."""
    model = tiny_model("llama")
    units = unit_table(model)
    prior = np.random.default_rng(0).random(len(units))
    cand = candidate_mask(units, prior, 0.1)
    keep = sample_masks(units, prior, cand, 0.1, n_samples=40, seed=0)
    attn = [u for u in np.flatnonzero(cand) if units.kind[u] == ATTN]
    assert len(attn) == 2
    assert not np.array_equal(keep[:, attn[0]], keep[:, attn[1]])
    first_half_drops = (~keep[0::2, attn[0]]).mean()
    assert 0.0 < first_half_drops < 0.6  # p·n = 0.2 for 2 groups: rounded stochastically, not always to 1


def test_uniform_module_share_spreads_module_totals():
    """module_share=uniform: pairs stay complementary and the mean drop stays ~p, but how much each module loses
    varies far more between sub-models than with the fixed share (what identifies per-module value)."""
    model = tiny_model("llama")
    units = unit_table(model)
    prior = np.random.default_rng(0).random(len(units))
    cand = candidate_mask(units, prior, 0.1)
    mlp0 = np.flatnonzero(cand & (units.layer.to_numpy() == 0) & (units.kind.to_numpy() == MLP))
    spread = {}
    for share in ("fixed", "uniform"):
        keep = sample_masks(units, prior, cand, 0.1, n_samples=200, seed=0, module_share=share)
        assert keep[:, ~cand].all()
        assert not (~keep[0::2] & ~keep[1::2]).any() and (~keep[0::2] | ~keep[1::2])[:, cand].all()
        dropped = (~keep[:, mlp0]).sum(1)
        assert abs(dropped.mean() - len(mlp0) / 2) <= 0.1 * len(mlp0)
        spread[share] = dropped.std()
        assert np.array_equal(keep, sample_masks(units, prior, cand, 0.1, n_samples=200, seed=0, module_share=share))
    assert spread["uniform"] > 4 * spread["fixed"], spread


def test_selection_is_cost_aware_and_lands_near_budget():
    model = tiny_model("llama")
    units = unit_table(model)
    beta = np.random.default_rng(0).random(len(units))
    cand = np.ones(len(units), dtype=bool)
    n0 = non_embedding_params(model)
    budget = round_budget(n0, 0, target_sparsity=0.3, p_iter=0.3, round_index=0)
    remove = select_removals(units, beta, cand, budget)
    removed = _expected_drop(units, remove)
    assert abs(removed - budget) <= units.cost.min() / 2 + 1
    # cumulative schedule: round 2 of p_iter 0.1 aims at 0.3 of the original, making up round 1's shortfall
    assert round_budget(n0, removed_so_far=int(0.19 * n0), target_sparsity=0.5, p_iter=0.1, round_index=2) == round(
        0.3 * n0
    ) - int(0.19 * n0)
    # ... and never past the target
    assert round_budget(n0, int(0.45 * n0), target_sparsity=0.5, p_iter=0.1, round_index=6) == round(0.5 * n0) - int(
        0.45 * n0
    )
    # a lower beta is removed before a higher one of the same cost
    mlp = units[units.kind == MLP].unit.to_numpy()
    chosen = remove[mlp]
    if chosen.any() and (~chosen).any():
        assert beta[mlp][chosen].max() <= beta[mlp][~chosen].min() or remove[units.kind == ATTN].any()


@pytest.mark.parametrize("multiple", [4, 8, 16])
def test_channel_multiple_keeps_mlp_widths_aligned(multiple):
    """Removal in blocks: every MLP keeps a multiple of `multiple` channels (40 = 5 x 8, so with 16 the first
    block of a full module is 40 mod 16 = 8), lowest-beta channels go first, and the round still lands within
    half a block of its budget."""
    model = tiny_model("llama")
    units = unit_table(model)
    beta = np.random.default_rng(1).random(len(units))
    cand = np.ones(len(units), dtype=bool)
    budget = round_budget(non_embedding_params(model), 0, target_sparsity=0.4, p_iter=0.4, round_index=0)
    remove = select_removals(units, beta, cand, budget, channel_multiple=multiple)
    block_cost = multiple * int(units[units.kind == MLP].cost.min())
    assert abs(_expected_drop(units, remove) - budget) <= block_cost / 2 + 1
    shrink_model(model, units, remove, full_kept(model))
    widths = [layer.mlp.gate_proj.out_features if hasattr(layer.mlp, "gate_proj") else 0 for layer in
              model.model.layers]
    assert all(w % multiple == 0 for w in widths), widths
    assert sum(40 - w for w in widths) > 0
    for layer in range(2):  # within a module, what goes has lower beta than what stays
        rows = units[(units.layer == layer) & (units.kind == MLP)]
        gone = remove[rows.unit]
        if gone.any() and (~gone).any():
            assert beta[rows.unit][gone].max() <= beta[rows.unit][~gone].min()


def test_unreachable_target_is_refused():
    with pytest.raises(BonsaiError, match="cannot be reached without removing every prunable unit"):
        check_reachable(removable=900, removed_so_far=0, original_non_embedding=1000, target_sparsity=0.95)
    check_reachable(removable=900, removed_so_far=0, original_non_embedding=1000, target_sparsity=0.5)


def test_units_carrying_massive_activations_stay_out_of_the_removable_total():
    from bonsai.selection import removable_params

    units = unit_table(tiny_model("llama"))
    everything = removable_params(units)
    assert everything == int(units.cost.sum()) + int(units.groupby(["layer", "kind"]).residual.first().sum())
    protected = np.zeros(len(units), dtype=bool)
    first_mlp = units[(units.layer == 0) & (units.kind == MLP)]
    protected[first_mlp.unit.iloc[0]] = True  # one channel stays: its cost and its module's residual stay too
    assert removable_params(units, protected) == everything - int(first_mlp.cost.iloc[0] + first_mlp.residual.iloc[0])


def test_impossible_target_is_refused_from_the_config_before_any_work(tmp_path):
    from bonsai.selection import check_reachable_from_config

    tiny_model("qwen2").save_pretrained(tmp_path / "m")
    check_reachable_from_config(tmp_path / "m", 0.9)
    with pytest.raises(BonsaiError, match="cannot be reached"):
        check_reachable_from_config(tmp_path / "m", 0.9999)


def test_save_is_deterministic(tmp_path):
    paths = []
    for i in range(2):
        model = tiny_model("mistral", seed=7)
        units = unit_table(model)
        shrink_model(model, units, ~_random_keep(units, seed=4), full_kept(model))
        paths.append(save_pruned(model, None, tmp_path / f"p{i}", {}))
    assert sha256_file(paths[0] / "model.safetensors") == sha256_file(paths[1] / "model.safetensors")


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(BonsaiError, match="exists and is not empty"):
        save_pruned(tiny_model("llama"), None, tmp_path / "out", {})
    assert (tmp_path / "out" / "keep.txt").exists()


def test_masked_equals_sliced_on_real_stories260k(stories_dir):
    from bonsai.checkpoint import load_for_pruning

    model, tokenizer, kept = load_for_pruning(stories_dir)
    units = unit_table(model, kept)
    keep = np.random.default_rng(0).random(len(units)) > 0.3
    ids = torch.tensor([tokenizer("Once upon a time there was a little girl who liked cats").input_ids[:12]] * 2)
    ids[1] = ids[1].flip(0)
    with torch.no_grad(), UnitMasker(model, units) as masker:
        masker.set(keep)
        masked = model(ids).logits
    before = total_params(model)
    shrink_model(model, units, ~keep, kept)
    with torch.no_grad():
        # fp32 sums with and without the masked zeros round differently, by an amount that depends on the CPU's
        # BLAS kernels (1.9e-5 on logits of this size on an AMD EPYC); a wrong slice is off by far more
        torch.testing.assert_close(masked, model(ids).logits, rtol=1e-5, atol=5e-5)
    assert before - total_params(model) == _expected_drop(units, ~keep)


def test_one_kv_head_model_prunes_query_heads_over_the_shared_kv_head(tmp_path):
    """Gemma-3-style layers with one KV head: the attention units are the query heads, priced as their q rows and
    o columns; k / v stay (and are priced into the module's residual) until the last query head goes."""
    model = tiny_model("gemma3_text")
    cfg = model.config
    assert cfg.num_key_value_heads == 1 and cfg.num_attention_heads == 4
    units = unit_table(model)
    attn0 = units[(units.layer == 0) & (units.kind == ATTN)]
    hd, hidden = cfg.head_dim, cfg.hidden_size
    assert len(attn0) == 4  # one unit per query head, not one block per layer
    assert (attn0.cost == 2 * hd * hidden).all()  # a head's q rows + o columns (no biases in Gemma-3)
    a = model.model.layers[0].self_attn
    shared = a.k_proj.weight.numel() + a.v_proj.weight.numel() + sum(p.numel() for p in a.q_norm.parameters())
    assert int(attn0.residual.iloc[0]) == shared + sum(p.numel() for p in a.k_norm.parameters())

    remove = np.zeros(len(units), dtype=bool)
    remove[attn0.unit.to_numpy()[:3]] = True  # layer 0 keeps one query head
    remove[units.index[(units.layer == 1) & (units.kind == ATTN)]] = True  # layer 1 loses its attention
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), UnitMasker(model, units) as masker:
        masker.set(~remove)
        masked = model(ids).logits
    before = total_params(model)
    kept = shrink_model(model, units, remove, full_kept(model))
    a = model.model.layers[0].self_attn
    assert (a.q_proj.out_features, a.k_proj.out_features, a.num_key_value_groups) == (hd, hd, 1)
    assert kept["attn"] == [[3], []]
    assert before - total_params(model) == _expected_drop(units, remove)
    with torch.no_grad():
        assert (model(ids).logits - masked).abs().max().item() <= 1e-5
    out = save_pruned(model, None, tmp_path / "pruned", {"kept_units": kept})
    assert json.loads((out / "config.json").read_text())["bonsai_layers"][0]["attn_groups"] == 1
    with torch.no_grad():
        assert torch.equal(load_pruned_model(out)(ids).logits, model(ids).logits)
    assert len(unit_table(model, kept)[lambda t: t.kind == ATTN]) == 1  # the kept head, priced the same way
