"""Issue 15, point 6: how long the CLI takes before it does anything useful, on this machine.

Three measurements of the real entry point, each its own process, on stories260K (../shared):
- `bonsai prune --help`;
- a refused bad input: `bonsai prune` into a non-empty output directory without --overwrite;
- start-up of a prune: from launch until the first Bonsai round begins (the log's "bonsai rounds" progress bar
  appears: arguments checked, temporary Prefect API up, model resolved, calibration windows made).
Each is the median of --repeats runs. The rows are merged into --out under --label ("before" / "after"); --code
names the checkout whose CLI is measured (default: this one), so one script gives the before/after table, every
row with the commit it measured.

    git worktree add ../before 05120ac
    python benchmarks/cli_latency.py --label before --code ../before
    python benchmarks/cli_latency.py --label after
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import REPO, SHARED, bonsai_cmd, provenance, rel, write_result

STORIES = SHARED / "assets/models/stories260K"
FIRST_ROUND = "bonsai rounds"


CODE = REPO  # the checkout whose CLI runs (main() may point it elsewhere)


def _env() -> dict[str, str]:
    return {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(CODE)}


def _timed(args: list[str]) -> tuple[float, int, str]:
    started = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=CODE)
    return time.perf_counter() - started, res.returncode, res.stderr.strip().splitlines()[-1:]


def _until_first_round(args: list[str]) -> float:
    """Seconds from launch until the first round's progress bar shows; the run is then stopped."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), text=True,
                            start_new_session=True, cwd=CODE)
    try:
        for line in proc.stdout:
            if FIRST_ROUND in line:
                return time.perf_counter() - started
        raise SystemExit(f"the prune ended (rc {proc.wait()}) before its first round: {' '.join(args)}")
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="row name, e.g. before / after")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--code", default=str(REPO), help="the checkout whose CLI is measured")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cli_latency.json"))
    args = p.parse_args()
    global CODE
    CODE = Path(args.code).resolve()
    if not STORIES.is_dir():
        raise SystemExit(f"needs ../shared (stories260K): {STORIES} is absent")
    started = provenance()
    measured = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CODE, capture_output=True, text=True).stdout.strip()
    scratch = Path(tempfile.mkdtemp(prefix="cli-latency-"))
    try:
        busy = scratch / "busy"
        busy.mkdir()
        (busy / "someone_elses_file.txt").write_text("x")
        prune = ["prune", "--model", str(STORIES), "--sparsity", "0.2", "--calib-windows", "4", "--calib-seq-len",
                 "64", "--heldout-windows", "0"]

        def shown(cmd: list[str]) -> str:  # as recorded: paths relative to the repository, the scratch dir named
            return " ".join(rel(a) if a.startswith(str(SHARED)) else a.replace(str(scratch), "SCRATCH")
                            for a in cmd[1:])

        help_cmd = bonsai_cmd("prune", "--help")
        refused_cmd = bonsai_cmd(*prune, "--out", str(busy))
        rows: dict[str, dict] = {}
        for name, cmd in (("prune_help", help_cmd), ("refused_non_empty_out", refused_cmd)):
            runs = [_timed(cmd) for _ in range(args.repeats)]
            rows[name] = {"command": shown(cmd), "seconds": statistics.median(r[0] for r in runs),
                          "exit_code": runs[0][1], "message": [m.replace(str(scratch), "SCRATCH") for m in runs[0][2]]}
        startup = []
        for i in range(args.repeats):
            out = scratch / f"run{i}"
            startup.append(_until_first_round(bonsai_cmd(*prune, "--out", str(out))))
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(f"{out}.work", ignore_errors=True)
        rows["startup_before_first_round"] = {"command": shown(bonsai_cmd(*prune, "--out", "OUT")),
                                              "seconds": statistics.median(startup), "all_seconds": startup}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = Path(args.out)
    table = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    table["what"] = __doc__.split("\n\n")[0]
    table["rows"][args.label] = {**started, "measured_commit": measured, "load_average_at_start": os.getloadavg(),
                                 "repeats": args.repeats, **rows}
    write_result(out, table)


if __name__ == "__main__":
    main()
