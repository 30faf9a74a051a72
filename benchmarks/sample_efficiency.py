"""Quality per forward pass (issue 6, goal 2): Bonsai variants pruning SmolLM2-135M to the same target on the same
calibration text, each scored by held-out perplexity against the forward tokens its sub-model evaluations cost.

Every variant is a `bonsai prune` command (flags below) followed by `bonsai eval` on WikiText-2 test. The table
is merged into --out by variant name, so variants can run in separate invocations; each row carries its own
commit and command. With --reuse, a variant whose output directory already holds a finished run of the same
resolved config is evaluated without pruning again (its row says so and keeps that run's own flow wall time).

    python benchmarks/sample_efficiency.py --variants paper_scaled prior_scaled_48x8 --reuse
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
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


def _prior_scaled(n_samples: int, calib_windows: int, sample_windows: int, *extra: str,
                  module_share: str = "fixed") -> list[str]:
    """`bonsai prune` flags of a prior_scaled variant on the fast preset's other knobs."""
    return ["--preset", "fast", "--regression", "prior_scaled", "--module-share", module_share,
            "--n-samples", str(n_samples), "--calib-windows", str(calib_windows), "--sample-windows",
            str(sample_windows), *extra]


# name -> (what it tests, `bonsai prune` flags). The paper preset's full setting (200 sub-models x 32 windows at
# the full 8k context, 10 rounds) is ~500M forward tokens, days on this CPU: `paper_scaled` keeps its estimator,
# utility, prior and 5% rounds but scales sub-models and windows down to the fast preset's calibration windows.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "paper_scaled": ("paper preset (lasso_cv, -ppl, 5%/round), 48 sub-models x 8x128 windows",
                     ["--preset", "paper", "--n-samples", "48", "--calib-windows", "8", "--calib-seq-len", "128"]),
    "ridge_48x8": ("fast preset before this change: ridge per unit, -loss, 10%/round, 48 sub-models x 8x128",
                   ["--preset", "fast", "--regression", "ridge", "--module-share", "fixed", "--n-samples", "48",
                    "--calib-windows", "8", "--sample-windows", "0"]),
    "prior_scaled_48x8": ("prior-scaled regression (kind + module scales on the Wanda prior), 48 x 8x128",
                          _prior_scaled(48, 8, 0)),
    "prior_scaled_uniform_48x8": ("prior-scaled, module drop shares drawn uniformly, 48 x 8x128",
                                  _prior_scaled(48, 8, 0, module_share="uniform")),
    "prior_scaled_24x4": ("prior-scaled, 24 sub-models, 4x128 windows for prior and sub-models",
                          _prior_scaled(24, 4, 0)),
    "prior_scaled_24x4of32": ("prior-scaled, prior from 32x128 windows, 24 sub-models scored on the first 4",
                              _prior_scaled(24, 32, 4)),
    "prior_scaled_32x4of8": ("prior-scaled, prior from the 8x128 windows, 32 sub-models scored on the first 4",
                             _prior_scaled(32, 8, 4)),
    "prior_scaled_40x4of8_p125": ("prior-scaled, 12.5%/round (4 rounds), 40 sub-models on the first 4 of 8x128",
                                  _prior_scaled(40, 8, 4, "--p-iter", "0.125")),
    "prior_scaled_24x4of8": ("prior-scaled, prior from the 8x128 windows, 24 sub-models scored on the first 4",
                             _prior_scaled(24, 8, 4)),
    "prior_scaled_16x4of8_p0625": ("prior-scaled, 6.25%/round (8 rounds), 16 sub-models on the first 4 of 8x128",
                                   _prior_scaled(16, 8, 4, "--p-iter", "0.0625")),
    "prior_scaled_12x4of8_p05": ("prior-scaled, 5%/round (10 rounds), 12 sub-models on the first 4 of 8x128",
                                 _prior_scaled(12, 8, 4, "--p-iter", "0.05")),
    "prior_scaled_24x4of8_seed1": ("prior_scaled_24x4of8 with seed 1 (other calibration windows and masks)",
                                   _prior_scaled(24, 8, 4, "--seed", "1")),
    "prior_scaled_32x4of8_seed1": ("prior_scaled_32x4of8 with seed 1 (other calibration windows and masks)",
                                   _prior_scaled(32, 8, 4, "--seed", "1")),
    # the fast preset with hardware-aligned MLP widths (bonsai.selection): what the faster shapes cost in quality
    "prior_scaled_24x4of8_m8": ("prior_scaled_24x4of8, MLP channels removed in blocks of 8 (widths multiples of 8)",
                                _prior_scaled(24, 8, 4, "--channel-multiple", "8")),
    "prior_scaled_24x4of8_m8_seed1": ("prior_scaled_24x4of8_m8 with seed 1",
                                      _prior_scaled(24, 8, 4, "--channel-multiple", "8", "--seed", "1")),
}


