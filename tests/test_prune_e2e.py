"""End to end through the CLI entry point on the real tiny model stories260K (skipped without ../shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bonsai.architectures import non_embedding_params
from bonsai.checkpoint import load_for_pruning, read_record, sha256_file
from bonsai.cli import main
from bonsai.config import PRESETS
from bonsai.data import prepare_windows
from bonsai.evaluate import perplexity
from bonsai.selection import select_removals
from bonsai.shrink import shrink_model
from bonsai.units import unit_table

FRESH_LOAD = Path(__file__).with_name("fresh_load.py")
pytestmark = pytest.mark.usefixtures("prefect_harness")


def _prune(stories_dir, out, *extra):
    args = ["prune", "--model", str(stories_dir), "--out", str(out), "--sparsity", "0.5", "--seed", "0",
            "--heldout-windows", "0", *extra]
    assert main(args) == 0


def _random_prune_to_size(source, target_non_embedding, seed):
    """Remove random units (no importance estimate) until the model has the given size."""
    model, _, kept = load_for_pruning(source)
    units = unit_table(model, kept)
    beta = np.random.default_rng(seed).random(len(units))
    budget = non_embedding_params(model) - target_non_embedding
    remove = select_removals(units, beta, np.ones(len(units), dtype=bool), budget)
    shrink_model(model, units, remove, kept)
    return model


@pytest.fixture(scope="module")
def pruned(stories_dir, tmp_path_factory, prefect_harness):
    out = tmp_path_factory.mktemp("e2e") / "pruned"
    _prune(stories_dir, out)
    return out


def test_prune_hits_target_and_records_everything(pruned):
    record = read_record(pruned)
    summary = record["summary"]
    assert abs(summary["sparsity"] - 0.5) <= 0.005
    model, _, _ = load_for_pruning(pruned)
    assert non_embedding_params(model) == summary["non_embedding_params_after"]
    assert record["config"]["preset"] == "fast" and record["seed"] == 0
    assert record["calibration"]["source"] == "self" and record["source_sha256"]
    assert Path(record["source_path"]).is_dir() and (Path(record["source_path"]) / "config.json").is_file()
    assert len(record["rounds"]) == summary["rounds"] >= 5
    assert all("calib_nll" in r and "non_embedding_params" in r for r in record["rounds"])
    shapes = json.loads((pruned / "config.json").read_text())["bonsai_layers"]
    assert [len(k) for k in record["kept_units"]["mlp"]] == [s["mlp_channels"] for s in shapes]
    assert record["weights_sha256"] == sha256_file(pruned / "model.safetensors")


def test_pruned_model_loads_in_fresh_process_and_generates(pruned):
    res = subprocess.run(
        [sys.executable, str(FRESH_LOAD), str(pruned)], capture_output=True, text=True, cwd=pruned.parent, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["params"] == read_record(pruned)["summary"]["total_params_after"]
    assert info["generated"] == 8 and info["text"].startswith("<s> Once upon a time")


def test_bonsai_beats_random_units_on_held_out_text(pruned, stories_dir):
    dense, tokenizer, _ = load_for_pruning(stories_dir)
    windows, _ = prepare_windows(
        "self", tokenizer, n_windows=16, seq_len=128, seed=0, purpose="evaluation", model=dense
    )
    bonsai_model, _, _ = load_for_pruning(pruned)
    target = non_embedding_params(bonsai_model)
    bonsai_ppl = perplexity(bonsai_model, windows)
    random_ppls = [perplexity(_random_prune_to_size(stories_dir, target, seed), windows) for seed in range(3)]
    assert bonsai_ppl < np.mean(random_ppls), (bonsai_ppl, random_ppls)


def test_same_seed_gives_bitwise_identical_weights(pruned, stories_dir, tmp_path):
    again = tmp_path / "again"
    _prune(stories_dir, again)
    assert sha256_file(again / "model.safetensors") == sha256_file(pruned / "model.safetensors")
    assert read_record(again)["kept_units"] == read_record(pruned)["kept_units"]


def test_eval_command_writes_metrics(pruned, stories_dir, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    rc = main(
        [
            "eval",
            "--model",
            str(pruned),
            "--reference",
            str(stories_dir),
            "--windows",
            "4",
            "--seq-len",
            "64",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    metrics = json.loads(out.read_text())
    assert metrics["ppl"] > 1 and metrics["kl"] > 0 and 0 < metrics["top1_agreement"] < 1
    assert "KL to reference" in capsys.readouterr().out


def test_eval_command_zero_shot_offline(pruned, zeroshot_dir, tmp_path, capsys):
    out = tmp_path / "zs.json"
    rc = main(
        [
            "eval",
            "--model",
            str(pruned),
            "--windows",
            "2",
            "--seq-len",
            "32",
            "--zeroshot",
            "piqa,boolq",
            "--zeroshot-dir",
            str(zeroshot_dir),
            "--limit",
            "4",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    zs = json.loads(out.read_text())["zeroshot"]
    assert set(zs["tasks"]) == {"piqa", "boolq"} and zs["limit"] == 4
    assert all(0.0 <= t["value"] <= 1.0 for t in zs["tasks"].values())
    assert "zero-shot (lm-eval" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flag, value", [("--windows", "0"), ("--seq-len", "1"), ("--batch-size", "0"), ("--limit", "0")]
)
def test_eval_rejects_bad_numbers(pruned, capsys, flag, value):
    _fails(["eval", "--model", str(pruned), flag, value], capsys, f"{flag} must be >= ")


def test_eval_rejects_unknown_zero_shot_task(pruned, capsys):
    _fails(["eval", "--model", str(pruned), "--zeroshot", "piqa,mmlu"], capsys, "unknown zero-shot task(s) mmlu")


def _fails(args, capsys, match):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("bonsai: error: ") and match in err[-1], err


@pytest.mark.parametrize("sparsity", ["0", "1", "1.5", "-0.2"])
def test_sparsity_outside_open_interval(sparsity, tmp_path, capsys, stories_dir):
    _fails(
        ["prune", "--model", str(stories_dir), "--sparsity", sparsity, "--out", str(tmp_path / "o")],
        capsys,
        "sparsity must be in (0, 1)",
    )
    assert not (tmp_path / "o").exists()


def test_errors_leave_no_output(tmp_path, capsys, stories_dir):
    out = tmp_path / "o"
    common = ["--sparsity", "0.5", "--out", str(out)]
    _fails(["prune", "--model", str(tmp_path / "missing"), *common], capsys, "model path not found")
    pickle_dir = tmp_path / "pickled"
    pickle_dir.mkdir()
    (pickle_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickle_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    _fails(["prune", "--model", str(pickle_dir), *common], capsys, "pickle")
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.\n")
    windows = PRESETS["fast"]["calib_windows"]
    _fails(["prune", "--model", str(stories_dir), "--calib", str(short), *common], capsys, f"tokens; {windows} windows")
    _fails(
        ["prune", "--model", str(stories_dir), "--sparsity", "0.998", "--out", str(out)],
        capsys,
        "cannot be reached without removing every prunable unit",
    )
    assert not out.exists() and not Path(f"{out}.work").exists()


def test_prune_reports_held_out_perplexity_and_continuations(stories_dir, tmp_path, capsys):
    """The main job's summary: dense -> pruned perplexity on held-out self-generated text, and both models'
    greedy continuation of one prompt; a bad held-out setting is a one-line error."""
    out = tmp_path / "o"
    args = ["prune", "--model", str(stories_dir), "--out", str(out), "--sparsity", "0.2", "--n-samples", "8",
            "--heldout-windows", "4", "--heldout-seq-len", "64"]
    assert main(args) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if "held-out perplexity:" in x)
    dense, pruned = (float(v) for v in line.split(":", 1)[1].split("(")[0].split("->"))
    assert 1.0 < dense < pruned and "4 windows x 64 tokens" in line
    assert "dense:  '" in text and "pruned: '" in text
    _fails([*args[:4], str(tmp_path / "o2"), "--heldout-windows", "-1"], capsys, "--heldout-windows must be >= 0")


def test_unknown_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    _fails(
        [
            "prune",
            "--model",
            str(gpt2),
            "--sparsity",
            "0.5",
            "--out",
            str(tmp_path / "o"),
            "--calib",
            str(gpt2 / "config.json"),
        ],
        capsys,
        "unsupported architecture 'gpt2'; supported model types",
    )
    assert not (tmp_path / "o").exists()


def test_flow_publishes_round_and_summary_artifacts(pruned):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    rounds = read_record(pruned)["summary"]["rounds"]
    keys = [f"bonsai-round-{r}" for r in range(rounds)] + ["bonsai-summary"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    found = {a.key: a for a in artifacts}
    assert set(found) == set(keys)
    assert "| sparsity | calibration ppl |" in found["bonsai-round-0"].data
    assert "calib_ppl_after" in found["bonsai-summary"].data


def test_channel_multiple_keeps_every_mlp_width_aligned(stories_dir, tmp_path, capsys):
    out = tmp_path / "aligned"
    _prune(stories_dir, out, "--channel-multiple", "8")  # 172 = 21 x 8 + 4
    record = read_record(out)
    assert record["config"]["channel_multiple"] == 8
    assert abs(record["summary"]["sparsity"] - 0.5) <= 0.005
    widths = [s["mlp_channels"] for s in json.loads((out / "config.json").read_text())["bonsai_layers"]]
    assert all(w % 8 == 0 for w in widths) and sum(widths) < 5 * 172, widths
    _fails(["prune", "--model", str(stories_dir), "--channel-multiple", "0", "--out", str(tmp_path / "o")], capsys,
           "channel_multiple must be >= 1")
    assert not (tmp_path / "o").exists()
