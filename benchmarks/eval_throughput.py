"""Issue 6, goal 1: throughput of a sub-model evaluation (what a Bonsai shard does) against a plain dense forward
over the same tokens, on SmolLM2-135M with the `fast` preset's calibration (8 windows × 128 tokens of
WikiText-2 valid, batch 8).

Variants, each `bonsai.evaluate.mean_nll` over the same windows:
- dense: no hooks.
- hooks_idle: UnitMasker installed, nothing dropped (the pure cost of having the hooks).
- masked@D / sliced@D: a sub-model dropping D of the units — hooks zeroing the dropped inputs (UnitMasker) vs
  the weights physically sliced for the evaluation (`bonsai.masking.sliced_submodel`, slicing time included).
  D = the round-0 sub-models the prune actually samples (wanda prior, p 0.1, antithetic pairs), and fixed
  random shares 25% and 50% of every module's units.
Repeats are interleaved (every variant once per repeat, order rotated), so background load hits all alike;
the figures are medians over repeats, and ratios are medians of the per-repeat ratios to the dense time, in
wall time and in this process's CPU time (less sensitive to other jobs on a shared machine).

    python benchmarks/eval_throughput.py            # writes benchmarks/results/eval_throughput.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import REPO, WIKI_VALID, provenance, rel, write_result

from bonsai.checkpoint import load_for_pruning
from bonsai.config import PRESETS
from bonsai.data import prepare_windows
from bonsai.evaluate import mean_nll
from bonsai.masking import SLICE_MIN_DROP, UnitMasker, dropped_share, sliced_submodel
from bonsai.prior import collect_activation_stats, unit_prior
from bonsai.sampling import candidate_mask, sample_masks
from bonsai.sources import resolve_model_source
from bonsai.units import unit_table


def random_drop(units, share: float, rng: np.random.Generator) -> np.ndarray:
    keep = np.ones(len(units), dtype=bool)
    for _, rows in units.groupby(["layer", "kind"], sort=True):
        ids = rows["unit"].to_numpy()
        keep[rng.choice(ids, size=round(share * len(ids)), replace=False)] = False
    return keep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=8)
    # One torch thread by default: the ratios are the point, and on a 2-core machine shared with other jobs two
    # OpenMP threads wait on each other whenever one is descheduled (measured here: a 2-thread evaluation took
    # 3-4x the wall time of a 1-thread one under load), which swamps a 5% effect. A Dask shard worker runs
    # with one thread too.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_throughput.json"))
    args = p.parse_args()
    started = provenance()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    fast = PRESETS["fast"]
    model, tokenizer, kept = load_for_pruning(resolve_model_source(args.model))
    win, _ = prepare_windows(str(WIKI_VALID), tokenizer, n_windows=fast["calib_windows"],
                             seq_len=fast["calib_seq_len"], seed=0, purpose="calibration")
    units = unit_table(model, kept)
    stats, _ = collect_activation_stats(model, win, args.batch_size)
    prior = unit_prior(model, units, fast["prior"], stats=stats, seed=0)
    cand = candidate_mask(units, prior, fast["p_iter"])
    sampled = sample_masks(units, prior, cand, fast["p_iter"], 2 * args.repeats, seed=0)
    rng = np.random.default_rng(0)
    masks = {"round0": sampled[: args.repeats],  # one sub-model per repeat
             "25pct": [random_drop(units, 0.25, rng) for _ in range(args.repeats)],
             "50pct": [random_drop(units, 0.5, rng) for _ in range(args.repeats)]}

    def dense(r):
        return mean_nll(model, win, args.batch_size, desc=None)

    def hooks_idle(r):
        with UnitMasker(model, units) as m:
            m.set(None)
            return mean_nll(model, win, args.batch_size, desc=None)

    def masked(name):
        def run(r):
            with UnitMasker(model, units) as m:
                m.set(masks[name][r])
                return mean_nll(model, win, args.batch_size, desc=None)
        return run

    def sliced(name):
        def run(r):
            with sliced_submodel(model, units, masks[name][r], kept) as sub:
                return mean_nll(sub, win, args.batch_size, desc=None)
        return run

    variants = {"dense": dense, "hooks_idle": hooks_idle}
    for name in masks:
        variants[f"masked@{name}"], variants[f"sliced@{name}"] = masked(name), sliced(name)
    seconds = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    nll = {v: [] for v in variants}
    order = list(variants)
    for v in order:  # warm-up: first-touch allocations and lazy initialisation out of the timings
        variants[v](0)
    for r in range(args.repeats):
        for v in order[r % len(order):] + order[: r % len(order)]:
            t0, c0 = time.perf_counter(), time.process_time()
            nll[v].append(variants[v](r))
            seconds[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
        print(f"repeat {r}: " + ", ".join(f"{v} {seconds[v][-1]:.2f}s" for v in order), flush=True)

    tokens = int(win.size)
    out = {}
    for v in order:
        ratios = [d / s for d, s in zip(seconds["dense"], seconds[v], strict=True)]
        cpu_ratios = [d / s for d, s in zip(cpu["dense"], cpu[v], strict=True)]
        out[v] = {"median_seconds": statistics.median(seconds[v]),
                  "tokens_per_s": tokens / statistics.median(seconds[v]),
                  "throughput_vs_dense": statistics.median(ratios),
                  "cpu_throughput_vs_dense": statistics.median(cpu_ratios),
                  "seconds": seconds[v], "cpu_seconds": cpu[v]}
    shares = {name: float(np.mean([dropped_share(units, k) for k in masks[name]]))
              for name in masks}
    agreement = {name: max(abs(a - b) for a, b in zip(nll[f"masked@{name}"], nll[f"sliced@{name}"], strict=True))
                 for name in masks}
    write_result(Path(args.out), {
        **started, "model": args.model, "torch_threads": torch.get_num_threads(),
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "windows": f"{rel(WIKI_VALID)}: {win.shape[0]} windows x {win.shape[1]} tokens (preset fast), "
                   f"batch {args.batch_size}",
        "tokens_per_evaluation": tokens, "repeats": args.repeats,
        "dropped_param_share": shares, "slice_min_drop": SLICE_MIN_DROP,
        "max_abs_nll_diff_masked_vs_sliced": agreement,
        "variants": out,
    })


if __name__ == "__main__":
    main()
