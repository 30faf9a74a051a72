"""Helpers shared by the benchmark scripts: run a command and measure it, record provenance, write JSON."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WIKI_VALID = SHARED / "assets/corpus/wikitext-2/wiki.valid.tokens"
WIKI_TEST_RAW = SHARED / "assets/corpus/wikitext-2/wiki.test.raw"


def run_measured(args: list[str], log_path: Path) -> dict:
    """Run a command to completion; wall time and the child's own peak RSS (from wait4), output to a log."""
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"command failed ({code}): {shlex.join(args)}\n{tail}")
    return {"wall_seconds": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def rel(path: str | Path) -> str:
    """A path as the commands see it (they run in the repo root), so results hold no machine-specific prefix."""
    return os.path.relpath(path, REPO)


def bonsai_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bonsai.cli", *args]


def _cpu_model() -> str:
    """The processor's name: float results (and so a prune's path) can differ between CPU models."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def provenance() -> dict:
    """Call at the start of a benchmark: the commit whose code the run uses."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    # results are not code: a benchmark that merges rows into a tracked JSON must not mark its next row dirty
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":(exclude)benchmarks/results"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    return {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "git_commit": commit, "git_dirty": dirty, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
    }


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


def prune_config_of(flags: list[str], model: str, sparsity: float, calib: Path = WIKI_VALID) -> dict:
    """The resolved prune config `bonsai prune` flags give (what a finished run's record must match to be reused)."""
    from bonsai.cli import KNOB_FLAGS, build_parser
    from bonsai.config import resolve_config

    args = build_parser().parse_args(["prune", "--out", "unused", "--model", model, "--sparsity", str(sparsity),
                                      "--calib", rel(calib), *flags])
    overrides = {"model": args.model, "sparsity": args.sparsity, "preset": args.preset, "calib": args.calib,
                 "seed": args.seed}  # not a knob flag: without it a seed variant never matched its finished run
    overrides.update({key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _) in KNOB_FLAGS.items()})
    return resolve_config(overrides).to_dict()


def finished_run(out: Path, config: dict) -> dict | None:
    """The record of a finished run in `out` made with `config` (keys the record predates must be defaults)."""
    from bonsai.config import PruneConfig

    record_path = out / "pruning_record.json"
    if not record_path.exists():
        return None
    record = json.loads(record_path.read_text())
    defaults = PruneConfig(preset=config["preset"]).resolved().to_dict()
    placement = ("workers", "scheduler")  # where shards ran does not change the result
    same = all(record["config"].get(k, defaults[k]) == v for k, v in config.items() if k not in placement)
    return record if same and "summary" in record else None
