"""Issue 7 benchmark: post-pruning adaptation of the SmolLM2-135M 50% Bonsai model (benchmarks/prune_smollm2.py).

LoRA on every linear projection (rank 128, alpha 512, lr 1e-4, KL weight 0.01: the paper's settings) distilled from
the dense model, trained on WikiText-2 valid for a CPU-sized budget (default 40 steps × 4 windows × 256 tokens =
40,960 tokens), merged; held-out WikiText-2 test raw perplexity before → after (64 windows × 512 tokens by
default; the full 128 would double the two evaluations on this CPU). Runs `bonsai adapt` as a subprocess (the real
entry point) and reads the numbers from the adapted checkpoint's pruning record.

    OMP_NUM_THREADS=1 python benchmarks/adapt_smollm2.py --pruned data/bench/prune_smollm2_final/s50
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from common import REPO, WIKI_TEST_RAW, WIKI_VALID, bonsai_cmd, provenance, rel, run_measured, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pruned", default=str(REPO / "data" / "bench" / "prune_smollm2_final" / "s50"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=64, help="distinct WikiText-2 valid training windows")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--work", default=str(REPO / "data" / "bench" / "adapt_smollm2"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "adapt_smollm2.json"))
    args = p.parse_args()
    started = provenance()
    if not WIKI_VALID.exists() or not WIKI_TEST_RAW.exists():
        raise SystemExit(f"needs ../shared (WikiText-2): {WIKI_VALID} or {WIKI_TEST_RAW} is absent")
    pruned = Path(args.pruned)
    if not (pruned / "pruning_record.json").is_file():
        raise SystemExit(f"{pruned} is not a pruned checkpoint; run benchmarks/prune_smollm2.py first")
    work = Path(args.work)
    out = work / "s50-adapted"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}.work", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    run = run_measured(
        bonsai_cmd(
            "adapt", "--pruned", rel(pruned), "--out", rel(out), "--data", rel(WIKI_VALID),
            "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--windows", str(args.windows), "--save-every", "10", "--eval-data", rel(WIKI_TEST_RAW),
            "--eval-windows", str(args.eval_windows), "--eval-seq-len", str(args.eval_seq_len),
        ),
        work / "adapt.log",
    )
    a = json.loads((out / "pruning_record.json").read_text())["adaptation"]
    summary = json.loads((pruned / "pruning_record.json").read_text())["summary"]
    ev = a["eval"]
    result = {
        **started,
        "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "pruned": rel(pruned),
        "pruned_sparsity": summary["sparsity"],
        "training": f"WikiText-2 valid (wiki.valid.tokens), {a['data']['n_windows']} windows x {a['data']['seq_len']} "
        f"tokens; {a['steps']} steps x {args.batch_size} windows = {a['tokens_seen']:,} tokens",
        "evaluation": f"WikiText-2 test raw, first {ev['n_windows']} non-overlapping windows x {ev['seq_len']} tokens",
        "wikitext2_test_ppl": {"before": ev["ppl_before"], "after": ev["ppl_after"]},
        "training_loss": {k: a[k] for k in ("loss_window", "loss_start", "loss_end", "ce_start", "ce_end",
                                            "kl_start", "kl_end")},
        "losses": a["losses"],
        "config": a["config"],
        "train_seconds": a["train_seconds"],
        "wall_seconds": run["wall_seconds"],
        "peak_rss_mib": run["peak_rss_mib"],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=1))
    write_result(Path(args.out), result)


if __name__ == "__main__":
    main()
