"""Issue 13 benchmark: what the README's main command gives a new user. Runs `make run` (the default preset and
sparsity on SmolLM2-135M, self-generated calibration; only OUT is set, to a fresh directory), times it, and measures the
output against the dense model on WikiText-2 test raw (128 windows × 512 tokens, through `bonsai eval`). The bar:
pruned perplexity ≤ 2 × dense. Writes benchmarks/results/make_run.json.

    python benchmarks/make_run.py
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path

from common import REPO, WIKI_TEST_RAW, bonsai_cmd, provenance, rel, run_measured, write_result

from bonsai.sources import resolve_model_source


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--windows", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--work", default=str(REPO / "data" / "bench" / "make_run"),
                   help="the pruned model, logs and evaluation results")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "make_run.json"))
    args = p.parse_args()
    started = provenance()
    if not WIKI_TEST_RAW.exists():
        raise SystemExit("needs ../shared (WikiText-2 test raw)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pruned = work / "pruned"
    for old in (pruned, Path(f"{pruned}.work")):  # a fresh run, as on a new machine (the model cache stays)
        if old.exists():
            shutil.rmtree(old)
    log = work / "make_run.log"
    with open(log, "w") as fh:
        t = subprocess.run(["/usr/bin/time", "-f", "%e %M", "make", "run", f"OUT={pruned}"], cwd=REPO,
                           stdout=fh, stderr=subprocess.STDOUT)
    if t.returncode != 0:
        raise SystemExit(f"make run failed ({t.returncode}); see {log}")
    text = log.read_text()
    wall, peak_kib = (float(x) for x in text.strip().splitlines()[-1].split())
    sparsity = float(re.search(r"^SPARSITY \?= (\S+)", (REPO / "Makefile").read_text(), re.M).group(1))
    # the summary as printed, with this checkout's location left out (the results hold no machine paths)
    summary_lines = [line.replace(f"{REPO}/", "") for line in text.splitlines()
                     if line.startswith("  ") and line.strip() and "\x1b" not in line]
    metrics = {}
    for name, model in (("dense", str(resolve_model_source("smollm2-135m"))), ("pruned", str(pruned))):
        path = work / f"{name}.eval.json"
        run_measured(bonsai_cmd("eval", "--model", model, "--data", rel(WIKI_TEST_RAW), "--windows",
                                str(args.windows), "--seq-len", str(args.seq_len), "--json", rel(path)),
                     work / f"{name}.eval.log")
        metrics[name] = json.loads(path.read_text())
    dense, pruned_ppl = metrics["dense"]["ppl"], metrics["pruned"]["ppl"]
    write_result(Path(args.out), {
        **started,
        "readme_command": f"make run OUT={rel(pruned)}",
        "makefile_sparsity": sparsity,
        "make_run_wall_seconds": wall,
        "make_run_peak_rss_mib": peak_kib / 1024,
        "make_run_summary": summary_lines,
        "evaluation": f"WikiText-2 test raw, {args.windows} windows x {args.seq_len} tokens",
        "dense_ppl": dense,
        "pruned_ppl": pruned_ppl,
        "ratio_to_dense": pruned_ppl / dense,
        "meets_bar_2x_dense": pruned_ppl <= 2 * dense,
    })


if __name__ == "__main__":
    main()
