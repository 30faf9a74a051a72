"""Issue 2 benchmark: SmolLM2-135M pruned by Bonsai to 20% and 50% (preset `fast`), calibration on WikiText-2
valid, perplexity on WikiText-2 test raw (128 windows × 512 tokens). Dense and pruned perplexity, parameters,
wall time, forward tokens, peak RSS. Every prune and evaluation runs as a CLI subprocess (the real entry points).

    python benchmarks/prune_smollm2.py            # writes benchmarks/results/prune_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import REPO, WIKI_TEST_RAW, WIKI_VALID, bonsai_cmd, provenance, rel, run_measured, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.5])
    p.add_argument("--preset", default="fast")
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--work", default=str(REPO / "data" / "bench" / "prune_smollm2"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prune_smollm2.json"))
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `bonsai prune` flags")
    args = p.parse_args()
    started = provenance()
    if not WIKI_VALID.exists():
        raise SystemExit(f"needs ../shared (WikiText-2): {WIKI_VALID} is absent")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    eval_flags = ["--data", rel(WIKI_TEST_RAW), "--windows", str(args.eval_windows), "--seq-len",
                  str(args.eval_seq_len)]

    dense_json = work / "dense_eval.json"
    dense_run = run_measured(bonsai_cmd("eval", "--model", args.model, *eval_flags, "--json", str(dense_json)),
                             work / "dense_eval.log")
    dense = json.loads(dense_json.read_text())
    runs = []
    for sparsity in args.sparsities:
        out = work / f"s{round(sparsity * 100):02d}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(f"{out}.work", ignore_errors=True)
        prune = run_measured(bonsai_cmd("prune", "--model", args.model, "--sparsity", str(sparsity), "--preset",
                                        args.preset, "--calib", rel(WIKI_VALID), "--out", rel(out), *args.extra),
                             work / f"prune_s{sparsity}.log")
        record = json.loads((out / "pruning_record.json").read_text())
        metrics_json = work / f"eval_s{sparsity}.json"
        evaluation = run_measured(bonsai_cmd("eval", "--model", rel(out), *eval_flags, "--json", str(metrics_json)),
                                  work / f"eval_s{sparsity}.log")
        metrics = json.loads(metrics_json.read_text())
        s = record["summary"]
        runs.append({
            "target_sparsity": sparsity, "realised_sparsity": s["sparsity"], "total_sparsity": s["total_sparsity"],
            "non_embedding_params": [s["non_embedding_params_before"], s["non_embedding_params_after"]],
            "total_params": [s["total_params_before"], s["total_params_after"]],
            "dense_ppl": dense["ppl"], "pruned_ppl": metrics["ppl"],
            "calib_ppl": [s["calib_ppl_before"], s["calib_ppl_after"]], "rounds": s["rounds"],
            "forward_tokens": s["forward_tokens"], "prune_wall_seconds": prune["wall_seconds"],
            "prune_flow_seconds": s["wall_seconds"], "prune_peak_rss_mib": prune["peak_rss_mib"],
            "eval_wall_seconds": evaluation["wall_seconds"], "config": record["config"],
        })
        print(json.dumps(runs[-1], indent=1))
    write_result(Path(args.out), {
        **started, "model": args.model, "preset": args.preset,
        "calibration": "WikiText-2 valid (wiki.valid.tokens), tokenised form",
        "evaluation": f"WikiText-2 test raw, {args.eval_windows} non-overlapping windows x {args.eval_seq_len} tokens",
        "dense": {"ppl": dense["ppl"], "eval_wall_seconds": dense_run["wall_seconds"],
                  "eval_peak_rss_mib": dense_run["peak_rss_mib"]},
        "runs": runs,
    })


if __name__ == "__main__":
    main()
