"""One-shot pruning methods (bonsai/methods/) on tiny random models and stories260K: sizes, checkpoints that load
in a fresh process, FLAP bias compensation, Mosaic allocation, 2:4 masks, the prune flow's method dispatch and
the comparison flow."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TINY_CONFIGS, tiny_model

from bonsai.architectures import non_embedding_params, total_params
from bonsai.checkpoint import load_pruned_model, read_record, save_pruned
from bonsai.config import METHODS, resolve_config
from bonsai.errors import BonsaiError
from bonsai.methods import ONE_SHOT, count_nonzero_non_embedding, run_method
from bonsai.methods.common import projections
from bonsai.methods.flap import apply_compensation, compensation_vectors, flap_scores, select
from bonsai.methods.llm_pruner import llm_pruner, protected_layers
from bonsai.methods.mosaic import allocate
from bonsai.methods.sparse24 import mask_2_of_4
from bonsai.prior import collect_activation_stats
from bonsai.remote.modeling_bonsai import EmptyAttention, EmptyMLP
from bonsai.shrink import shrink_model
from bonsai.units import full_kept, unit_table

FAMILIES = sorted(TINY_CONFIGS)
STRUCTURED = ("flap", "wanda_sp", "llm_pruner", "shortgpt", "magnitude", "random")
TOL = 0.005
FRESH_LOAD = Path(__file__).with_name("fresh_load.py")
BONSAI_SUMMARY_KEYS = {
    "out", "source_model", "target_sparsity", "sparsity", "non_embedding_params_before",
    "non_embedding_params_after", "total_params_before", "total_params_after", "total_sparsity",
    "calib_ppl_before", "calib_ppl_after", "rounds", "forward_tokens", "wall_seconds",
}


def _windows(seed=0, n=4, seq=16, vocab=96):
    return np.random.default_rng(seed).integers(0, vocab, size=(n, seq))


def _run(method, family="llama", sparsity=0.3, seed=0, **kw):
    model = tiny_model(family, seed=seed)
    n0 = non_embedding_params(model)
    if method == "llm_pruner":
        # the tiny models have two layers, both of which LLM-Pruner's first/last-layer protection would keep
        result = llm_pruner(model, full_kept(model), _windows(seed), sparsity=sparsity, batch_size=2,
                            protect_first=0, protect_last=0, **kw)
    else:
        result = run_method(method, model, full_kept(model), _windows(seed), sparsity=sparsity, batch_size=2, **kw)
    return model, n0, result


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(ONE_SHOT))
def test_each_method_hits_the_target_size(method, family):
    sparsity = 0.5 if method == "sparse24" else 0.3
    model, n0, result = _run(method, family, sparsity)
    dense, nonzero = non_embedding_params(model), count_nonzero_non_embedding(model)
    if method in STRUCTURED:
        assert result.basis == "dense"
        assert abs((1 - dense / n0) - sparsity) <= TOL, (method, 1 - dense / n0)
        units = unit_table(model, result.kept)  # the kept record matches the shrunk shapes
        assert len(units) == sum(len(v) for per_layer in result.kept.values() for v in per_layer)
    elif method == "mosaic":
        assert dense == n0 and nonzero == n0 - round(sparsity * n0)  # realised sparsity = target, exactly
        ratios = [r["sparsity"] for r in result.details["allocation"]]
        assert np.std(ratios) > 0.005  # the allocation differs per projection
        mean = result.details["projection_sparsity"]
        for row in result.details["allocation"]:  # within ±λ, up to rounding to whole weights
            assert abs(row["target_ratio"] - mean) <= 0.08 + 1e-9
            assert abs(row["sparsity"] - row["target_ratio"]) <= 1 / row["numel"]
    elif method == "mosaic_composite":
        d = result.details
        assert nonzero == n0 - round(sparsity * n0) == d["nonzero_non_embedding_params"]
        assert d["dense_equivalent_non_embedding_params"] == dense < n0
        assert abs(d["dense_sparsity"] - 0.5 * sparsity) <= TOL  # structural_share 0.5 of the budget
        assert d["unstructured_zeros"] > 0 and d["structural_params_removed"] > 0
    else:  # sparse24
        assert result.details["projection_sparsity"] == 0.5 and dense == n0
    if method == "mosaic_composite":  # a pass before and one after the structural half, and the refit's passes
        assert result.forward_tokens > 2 * _windows().size
    else:
        assert result.forward_tokens == _windows().size
    assert result.backward_passes == (2 if method == "llm_pruner" else 0)  # 4 windows, batches of 2
    with torch.no_grad():
        logits = model(torch.from_numpy(_windows(1))).logits
    assert torch.isfinite(logits).all()


def test_sparse24_keeps_exactly_two_of_every_four():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 0.2, 0.9, 7.0, 8.0]])
    mask = mask_2_of_4(scores)
    assert mask.tolist() == [[False, True, False, True, False, True, True, False, False, False]]  # tail stays
    model, _, result = _run("sparse24", "qwen3", 0.5)
    checked = 0
    for _, _, lin in projections(model):
        groups = lin.weight.detach().reshape(lin.out_features, -1, 4)
        assert ((groups != 0).sum(-1) == 2).all()
        checked += 1
    assert checked == 7 * model.config.num_hidden_layers
    assert result.details["zeroed_weights"] == sum(lin.weight.numel() // 2 for _, _, lin in projections(model))


def test_mosaic_allocation_is_exact_bounded_and_favours_outliers():
    sizes = np.array([1000, 4000, 250, 3000, 999])
    outliers = np.array([0.001, 0.02, 0.0, 0.005, 0.01])
    ratios, counts = allocate(sizes, outliers, zeros=4321, lam=0.08)
    assert counts.sum() == 4321 and (counts <= sizes).all()
    mean = 4321 / sizes.sum()
    assert np.all(np.abs(ratios - mean) <= 0.08 + 1e-12) and np.isclose(np.abs(ratios - mean).max(), 0.08)
    assert np.isclose((ratios * sizes).sum(), 4321)
    order = np.argsort(outliers)
    assert np.all(np.diff(ratios[order]) <= 1e-12)  # more outliers → less pruning
    _, flat = allocate(sizes, np.zeros(5), zeros=4321, lam=0.08)  # no outlier signal: uniform
    assert np.allclose(flat / sizes, mean, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_flap_bias_compensation_reduces_output_error(family, tmp_path):
    dense = tiny_model(family, seed=1)
    windows = _windows(1, n=6, seq=16)
    ids = torch.from_numpy(windows)
    units, n0 = unit_table(dense), non_embedding_params(dense)
    stats, _ = collect_activation_stats(dense, windows, batch_size=3)
    z = flap_scores(dense, units, stats)
    remove, _ = select(dense, units, z, round(0.3 * n0), n0, 0.3, compensate=True)
    comp = compensation_vectors(dense, units, remove, stats)
    assert comp  # some module is pruned only partly
    with torch.no_grad():
        reference = dense(ids).logits
    errors, models = [], []
    for compensate in (False, True):
        model = copy.deepcopy(dense)
        shrink_model(model, units, remove, full_kept(model))
        if compensate:
            apply_compensation(model, comp)
        with torch.no_grad():
            errors.append((model(ids).logits - reference).pow(2).mean().item())
        models.append(model)
    assert errors[1] < errors[0], errors
    # the created biases are recorded per layer and survive a save / load
    out = save_pruned(models[1], None, tmp_path / "flap", {"kept_units": full_kept(models[1])})
    shapes = json.loads((out / "config.json").read_text())["bonsai_layers"]
    assert any(s["o_bias"] or s["down_bias"] for s in shapes)
    reloaded = load_pruned_model(out)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, models[1](ids).logits)


def test_flap_size_counts_the_added_biases():
    model, n0, result = _run("flap", "llama", 0.4)
    assert result.details["bias_params_added"] > 0
    assert abs((1 - non_embedding_params(model) / n0) - 0.4) <= TOL


FRESH_MULTI = r"""
import importlib.abc, json, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("bonsai", "flows", "tasks"):
            raise ImportError(f"project module {name} must not be needed")
