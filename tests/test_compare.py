"""`bonsai compare` on stories260K: the comparison table with measured prefill speed-up and reference metrics on a
subset of the evaluation windows, reuse of finished runs and of their evaluation / speed results, the
perplexity-only mode, and one-line errors for bad inputs."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from bonsai.cli import main
from flows.compare import COLUMNS

TINY = ["--sparsities", "0.3", "--seed", "0", "--calib-windows", "2", "--calib-seq-len", "32", "--eval-windows", "4",
        "--eval-seq-len", "32", "--batch-size", "2", "--speed-prompt-len", "32", "--speed-runs", "2"]


def _mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "results").iterdir())}


def test_compare_cli_table_speed_reference_subset_and_reuse(stories_dir, tmp_path, prefect_harness, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(stories_dir), "--methods", "magnitude", "wanda_sp", "llm_pruner", "--out",
            str(out), "--reference-windows", "2", *TINY]
    assert main(args) == 0
    assert "prefill speed-up" in capsys.readouterr().out
    table = pd.read_parquet(out / "comparison.parquet")
    assert list(table.columns) == COLUMNS
    assert table["method"].tolist() == ["dense", "magnitude", "wanda_sp", "llm_pruner"]
    runs = table.iloc[1:]
    assert (abs(runs["sparsity"] - 0.3) <= 0.005).all()
    assert (runs["prefill_speedup"] > 0).all() and (runs["prefill_tokens_per_s"] > 0).all()
    assert table.loc[0, "prefill_speedup"] == 1.0 and table.loc[0, "prefill_tokens_per_s"] > 0
    assert runs["kl"].map(math.isfinite).all() and (runs["kl"] > 0).all()
    assert ((runs["top1_agreement"] > 0) & (runs["top1_agreement"] <= 1)).all()
    assert (runs.loc[runs.method == "llm_pruner", "backward_passes"] == 1).all()  # 2 windows, batch 2
    assert "first 2 of them" in (out / "comparison.md").read_text()
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = _mtimes(out)
    assert {"dense.eval.json", "magnitude-s300.eval.json", "magnitude-s300.reference.json",
            "magnitude-s300.speed.json"} <= set(stored)

    # the same command again: checkpoints, evaluations and speed pairs are all reused, the table is identical
    assert main(args) == 0
    assert _mtimes(out) == stored
    pd.testing.assert_frame_equal(pd.read_parquet(out / "comparison.parquet"), table)

    # perplexity only: no reference metrics, no speed measurement; the runs themselves are reused
    assert main(["compare", "--model", str(stories_dir), "--methods", "magnitude", "--out", str(out),
                 "--no-reference", "--no-speed", *TINY]) == 0
    light = pd.read_parquet(out / "comparison.parquet")
    assert light["method"].tolist() == ["dense", "magnitude"]
    assert light["kl"].isna().all() and light["top1_agreement"].isna().all() and light["prefill_speedup"].isna().all()
    assert light.loc[1, "eval_ppl"] == table.loc[1, "eval_ppl"]  # same windows, same checkpoint
    assert light.loc[1, "wall_seconds"] == table.loc[1, "wall_seconds"]  # the finished run was not pruned again


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "magnitude", "obs", "--sparsities", "0.3"], "unknown method(s) 'obs'; choose from bonsai"),
        (["--methods", "flap", "--sparsities", "0.3", "1.5"], "sparsity must be in (0, 1), got 1.5"),
        (["--methods", "all", "--sparsities", "0.3", "--eval-windows", "4", "--reference-windows", "8"],
         "reference_windows (8) cannot exceed eval_windows (4)"),
        (["--methods", "flap", "--sparsities", "0.3", "--speed-runs", "0"], "speed_runs must be an integer >= 1"),
        (["--methods", "mosaic_composite", "--sparsities", "0.3", "--structural-share", "2"], "structural_share"),
    ],
)
def test_compare_cli_bad_inputs_are_one_line_errors(extra, message, tmp_path, capsys):
    assert main(["compare", "--model", "unused", "--out", str(tmp_path / "cmp"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bonsai: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "cmp").exists()  # refused before any work
