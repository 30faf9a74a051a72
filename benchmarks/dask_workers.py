"""Issue 6, goal 4: evaluation shards on Dask through Prefect (prefect-dask), on this machine's cores.

The same short Bonsai prune of SmolLM2-135M (one round: sparsity = p_iter = 0.1, 16 sub-models in shards of
2, the `fast` preset's 8 × 128-token windows of WikiText-2 valid) run four ways, each `bonsai prune` its own
process:
- in_process: `--workers 1`, the thread runner (one shard at a time, torch on every core);
- dask_2x1 / dask_1x2: `--scheduler ADDR` of a local Dask cluster this script starts beforehand, 2 worker
  processes × 1 thread vs 1 worker process × 2 threads (its two shards at a time share one model replica and
  take turns on it; torch gets the worker's 2 threads);
- local_2: `--workers 2`, the cluster that the prune starts itself (start-up included in its time).
Shard phase = from the round's mask table being written to the last shard file, i.e. what the round spends
in evaluations, model replicas loading in the workers included. Every run must give the same weights.

    python benchmarks/dask_workers.py            # writes benchmarks/results/dask_workers.json
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import pandas as pd
from common import REPO, WIKI_VALID, bonsai_cmd, provenance, rel, run_measured, write_result

from bonsai.artifacts import read_table
from bonsai.checkpoint import WEIGHTS_FILE, read_record, sha256_file


def shard_phase(work: Path) -> dict:
    (round_dir,) = sorted(work.glob("round_*"))  # one round by construction
    shards = sorted((round_dir / "shards").glob("shard_*.parquet"))
    table = pd.concat(read_table(p)[0] for p in shards)
    return {
        "shard_phase_seconds": max(p.stat().st_mtime for p in shards) - (round_dir / "masks.parquet").stat().st_mtime,
        "submodel_eval_seconds_median": float(table["seconds"].median()),
        "submodel_eval_seconds_sum": float(table["seconds"].sum()),
        "importance_sha256": sha256_file(round_dir / "importance.parquet"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n-samples", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=2)
    p.add_argument("--work", default=str(REPO / "data" / "bench" / "dask_workers"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dask_workers.json"))
    args = p.parse_args()
    started = provenance()
    from distributed import LocalCluster

    load_before = os.getloadavg()
    environ = dict(os.environ)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    knobs = ["--model", args.model, "--sparsity", "0.1", "--p-iter", "0.1", "--preset", "fast", "--calib",
             rel(WIKI_VALID), "--n-samples", str(args.n_samples), "--shard-size", str(args.shard_size), "--seed", "0"]
    clusters = {"dask_2x1": (2, 1), "dask_1x2": (1, 2)}
    runs = {}
    for name in ("in_process", "dask_2x1", "dask_1x2", "local_2"):
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(f"{out}.work", ignore_errors=True)
        cmd = bonsai_cmd("prune", *knobs, "--out", rel(out))
        if name in clusters:
            n_workers, threads = clusters[name]
            with LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=True,
                              dashboard_address=None) as cluster:
                # LocalCluster leaves its workers' pre-spawn settings (OMP_NUM_THREADS=1, OPENBLAS_NUM_THREADS=1,
                # ...) in this process's environment; the prune process must start with the same one as the others
                os.environ.clear()
                os.environ.update(environ)
                measured = run_measured([*cmd, "--scheduler", cluster.scheduler_address], work / f"{name}.log")
            placement = {"scheduler": "tcp://127.0.0.1:PORT", "dask_workers": n_workers, "threads_per_worker": threads}
        else:
            workers = 2 if name == "local_2" else 1
            measured = run_measured([*cmd, "--workers", str(workers)], work / f"{name}.log")
            placement = {"workers": workers}
        runs[name] = {
            **placement, "command": " ".join(["python", "-m", "bonsai.cli", *cmd[3:]]),
            "total_wall_seconds": measured["wall_seconds"], "peak_rss_mib_main_process": measured["peak_rss_mib"],
            **shard_phase(Path(f"{out}.work")), "weights_sha256": sha256_file(out / WEIGHTS_FILE),
            "sparsity": read_record(out)["summary"]["sparsity"],
        }
        print(name, runs[name], flush=True)
    identical = all(len({r[k] for r in runs.values()}) == 1 for k in ("weights_sha256", "importance_sha256"))
    base = runs["in_process"]
    write_result(Path(args.out), {
        **started, "model": args.model, "cpus": os.cpu_count(),
        # other jobs on the machine slow multi-threaded torch far more than single-threaded workers
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "prune": f"one round, sparsity 0.1, {args.n_samples} sub-models in shards of {args.shard_size}, "
                 "calibration 8 x 128 tokens of WikiText-2 valid (preset fast)",
        "runs": runs, "identical_outputs": identical,
        "shard_phase_speedup_vs_in_process": {k: base["shard_phase_seconds"] / r["shard_phase_seconds"]
                                              for k, r in runs.items()},
        "total_speedup_vs_in_process": {k: base["total_wall_seconds"] / r["total_wall_seconds"]
                                        for k, r in runs.items()},
    })
    if not identical:
        raise SystemExit("outputs differ between worker layouts")


if __name__ == "__main__":
    main()