def _merge(out: Path, row: dict, header: dict) -> None:
    """Add or replace one variant's row; a lock keeps concurrent invocations from losing each other's rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = json.loads(out.read_text()) if out.exists() else {**header, "variants": {}}
        table.update({k: v for k, v in header.items() if k not in ("command", "git_commit", "git_dirty")})
        table["variants"][row["variant"]] = row
        paper = table["variants"].get("paper_scaled")
        for r in table["variants"].values():  # tokens and ppl relative to the paper preset's scaled run
            r["tokens_vs_paper"] = r["forward_tokens"] / paper["forward_tokens"] if paper else None
            r["reaches_paper_ppl"] = r["heldout_ppl"] <= paper["heldout_ppl"] if paper else None
        write_result(out, table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--work", default=str(REPO / "data" / "bench" / "sample_efficiency"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sample_efficiency.json"))
    p.add_argument("--reuse", action="store_true", help="evaluate finished runs of the same config as they are")
    args = p.parse_args()
    if not WIKI_VALID.exists():
        raise SystemExit(f"needs ../shared (WikiText-2): {WIKI_VALID} is absent")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    header = {
        "model": args.model, "sparsity": args.sparsity,
        "calibration": "WikiText-2 valid (wiki.valid.tokens)",
        "evaluation": f"WikiText-2 test raw, {args.eval_windows} windows x {args.eval_seq_len} tokens",
        "forward_tokens": "tokens through the model in sub-model evaluations, prior and check passes",
    }
    eval_flags = ["--data", rel(WIKI_TEST_RAW), "--windows", str(args.eval_windows),
                  "--seq-len", str(args.eval_seq_len)]
    for name in args.variants:
        started = provenance()
        what, flags = VARIANTS[name]
        out = work / name
        record = finished_run(out, prune_config_of(flags, args.model, args.sparsity)) if args.reuse else None
        prune = None
        if record is None:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(f"{out}.work", ignore_errors=True)
            prune = run_measured(bonsai_cmd("prune", "--model", args.model, "--sparsity", str(args.sparsity),
                                            "--calib", rel(WIKI_VALID), "--out", rel(out), *flags),
                                 work / f"{name}.prune.log")
            record = json.loads((out / "pruning_record.json").read_text())
        metrics_json = work / f"{name}.eval.json"
        run_measured(bonsai_cmd("eval", "--model", rel(out), *eval_flags, "--json", str(metrics_json)),
                     work / f"{name}.eval.log")
        s = record["summary"]
        row = {
            "variant": name, "what": what, "prune_flags": flags, **started,
            "heldout_ppl": json.loads(metrics_json.read_text())["ppl"],
            "forward_tokens": s["forward_tokens"], "rounds": s["rounds"], "realised_sparsity": s["sparsity"],
            "calib_ppl": [s["calib_ppl_before"], s["calib_ppl_after"]],
            "pruned_by_this_run": prune is not None, "prune_flow_seconds": s["wall_seconds"],
            "prune_peak_rss_mib": prune["peak_rss_mib"] if prune else None,
        }
        print(json.dumps(row, indent=1), flush=True)
        _merge(Path(args.out), row, header)


if __name__ == "__main__":
    main()
