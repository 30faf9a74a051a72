"""Issue 6, goal 3: peak resident memory of a Bonsai prune against a dense perplexity evaluation with the same
batch, and the same for the LLM-Pruner-style gradient method (backward passes on purpose).

Three runs of the real entry points, each its own process (so each peak is its own), on SmolLM2-135M with the
calibration windows of the `fast` preset (WikiText-2 valid, batch 8):
(a) `bonsai eval` of the dense model on those windows (the baseline);
(b) `bonsai prune --method bonsai --preset fast --sparsity S` (without the held-out report, which is an evaluation);
(c) `bonsai prune --method llm_pruner --sparsity S`.
Peak of a run = the kernel's high-water mark (VmHWM) of the command's main process, plus the peak of the whole
process tree (main process + children such as the temporary Prefect API) sampled every 50 ms from /proc.

    python benchmarks/memory.py            # writes benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path

from common import REPO, WIKI_VALID, bonsai_cmd, provenance, rel, write_result

from bonsai.config import PRESETS

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0  # the process ended between listing and reading


def _hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        p = frontier.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        frontier += [int(c) for c in children]
        pids += [int(c) for c in children]
    return pids


def measure(args: list[str], log_path: Path) -> dict:
    """Run a command; its main process's VmHWM (read just before it exits) and the sampled process-tree peak."""
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        peak = {"tree": 0, "main_hwm": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak["tree"] = max(peak["tree"], sum(_rss(p) for p in _tree(proc.pid)))
                try:
                    peak["main_hwm"] = max(peak["main_hwm"], _hwm(proc.pid))
                except OSError:
                    pass  # exited; the last reading stands
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    if code != 0:
        raise SystemExit(f"command failed ({code}): {shlex.join(args)}\n{log_path.read_text()[-3000:]}")
    return {"command": shlex.join(["python", *args[1:]]), "wall_seconds": time.perf_counter() - started,
            "peak_rss_mib": peak["main_hwm"] / 2**20, "peak_tree_rss_mib": peak["tree"] / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsity", type=float, default=0.2)
    p.add_argument("--work", default=str(REPO / "data" / "bench" / "memory"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "memory.json"))
    args = p.parse_args()
    started = provenance()
    fast = PRESETS["fast"]
    windows, seq_len, batch = fast["calib_windows"], fast["calib_seq_len"], 8
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calib = rel(WIKI_VALID)
    runs = {}
    runs["dense_eval"] = measure(bonsai_cmd("eval", "--model", args.model, "--data", calib, "--windows",
                                            str(windows), "--seq-len", str(seq_len), "--batch-size", str(batch)),
                                 work / "dense_eval.log")
    for method in ("bonsai", "llm_pruner"):
        out = work / method
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(f"{out}.work", ignore_errors=True)
        runs[method] = measure(bonsai_cmd("prune", "--model", args.model, "--method", method, "--preset", "fast",
                                          "--sparsity", str(args.sparsity), "--calib", calib, "--calib-windows",
                                          str(windows), "--calib-seq-len", str(seq_len), "--batch-size", str(batch),
                                          "--heldout-windows", "0", "--out", rel(out)),
                               work / f"{method}.log")
        print(method, runs[method], flush=True)
    base, base_tree = runs["dense_eval"]["peak_rss_mib"], runs["dense_eval"]["peak_tree_rss_mib"]
    write_result(Path(args.out), {
        **started, "model": args.model, "sparsity": args.sparsity,
        "windows": f"{calib}: {windows} x {seq_len} tokens, batch {batch} (preset fast)",
        "runs": runs,
        "ratio_to_dense_eval": {m: runs[m]["peak_rss_mib"] / base for m in ("bonsai", "llm_pruner")},
        "tree_ratio_to_dense_eval": {m: runs[m]["peak_tree_rss_mib"] / base_tree for m in ("bonsai", "llm_pruner")},
    })


if __name__ == "__main__":
    main()