sys.meta_path.insert(0, _Block())
sys.path = [p for p in sys.path if p not in ("", ".")]
import torch
from transformers import AutoModelForCausalLM
ids = torch.tensor(json.loads(sys.argv[1]))
for d in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
    with torch.no_grad():
        logits = model(ids).logits
    print(json.dumps({"dir": d, "params": sum(p.numel() for p in model.parameters()),
                      "nonzero": sum(int(torch.count_nonzero(p)) for p in model.parameters()),
                      "logits": logits[0, -1].tolist()}))
"""


def test_every_method_output_loads_in_a_fresh_process(tmp_path):
    ids = [[1, 5, 9, 3, 7, 2]]
    expected = {}
    for method in sorted(ONE_SHOT):
        sparsity = 0.5 if method == "sparse24" else 0.3
        model, _, result = _run(method, "llama", sparsity, seed=2)
        out = save_pruned(model, None, tmp_path / method, {"kept_units": result.kept, "method": method})
        with torch.no_grad():
            logits = model(torch.tensor(ids)).logits[0, -1]
        nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
        expected[str(out)] = (total_params(model), nonzero, logits)
    script = tmp_path / "fresh_multi.py"
    script.write_text(FRESH_MULTI)
    res = subprocess.run([sys.executable, str(script), json.dumps(ids), *expected], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    seen = [json.loads(line) for line in res.stdout.strip().splitlines() if line.startswith("{")]
    assert len(seen) == len(expected)
    for info in seen:
        params, nonzero, logits = expected[info["dir"]]
        assert info["params"] == params and info["nonzero"] == nonzero
        assert torch.allclose(torch.tensor(info["logits"]), logits, atol=1e-5)


def test_shortgpt_removes_whole_layers_then_channels(stories_dir):
    from bonsai.checkpoint import load_for_pruning

    model, tokenizer, kept = load_for_pruning(stories_dir)
    n0 = non_embedding_params(model)
    windows = np.random.default_rng(0).integers(3, 512, size=(2, 32))
    result = run_method("shortgpt", model, kept, windows, sparsity=0.5, batch_size=2)
    d = result.details
    assert len(d["block_influence"]) == 5 and len(d["removed_layers"]) == 2  # a layer is ~20% of the model
    assert d["partly_pruned_layers"] and d["partly_pruned_layers"][0] not in d["removed_layers"]
    bi = np.array(d["block_influence"])
    assert set(d["removed_layers"]) == set(np.argsort(bi, kind="stable")[:2].tolist())  # lowest influence first
    for li in d["removed_layers"]:
        layer = model.model.layers[li]
        assert isinstance(layer.self_attn, EmptyAttention) and isinstance(layer.mlp, EmptyMLP)
        assert layer.input_layernorm.weight.numel() == 64  # the layer norms stay
    assert abs((1 - non_embedding_params(model) / n0) - 0.5) <= TOL


def test_llm_pruner_leaves_the_first_and_last_layers_alone(stories_dir):
    from bonsai.checkpoint import load_for_pruning

    assert protected_layers(32) == (4, 2) and protected_layers(30) == (4, 2)  # the paper's 4 + 2 of 32
    assert protected_layers(5) == (1, 1) and protected_layers(2, 0, 0) == (0, 0)
    model, _, kept = load_for_pruning(stories_dir)
    n0 = non_embedding_params(model)
    before = {li: [p.detach().clone() for p in model.model.layers[li].parameters()] for li in (0, 4)}
    windows = np.random.default_rng(0).integers(3, 512, size=(2, 32))
    result = llm_pruner(model, kept, windows, sparsity=0.4, batch_size=2)
    assert result.details["protected_layers"] == [0, 4]
    assert abs((1 - non_embedding_params(model) / n0) - 0.4) <= TOL  # the middle layers carry the whole target
    for li, params in before.items():  # untouched: same shapes, same values, all units kept
        assert all(torch.equal(a, b) for a, b in zip(params, model.model.layers[li].parameters(), strict=True))
        assert result.kept["attn"][li] == kept["attn"][li] and result.kept["mlp"][li] == kept["mlp"][li]
    assert all(len(result.kept["mlp"][li]) < len(kept["mlp"][li]) for li in (1, 2, 3))
    with pytest.raises(BonsaiError, match=r"keeps the first 1 and last 1 of 5 layers .* choose a sparsity below"):
        llm_pruner(load_for_pruning(stories_dir)[0], kept, windows, sparsity=0.62, batch_size=2)
    with pytest.raises(BonsaiError, match="first 1 and last 1 of 2 layers"):  # nothing left to prune
        run_method("llm_pruner", tiny_model("llama"), full_kept(tiny_model("llama")), _windows(), sparsity=0.2,
                   batch_size=2)


def test_config_lists_methods_and_validates_knobs():
    assert set(METHODS) == {"bonsai", *ONE_SHOT}
    with pytest.raises(BonsaiError, match="unknown method 'obs'; choose one of bonsai, flap, wanda_sp"):
        resolve_config({"method": "obs"})
    with pytest.raises(BonsaiError, match="sparse24 .* sparsity must be 0.5"):
        resolve_config({"method": "sparse24", "sparsity": 0.3})
    with pytest.raises(BonsaiError, match="structural_share"):
        resolve_config({"method": "mosaic_composite", "structural_share": 1.5})
    cfg = resolve_config({"method": "mosaic", "mosaic_lambda": 0.05, "mosaic_outlier_m": 7})
    assert (cfg.method, cfg.mosaic_lambda, cfg.mosaic_outlier_m, cfg.structural_share) == ("mosaic", 0.05, 7, 0.5)


# ------------------------------------------------------------------------- flows (Prefect) on stories260K


@pytest.fixture(scope="module")
def flow_runs(stories_dir, tmp_path_factory, prefect_harness):
    from bonsai.cli import main

    root = tmp_path_factory.mktemp("methods")
    outs = {}
    for method, sparsity in (("flap", "0.3"), ("mosaic_composite", "0.4")):
        out = root / method
        args = ["prune", "--model", str(stories_dir), "--out", str(out), "--sparsity", sparsity, "--seed", "0",
                "--method", method, "--calib-windows", "4", "--calib-seq-len", "64", "--heldout-windows", "0"]
        assert main(args) == 0
        outs[method] = out
    return outs


def test_prune_flow_dispatches_one_shot_methods(flow_runs):
    for method, out in flow_runs.items():
        record = read_record(out)
        summary = record["summary"]
        assert BONSAI_SUMMARY_KEYS <= set(summary)
        assert record["method"] == summary["method"] == method and record["config"]["method"] == method
        assert abs(summary["sparsity"] - summary["target_sparsity"]) <= TOL
        # the calibration pass(es) and the check pass; the composite adds a pass over the shrunk model and the refit's
        passes = 2 if method == "flap" else 3
        assert summary["rounds"] == 1 and summary["forward_tokens"] >= passes * 4 * 64
        assert (summary["forward_tokens"] == passes * 4 * 64) is (method == "flap")
        assert summary["calib_ppl_after"] > summary["calib_ppl_before"] > 1
        model = load_pruned_model(out)
        assert non_embedding_params(model) == summary["non_embedding_params_after"]
        assert count_nonzero_non_embedding(model) == summary["nonzero_non_embedding_params_after"]
    composite = read_record(flow_runs["mosaic_composite"])["summary"]
    assert composite["non_embedding_params_after"] > composite["nonzero_non_embedding_params_after"]
    assert 0 < composite["dense_sparsity"] < composite["sparsity"]


def test_flap_checkpoint_of_the_flow_loads_in_fresh_process(flow_runs):
    out = flow_runs["flap"]
    shapes = json.loads((out / "config.json").read_text())["bonsai_layers"]
    assert any(s["down_bias"] for s in shapes)  # a Llama checkpoint whose down_proj now has a bias
    res = subprocess.run([sys.executable, str(FRESH_LOAD), str(out)], capture_output=True, text=True,
                         cwd=out.parent, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["params"] == read_record(out)["summary"]["total_params_after"] and info["generated"] == 8


def test_compare_flow_writes_table_markdown_and_plot(stories_dir, tmp_path, prefect_harness):
    import pandas as pd

    from flows.compare import compare_flow

    res = compare_flow(str(stories_dir), ["magnitude", "sparse24"], [0.3], str(tmp_path / "cmp"),
                       calib_windows=2, calib_seq_len=32, eval_windows=2, eval_seq_len=32, batch_size=2,
                       speed_prompt_len=16, speed_runs=1)
    table = pd.read_parquet(res["table"])
    assert table["method"].tolist() == ["dense", "magnitude", "sparse24"]
    assert table.loc[1, "target_sparsity"] == 0.3 and table.loc[2, "target_sparsity"] == 0.5
    assert (table["eval_ppl"] > 1).all() and table["eval_ppl"].map(math.isfinite).all()
    assert (table.loc[1:, "forward_tokens"] > 0).all() and (table.loc[1:, "peak_rss_mb"] > 0).all()
    assert table.loc[2, "non_embedding_params"] == table.loc[0, "non_embedding_params"]  # 2:4 keeps shapes
    assert table.loc[2, "nonzero_non_embedding_params"] < 0.52 * table.loc[0, "non_embedding_params"]
    assert (table["prefill_speedup"] > 0).all()
    assert "| magnitude |" in Path(res["markdown"]).read_text()
    assert Path(res["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_composite_structural_half_respects_its_per_module_cap():
    from bonsai.methods.mosaic import capped_candidates

    units = unit_table(tiny_model("llama"))
    score = np.random.default_rng(0).random(len(units))
    cand = capped_candidates(units, score, 0.25)
    for _, rows in units.groupby(["layer", "kind"]):
        ids = rows["unit"].to_numpy()
        k = int(np.floor(0.25 * len(ids)))
        assert cand[ids].sum() == k  # the cap's share of every module, its lowest-scored units
        assert set(np.flatnonzero(cand[ids])) == set(np.argsort(score[ids])[:k])
    model, n0, result = _run("mosaic_composite", "llama", 0.5)
    cap = result.details["structural_cap"]
    assert cap < 1.0  # the budget was reachable under the cap: no module can have been emptied
    for kind, per_layer in result.kept.items():
        full = full_kept(tiny_model("llama"))[kind]
        for kept_now, before in zip(per_layer, full, strict=True):
            assert len(before) - len(kept_now) <= np.floor(cap * len(before))
