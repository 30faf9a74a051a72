"""Issue 5 benchmark: every pruning method on SmolLM2-135M at 20% and 50% in one harness (`bonsai compare`):
calibration on WikiText-2 valid (the `fast` preset's windows, shared by every run), perplexity on
WikiText-2 test raw (128 windows × 512 tokens), KL / top-1 agreement to the dense model on the first
`--reference-windows` of them, and prefill speed-up measured interleaved with the dense model (batch 1, 512
tokens, median of 5, one torch thread: the machine's cores are shared with other work).

Writes benchmarks/results/compare_smollm2.json (each run, a ranking per sparsity, Bonsai's rank and margin) and
copies comparison.md / .png / .parquet into reports/compare-smollm2/. Resumable: the comparison directory
(`--work`) keeps finished checkpoints and their evaluation / speed results, so re-running the same command
continues where an interrupted one stopped.

    python benchmarks/compare_smollm2.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pandas as pd
from common import REPO, WIKI_TEST_RAW, WIKI_VALID, bonsai_cmd, provenance, rel, run_measured, write_result

TOLERANCE = 0.005  # a run is "at the target" when its non-zero sparsity is within 0.5 points of it
KIND = {
    "bonsai": "structured", "flap": "structured", "wanda_sp": "structured", "llm_pruner": "structured",
    "shortgpt": "structured", "magnitude": "structured", "random": "structured",
    "mosaic": "unstructured", "mosaic_composite": "unstructured + structured", "sparse24": "2:4 semi-structured",
}
ROW_KEYS = ["method", "target_sparsity", "sparsity", "dense_sparsity", "non_embedding_params",
            "nonzero_non_embedding_params", "eval_ppl", "kl", "top1_agreement", "calib_ppl", "prefill_tokens_per_s",
            "prefill_speedup", "wall_seconds", "forward_tokens", "backward_passes", "peak_rss_mb"]


def _value(v):
    """JSON-friendly: numpy scalars to Python, NaN to None."""
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and v != v else v


def _row(r: pd.Series) -> dict:
    row = {k: _value(r[k]) for k in ROW_KEYS}
    if r["method"] != "dense":
        row["kind"] = KIND[r["method"]]
        # a genuinely smaller (and so possibly faster) dense model: structured, with the whole target removed
        whole = abs(row["dense_sparsity"] - row["target_sparsity"]) <= TOLERANCE
        row["smaller_dense_model"] = row["kind"] == "structured" and whole
    return row


def rankings(table: pd.DataFrame, sparsities: list[float]) -> dict:
    """Per target: methods at the target ranked by evaluation perplexity, and Bonsai's place among them."""
    out = {}
    for s in sparsities:
        rows = [_row(r) for _, r in table[(table.method != "dense") & (table.target_sparsity == s)].iterrows()]
        at = sorted((r for r in rows if abs(r["sparsity"] - s) <= TOLERANCE), key=lambda r: r["eval_ppl"])
        entry = {
            "ranking": [{"rank": i + 1, **r} for i, r in enumerate(at)],
            "off_target": [{"method": r["method"], "sparsity": r["sparsity"]} for r in rows if r not in at],
        }
        for scope, pool in (("all", at), ("smaller_dense_models", [r for r in at if r["smaller_dense_model"]])):
            names = [r["method"] for r in pool]
            if "bonsai" not in names:
                continue
            bonsai = pool[names.index("bonsai")]
            others = [r for r in pool if r["method"] != "bonsai"]
            best = others[0] if others else None
            entry[f"bonsai_vs_{scope}"] = {
                "rank": names.index("bonsai") + 1,
                "of": len(pool),
                "bonsai_ppl": bonsai["eval_ppl"],
                "best_other": best["method"] if best else None,
                "best_other_ppl": best["eval_ppl"] if best else None,
                # positive: Bonsai's perplexity is that much above the best other method's (worse)
                "margin_ppl": bonsai["eval_ppl"] - best["eval_ppl"] if best else None,
                "ratio_ppl": bonsai["eval_ppl"] / best["eval_ppl"] if best else None,
            }
        out[f"{s:g}"] = entry
    return out


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", nargs="+", default=["all"])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--preset", default="fast")
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--reference-windows", type=int, default=32, help="KL / top-1 on the first N eval windows")
    p.add_argument("--speed-prompt-len", type=int, default=512)
    p.add_argument("--speed-runs", type=int, default=5)
    p.add_argument("--speed-threads", type=int, default=1)
    p.add_argument("--work", default=str(REPO / "data" / "bench" / "compare_smollm2"), help="comparison directory")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "compare_smollm2.json"))
    p.add_argument("--report-dir", default=str(REPO / "reports" / "compare-smollm2"))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `bonsai compare` flags")
    args = p.parse_args()
    started = provenance()
    if not WIKI_VALID.exists():
        raise SystemExit(f"needs ../shared (WikiText-2): {WIKI_VALID} is absent")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cmd = bonsai_cmd(
        "compare", "--model", args.model, "--methods", *args.methods,
        "--sparsities", *map(str, args.sparsities), "--preset", args.preset, "--calib", rel(WIKI_VALID),
        "--eval-data", rel(WIKI_TEST_RAW), "--eval-windows", str(args.eval_windows),
        "--eval-seq-len", str(args.eval_seq_len), "--reference-windows", str(args.reference_windows),
        "--speed-prompt-len", str(args.speed_prompt_len), "--speed-runs", str(args.speed_runs),
        "--speed-threads", str(args.speed_threads), "--out", rel(work), *args.extra,
    )
    measured = run_measured(cmd, work / "compare.log")
    table = pd.read_parquet(work / "comparison.parquet")
    dense = _row(table.iloc[0])
    runs = [_row(r) for _, r in table.iloc[1:].iterrows()]
    configs = {}
    for r in table.iloc[1:].itertuples():
        record = json.loads((REPO / r.out / "pruning_record.json").read_text())
        configs[Path(r.out).name] = record["config"]
    report = Path(args.report_dir)
    report.mkdir(parents=True, exist_ok=True)
    for name in ("comparison.md", "comparison.png", "comparison.parquet"):
        _copy(work / name, report / name)
    write_result(Path(args.out), {
        **started, "model": args.model, "preset": args.preset,
        "calibration": "WikiText-2 valid (wiki.valid.tokens), the preset's windows, the same for every run",
        "evaluation": f"WikiText-2 test raw, {args.eval_windows} non-overlapping windows x {args.eval_seq_len} tokens; "
                      f"KL / top-1 agreement to the dense model on the first {args.reference_windows}",
        "speed": f"prefill, batch 1, {args.speed_prompt_len} random tokens, median of {args.speed_runs} after one "
                 f"warm-up, {args.speed_threads} torch thread(s), each checkpoint interleaved with the dense model",
        "ranking_rule": "methods whose non-zero sparsity is within 0.5 points of the target, by evaluation "
                        "perplexity; smaller_dense_model is false for mosaic (unstructured), sparse24 (2:4) and "
                        "mosaic_composite (only part of the target removed as whole units): their checkpoints keep "
                        "(most of) the dense shapes, so they are not smaller or faster dense models",
        # this invocation of `bonsai compare` only: a resumed benchmark reuses the runs finished earlier (their own
        # prune wall time and peak RSS are in `runs`)
        "invocation_wall_seconds": measured["wall_seconds"], "invocation_peak_rss_mib": measured["peak_rss_mib"],
        "report": rel(report), "dense": dense, "runs": runs,
        "rankings": rankings(table, args.sparsities), "configs": configs,
    })


if __name__ == "__main__":
    main()
