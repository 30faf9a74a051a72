"""Speed/memory measurement on tiny models and the Markdown + PNG run report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from bonsai.architectures import layer_shapes, non_embedding_params, total_params
from bonsai.errors import BonsaiError
from bonsai.report import original_shapes_from_config, write_report
from bonsai.shrink import shrink_model
from bonsai.speed import _Bench, compare_speed, dir_size, measure_speed
from bonsai.units import ATTN, full_kept, unit_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pruned(seed: int = 0, share: float = 0.5):
    model = tiny_model("llama")
    units = unit_table(model)
    remove = np.random.default_rng(seed).random(len(units)) < share
    kept = shrink_model(model, units, remove, full_kept(model))
    return model, kept


def test_measure_speed_reports_positive_throughputs_and_memory():
    model = tiny_model("llama")
    model.train()
    r = measure_speed(model, prompt_len=16, new_tokens=6, runs=2, warmup=1, threads=1)
    assert r["params"] == total_params(model) and r["non_embedding_params"] == non_embedding_params(model)
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "generate_tokens_per_s"):
        assert math.isfinite(r[key]) and r[key] > 0, key
    assert len(r["prefill_s"]) == len(r["decode_s"]) == 2 and min(r["decode_s"]) > 0
    assert r["prefill_tokens_per_s"] == pytest.approx(16 / np.median(r["prefill_s"]))
    assert r["decode_tokens_per_s"] == pytest.approx(5 / np.median(r["decode_s"]))
    assert len(r["weight_stream_s"]) == 2
    assert r["kv_cache_bytes"] == 2 * 2 * 2 * 8 * (16 + 6) * 4  # layers x KV heads x (k, v) x head_dim x tokens
    assert r["weight_stream_tokens_per_s"] == pytest.approx(1 / np.median(r["weight_stream_s"]))
    assert r["peak_memory_bytes"] > 0 and r["peak_memory_bytes"] >= r["peak_memory_delta_bytes"] >= 0
    assert r["model_bytes"] == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert r["device"] == "cpu" and r["torch_threads"] == 1
    assert model.training  # the caller's mode is restored


def test_compare_speed_ratios_against_the_first_model(tmp_path):
    dense = tiny_model("llama")
    pruned, _ = _pruned()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "b.bin").write_bytes(b"y" * 234)
    assert dir_size(tmp_path / "d") == 1234 and dir_size(tmp_path / "d" / "a.bin") == 1000
    res = compare_speed({"dense": dense, "pruned": pruned}, prompt_len=12, new_tokens=4, runs=2, threads=1,
                        memory=False, disk={"dense": tmp_path / "d", "pruned": tmp_path / "d" / "a.bin"})
    assert res["baseline"] == "dense" and list(res["models"]) == ["dense", "pruned"]
    assert res["ratios"]["dense"]["prefill_speedup"] == 1.0
    rp = res["ratios"]["pruned"]
    assert rp["params_ratio"] == pytest.approx(total_params(pruned) / total_params(dense)) and rp["params_ratio"] < 1
    assert rp["disk_ratio"] == pytest.approx(1000 / 1234)
    assert rp["decode_speedup"] == pytest.approx(
        res["models"]["pruned"]["decode_tokens_per_s"] / res["models"]["dense"]["decode_tokens_per_s"])
    assert rp["weight_stream_speedup"] == pytest.approx(
        res["models"]["pruned"]["weight_stream_tokens_per_s"] / res["models"]["dense"]["weight_stream_tokens_per_s"])
    with pytest.raises(BonsaiError):
        measure_speed(dense, prompt_len=0)


def test_weight_stream_reads_every_linear_once_lm_head_included():
    pruned, _ = _pruned()
    bench = _Bench(pruned, torch.device("cpu"), prompt_len=4, new_tokens=2, seed=0, compile_decode=False)
    linears = [m for m in pruned.modules() if isinstance(m, torch.nn.Linear)]
    assert bench.linears == linears and pruned.lm_head in bench.linears
    # the pass reads the pruned weights, not the shapes the model started from
    assert sum(m.weight.numel() for m in bench.linears) < sum(
        m.weight.numel() for m in tiny_model("llama").modules() if isinstance(m, torch.nn.Linear))
    assert bench.weight_stream() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_speed_on_cuda():
    model = tiny_model("llama")
    r = measure_speed(model, prompt_len=32, new_tokens=8, runs=2, device="cuda")
    assert r["device"].startswith("cuda") and r["decode_tokens_per_s"] > 0
    assert r["memory_method"] == "torch.cuda.max_memory_allocated" and r["peak_memory_bytes"] >= r["model_bytes"]
    assert next(model.parameters()).device.type == "cpu"  # moved back


def _record(model, kept):
    n0 = 10_000
    return {
        "source_model": "tiny-llama",
        "method": "bonsai",
        "rounds": [
            {"round": 0, "budget": 500, "non_embedding_params": 9_000, "total_params": 12_000, "calib_nll": 1.5,
             "removed_attn_groups": 1, "removed_mlp_channels": 7},
            {"round": 1, "budget": 500, "non_embedding_params": non_embedding_params(model),
             "total_params": total_params(model), "calib_nll": 1.9, "removed_attn_groups": 2,
             "removed_mlp_channels": 9},
        ],
        "kept_units": kept,
        "layer_shapes": layer_shapes(model),
        "summary": {"non_embedding_params_before": n0, "calib_ppl_before": 3.5, "sparsity": 0.5},
    }


def test_report_writes_markdown_and_pngs(tmp_path):
    model, kept = _pruned(seed=3)
    cfg = tiny_model("llama").config
    zs_task = {"metric": "acc_norm", "value": 0.5, "acc": 0.4, "acc_norm": 0.5, "acc_stderr": 0.1,
               "acc_norm_stderr": 0.1, "n": 10}
    zeroshot = {
        "dense": {"lm_eval_version": "0.4.13", "limit": 10, "source": "offline", "mean": 0.5,
                  "tasks": {"piqa": zs_task}},
        "pruned": {"lm_eval_version": "0.4.13", "limit": 10, "source": "offline", "mean": 0.25,
                   "tasks": {"piqa": {**zs_task, "value": 0.25, "acc_norm": 0.25}}},
    }
    speed = compare_speed({"dense": tiny_model("llama"), "pruned": model}, prompt_len=8, new_tokens=3, runs=1,
                          warmup=0, threads=1)
    path = write_report(tmp_path / "run", record=_record(model, kept), eval_metrics={"ppl": 6.6, "kl": 0.12},
                        zeroshot=zeroshot, speed=speed, title="Tiny run",
                        original_shapes=original_shapes_from_config(cfg))
    assert path == tmp_path / "run" / "report.md"
    md = path.read_text()
    assert md.startswith("# Tiny run")
    for png in ("ppl_vs_params.png", "kept_units.png"):
        assert (tmp_path / "run" / png).read_bytes()[:8] == PNG_MAGIC
        assert f"]({png})" in md
    assert "| piqa | acc_norm | 0.5000 ± 0.1000 | 0.2500 ± 0.1000 | 10 |" in md
    assert "| **mean** |" in md and "first 10 documents per task" in md
    n_attn = sum(len(v) for v in kept[ATTN])
    assert f"| **all** | {n_attn} / {cfg.num_hidden_layers * cfg.num_key_value_heads} |" in md
    assert "| 1 | 500 |" in md and f"{math.exp(1.9):.4f}" in md  # round table with perplexity
    assert "prefill tok/s" in md and "| pruned |" in md
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temp files left


def test_report_minimal_and_inconsistent_inputs(tmp_path):
    model, kept = _pruned(seed=4)
    rec = _record(model, kept)
    path = write_report(tmp_path / "r", record=rec, eval_metrics=None, zeroshot=None, speed=None, title="t")
    md = path.read_text()
    assert "inferred from kept indices" in md and "Zero-shot" not in md
    bad = {**rec, "kept_units": {ATTN: kept[ATTN], "mlp": [v[:-1] for v in kept["mlp"]]}}
    with pytest.raises(BonsaiError, match="disagree with kept_units"):
        write_report(tmp_path / "r2", record=bad, eval_metrics=None, zeroshot=None, speed=None, title="t")
    with pytest.raises(BonsaiError, match="original count"):
        write_report(tmp_path / "r3", record=rec, eval_metrics=None, zeroshot=None, speed=None, title="t",
                     original_shapes=[{"attn_groups": 1, "mlp_channels": 1}] * len(kept[ATTN]))


def test_compiled_decode_matches_eager_tokens_on_a_pruned_model():
    """The deployment-style decode (static cache + torch.compile) on a model with layers of different widths:
    the same greedy tokens as eager decoding, and measure_speed records which mode it timed."""
    from bonsai.speed import _compiled_decode_kwargs

    model, _ = _pruned()
    ids = torch.randint(3, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        eager = model.generate(input_ids=ids, **kw)
        compiled = model.generate(input_ids=ids, **kw, **_compiled_decode_kwargs())
    assert torch.equal(eager, compiled)
    r = measure_speed(model, prompt_len=10, new_tokens=5, runs=1, warmup=1, threads=1, memory=False,
                      compile_decode=True)
    assert r["decode_mode"] == "static cache, torch.compile" and r["decode_tokens_per_s"] > 0
