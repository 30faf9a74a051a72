"""Which importance estimate should pick the units? Reuses one finished Bonsai round (its prior table, sub-model
masks and utilities), applies each estimator, removes the same parameter budget from the round's input model and
measures held-out perplexity. No new sub-model evaluations: the comparison isolates the estimator.

    python benchmarks/regression_variants.py --round-dir data/exp/r1.work/round_00-... --model smollm2-135m
"""

from __future__ import annotations

import argparse
import glob
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import WIKI_TEST_RAW, provenance, write_result

from bonsai.artifacts import read_table
from bonsai.checkpoint import load_for_pruning
from bonsai.data import prepare_windows
from bonsai.evaluate import perplexity
from bonsai.regression import estimate_importance
from bonsai.selection import select_removals
from bonsai.shrink import shrink_model
from bonsai.sources import resolve_model_source
from tasks.prune_tasks import read_keep_masks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--round-dir", required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--out", default="benchmarks/results/regression_variants.json")
    args = p.parse_args()
    started = provenance()
    rd = Path(args.round_dir)
    units, _ = read_table(rd / "prior.parquet")
    keep = read_keep_masks(str(rd / "masks.parquet"))
    scores = pd.concat([read_table(f)[0] for f in sorted(glob.glob(str(rd / "shards" / "*.parquet")))])
    utility = scores.sort_values("sample")["utility"].to_numpy()
    budget = int(sorted(rd.glob("checkpoint-*"))[0].name.split("-")[1].split(".")[0])
    cand = units["candidate"].to_numpy()
    prior = units["prior"].to_numpy()
    source = resolve_model_source(args.model)
    _, tokenizer, _ = load_for_pruning(source)
    windows, _ = prepare_windows(str(WIKI_TEST_RAW), tokenizer, n_windows=args.eval_windows,
                                 seq_len=args.eval_seq_len, seed=0, purpose="evaluation")
    cost = units["cost"].to_numpy()[cand].astype(float)
    ridge = estimate_importance(keep[:, cand], utility, "ridge", seed=0, prior=prior[cand])
    dense, _, _ = load_for_pruning(source)
    dense_ppl = perplexity(dense, windows, batch_size=4)
    print({"dense_ppl": dense_ppl}, flush=True)
    del dense
    variants = {
        "prior_only": lambda: prior[cand],
        "ridge": lambda: ridge,
        "ridge_per_parameter": lambda: ridge / cost,
        "lasso_cv": lambda: estimate_importance(keep[:, cand], utility, "lasso_cv", seed=0, prior=prior[cand]),
        "random": lambda: np.random.default_rng(0).random(cand.sum()),
    }
    rows = []
    for name, fn in variants.items():
        t0 = time.perf_counter()
        beta = np.full(len(units), np.inf)
        beta[cand] = fn()
        fit_s = time.perf_counter() - t0
        model, _, kept = load_for_pruning(source)
        remove = select_removals(units, beta, cand, budget)
        shrink_model(model, units, remove, kept)
        ppl = perplexity(model, windows, batch_size=4)
        rows.append({"estimator": name, "heldout_ppl": ppl, "fit_seconds": fit_s,
                     "removed_attn_groups": int(remove[units.kind.to_numpy() == "attn"].sum()),
                     "removed_mlp_channels": int(remove[units.kind.to_numpy() == "mlp"].sum())})
        print(rows[-1], flush=True)
    write_result(Path(args.out), {**started, "round_dir": str(rd), "n_samples": len(keep),
                                  "n_candidates": int(cand.sum()), "budget_params": budget, "dense_ppl": dense_ppl,
                                  "evaluation": f"WikiText-2 test raw {args.eval_windows}x{args.eval_seq_len}",
                                  "variants": rows})


if __name__ == "__main__":
    main()
