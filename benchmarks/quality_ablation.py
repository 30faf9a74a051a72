"""Issue 13 ablation: the levers of the fast preset switched off one at a time, per sparsity and seed, each run
scored by WikiText-2 test perplexity (128 windows × 512 tokens, the windows of compare_smollm2.json).

Every row is a `bonsai prune` (calibration on WikiText-2 valid, the variant's flags over the fast preset) and a
`bonsai eval`. Rows are merged into --out by (variant, sparsity, seed), so the table grows over invocations; each
row carries its own commit and command, and a summary per (variant, sparsity) gives mean, min, max and max/min over
the seeds present. A finished run of the same resolved config is reused (its row says so).

    python benchmarks/quality_ablation.py --variants default no_refit --sparsities 0.2 0.5 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import statistics
from pathlib import Path

from common import (
    REPO,
    WIKI_TEST_RAW,
    WIKI_VALID,
    bonsai_cmd,
    finished_run,
    provenance,
    prune_config_of,
    rel,
    run_measured,
    write_result,
)

# name -> (lever, what it changes against the fast preset, `bonsai prune` flags)
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "default": ("-", "the fast preset as shipped", []),
    "no_refit": ("4 compensation", "no weight compensation", ["--compensation", "none"]),
    "bias_only": ("4 compensation", "FLAP's mean-bias compensation instead of the refit", ["--compensation", "bias"]),
    "small_statistics": ("1 statistics budget", "the previous windows: prior and refit on 8 x 128 tokens, "
                         "sub-models on the first 4", ["--calib-windows", "8", "--calib-seq-len", "128",
                                                       "--sample-windows", "4"]),
    "per_unit_regression": ("2 allocation", "a free ridge coefficient per unit instead of the prior scaled per "
                            "(layer, module) by the sub-model scores", ["--regression", "ridge"]),
    "loss_utility": ("3 utility", "-mean NLL instead of -KL to the dense model", ["--utility", "loss"]),
    "kl_utility": ("3 utility", "-KL to the dense model instead of -mean NLL", ["--utility", "kl"]),
}


def _merge(out: Path, row: dict, header: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = json.loads(out.read_text()) if out.exists() else {**header, "rows": {}}
        table.update({k: v for k, v in header.items() if k not in ("command", "git_commit", "git_dirty")})
        table["rows"][f"{row['variant']}-s{row['sparsity']:g}-seed{row['seed']}"] = row
        summary = {}
        for r in table["rows"].values():
            summary.setdefault(f"{r['variant']}-s{r['sparsity']:g}", []).append(r["heldout_ppl"])
        table["summary"] = {
            k: {"seeds": len(v), "mean_ppl": statistics.fmean(v), "min_ppl": min(v), "max_ppl": max(v),
                "max_over_min": max(v) / min(v)}
            for k, v in sorted(summary.items())
        }
        write_result(out, table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), required=True)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--work", default=str(REPO / "data" / "bench" / "quality_ablation"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality_ablation.json"))
    p.add_argument("--reuse-compare", default=str(REPO / "data" / "bench" / "compare_smollm2"),
                   help="a `bonsai compare` directory whose finished bonsai runs of the same config are evaluated "
                        "instead of pruning again (compare_smollm2.py's seed-0 runs)")
    args = p.parse_args()
    if not WIKI_VALID.exists():
        raise SystemExit(f"needs ../shared (WikiText-2): {WIKI_VALID} is absent")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    header = {
        "model": args.model,
        "calibration": "WikiText-2 valid (wiki.valid.tokens), windows drawn with the run's seed",
        "evaluation": f"WikiText-2 test raw, {args.eval_windows} windows x {args.eval_seq_len} tokens",
        "variants": {k: {"lever": v[0], "what": v[1], "prune_flags": v[2]} for k, v in VARIANTS.items()},
    }
    eval_flags = ["--data", rel(WIKI_TEST_RAW), "--windows", str(args.eval_windows),
                  "--seq-len", str(args.eval_seq_len)]
    for sparsity in args.sparsities:
        for seed in args.seeds:
            for name in args.variants:
                started = provenance()
                flags = [*VARIANTS[name][2], "--seed", str(seed), "--heldout-windows", "0"]
                run = f"{name}-s{round(sparsity * 100):02d}-seed{seed}"
                out = work / run
                config = prune_config_of(flags, args.model, sparsity)
                record = finished_run(out, config)
                compared = Path(args.reuse_compare) / "runs" / f"bonsai-s{round(sparsity * 1000):03d}"
                if record is None and finished_run(compared, config) is not None:
                    out, record = compared, finished_run(compared, config)
                prune = None
                if record is None:
                    shutil.rmtree(out, ignore_errors=True)
                    shutil.rmtree(f"{out}.work", ignore_errors=True)
                    prune = run_measured(bonsai_cmd("prune", "--model", args.model, "--sparsity", str(sparsity),
                                                    "--calib", rel(WIKI_VALID), "--out", rel(out), *flags),
                                         work / f"{run}.prune.log")
                    record = json.loads((out / "pruning_record.json").read_text())
                metrics_json = work / f"{run}.eval.json"
                run_measured(bonsai_cmd("eval", "--model", rel(out), *eval_flags, "--json", rel(metrics_json)),
                             work / f"{run}.eval.log")
                s = record["summary"]
                row = {
                    "variant": name, "sparsity": sparsity, "seed": seed, "prune_flags": flags, **started,
                    "heldout_ppl": json.loads(metrics_json.read_text())["ppl"],
                    "forward_tokens": s["forward_tokens"], "rounds": s["rounds"], "realised_sparsity": s["sparsity"],
                    "calib_ppl": [s["calib_ppl_before"], s["calib_ppl_after"]],
                    "checkpoint": rel(out), "pruned_by_this_run": prune is not None,
                    "prune_flow_seconds": s["wall_seconds"],
                    "prune_peak_rss_mib": prune["peak_rss_mib"] if prune else None,
                }
                print(json.dumps(row), flush=True)
                _merge(Path(args.out), row, header)


if __name__ == "__main__":
    main()
