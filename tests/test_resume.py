"""Crash and resume through the real CLI: SIGKILL a `bonsai prune` process group at several stages, rerun with
`--resume`, and check that finished artifacts are reused (same mtime, "reused ..." log lines) and that the result
is bit-identical to an uninterrupted run. Also: truncated / corrupt artifacts are detected and recomputed.

Every run is a separate `python -m bonsai.cli` process with its own temporary Prefect API (~15-20 s of start-up
each), on the real tiny model stories260K (skipped without ../shared).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bonsai.artifacts import verified_sha
from bonsai.checkpoint import WEIGHTS_FILE, read_record, sha256_file

# small knobs: 3 rounds of 16 one-sub-model shards on 8 windows × 64 tokens
N_SAMPLES = 16
KNOBS = ["--sparsity", "0.2", "--seed", "0", "--n-samples", str(N_SAMPLES), "--shard-size", "1",
         "--calib-windows", "8", "--calib-seq-len", "64", "--heldout-windows", "0"]
RUN_TIMEOUT = 300
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """Environment of the CLI processes: offline, no telemetry, a private PREFECT_HOME, ephemeral API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_HOME=str(tmp_path_factory.mktemp("prefect-home")),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",  # the default 20 s is tight on a busy machine
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONUNBUFFERED="1",
    )
    return env


class Run:
    """One `bonsai prune` process; stdout+stderr go to a log file that the test can watch while it runs."""

    def __init__(self, stories_dir: Path, out: Path, env: dict[str, str], *extra: str):
        self.out, self.work = out, Path(f"{out}.work")
        self.log_path = out.parent / f"{out.name}-{int(time.time() * 1000)}.log"
        args = [sys.executable, "-m", "bonsai.cli", "prune", "--model", str(stories_dir), "--out", str(out),
                *KNOBS, *extra]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out.parent,
                                         start_new_session=True)
        self._log = open(self.log_path, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed in text()
        self._seen = ""

    def new_output(self) -> str:
        self._seen += self._log.read()
        return self._seen

    def text(self) -> str:
        out = self.new_output()
        self._log.close()
        return out

    def kill(self) -> None:
        """SIGKILL the whole process group (the CLI and its temporary Prefect server)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def wait(self) -> str:
        try:
            self.proc.wait(timeout=RUN_TIMEOUT)
        finally:
            self.kill()
        text = self.text()
        assert self.proc.returncode == 0, text[-4000:]
        return text

    def kill_when(self, stage: str, condition: Callable[[Run], bool]) -> str:
        """Poll (every 5 ms) until `condition` holds, then SIGKILL; fails if the run ends first."""
        deadline = time.monotonic() + RUN_TIMEOUT
        try:
            while not condition(self):
                if self.proc.poll() is not None:
                    pytest.fail(f"run finished (rc {self.proc.returncode}) before the kill point '{stage}':\n"
                                + self.new_output()[-3000:])
                if time.monotonic() > deadline:
                    pytest.fail(f"kill point '{stage}' not reached in {RUN_TIMEOUT} s")
                time.sleep(0.005)
        finally:
            self.kill()
        return self.text()


def _round_dir(work: Path, r: int) -> Path | None:
    found = sorted(work.glob(f"round_{r:02d}-*"))
    assert len(found) <= 1, found
    return found[0] if found else None


def _shard_sidecars(work: Path, r: int) -> list[Path]:
    return sorted(work.glob(f"round_{r:02d}-*/shards/shard_*.parquet.sha256"))


def _checkpoint(work: Path, r: int) -> Path | None:
    d = _round_dir(work, r)
    found = sorted(d.glob("checkpoint-*.sha256")) if d else []
    return found[0].with_suffix("") if found else None


def _finished_shards(work: Path, r: int) -> dict[int, int]:
    """Shard index -> mtime_ns of every round-r shard whose artifact verifies."""
    d = _round_dir(work, r)
    out = {}
    for p in sorted((d / "shards").glob("shard_*.parquet")) if d else []:
        if verified_sha(p) is not None:
            out[int(p.name[len("shard_"):-len(".parquet")])] = p.stat().st_mtime_ns
    return out


def _mtimes(*paths: Path) -> list[int]:
    return [p.stat().st_mtime_ns for p in paths]


@pytest.fixture(scope="module")
def reference(stories_dir, tmp_path_factory, cli_env) -> dict:
    """An uninterrupted run: the hash every resumed run must reproduce, and its work directory."""
    out = tmp_path_factory.mktemp("reference") / "pruned"
    log = Run(stories_dir, out, cli_env).wait()
    assert " - reused " not in log and " - recomputing " not in log
    return {"sha": sha256_file(out / WEIGHTS_FILE), "work": out.parent / "pruned.work", "log": log}


def test_killed_at_three_stages_resumes_to_identical_weights(stories_dir, tmp_path, cli_env, reference):
    out = tmp_path / "pruned"
    work = Path(f"{out}.work")

    # 1. kill while the calibration subflow generates its self-text windows (nothing finished yet)
    log1 = Run(stories_dir, out, cli_env).kill_when(
        "calibration", lambda run: "for flow 'bonsai-calibration'" in run.new_output()
    )
    assert "Beginning subflow run" in log1
    assert not list(work.glob("windows/*.sha256")) and _round_dir(work, 0) is None, "killed after calibration"

    # 2. resume; kill as soon as round 0's shard files start landing
    log2 = Run(stories_dir, out, cli_env, "--resume").kill_when(
        "round 0 shards", lambda run: len(_shard_sidecars(work, 0)) >= 1
    )
    finished = _finished_shards(work, 0)
    assert 1 <= len(finished) < N_SAMPLES, (finished, log2[-3000:])
    assert _checkpoint(work, 0) is None
    (windows,) = work.glob("windows/*.parquet")
    windows_mtime = _mtimes(windows)

    # 3. resume; the finished shards are reused, not recomputed; kill in round 1 once its prior table exists
    #    (round 0's checkpoint is done; round 1 is sampling masks or evaluating shards)
    log3 = Run(stories_dir, out, cli_env, "--resume").kill_when(
        "round 1", lambda run: bool(list(work.glob("round_01-*/prior.parquet.sha256")))
    )
    for k in finished:
        assert f"reused shard {k}: " in log3, f"shard {k} not reused:\n{log3[-4000:]}"
    assert "reused calibration windows" in log3
    assert {k: v for k, v in _finished_shards(work, 0).items() if k in finished} == finished
    assert _mtimes(windows) == windows_mtime
    assert _checkpoint(work, 1) is None, "killed after round 1 had finished"
    ckpt0 = _checkpoint(work, 0)
    assert verified_sha(ckpt0) is not None
    ckpt0_files = (ckpt0 / WEIGHTS_FILE, ckpt0.with_name(ckpt0.name + ".sha256"))
    ckpt0_mtimes = _mtimes(*ckpt0_files)
    all_round0 = _finished_shards(work, 0)
    assert len(all_round0) == N_SAMPLES

    # 4. resume to the end: round 0 is reused whole and the weights equal the uninterrupted run's bit for bit
    log4 = Run(stories_dir, out, cli_env, "--resume").wait()
    assert f"round 0: {N_SAMPLES} of {N_SAMPLES} shards reused" in log4
    assert "reused round checkpoint: " in log4
    assert [line for line in log4.splitlines() if "reused prior table: " in line and "/round_01-" in line]
    # (a later round may recompute: the kill can land between one of round 1's renames and its sidecar)
    assert not [line for line in log4.splitlines() if " - recomputing " in line and "/round_00-" in line]
    assert _finished_shards(work, 0) == all_round0
    assert _mtimes(*ckpt0_files) == ckpt0_mtimes
    assert sha256_file(out / WEIGHTS_FILE) == reference["sha"]


def test_truncated_and_corrupt_artifacts_are_recomputed(stories_dir, tmp_path, cli_env, reference):
    work = reference["work"]
    shard = sorted(_round_dir(work, 0).glob("shards/shard_*.parquet"))[3]
    untouched = sorted(_round_dir(work, 0).glob("shards/shard_*.parquet"))[0]
    untouched_mtime = untouched.stat().st_mtime_ns
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # truncated to half, its sidecar kept
        f.truncate(size // 2)
    no_sidecar = sorted(_round_dir(work, 0).glob("shards/shard_*.parquet"))[5]
    no_sidecar.with_name(no_sidecar.name + ".sha256").unlink()  # e.g. killed between rename and sidecar
    ckpt = _checkpoint(work, 1)
    ckpt_sha = verified_sha(ckpt)
    weights = ckpt / WEIGHTS_FILE
    with open(weights, "r+b") as f:  # same size, flipped bytes in the middle
        f.seek(weights.stat().st_size // 2)
        chunk = f.read(64)
        f.seek(-len(chunk), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))
    assert verified_sha(shard) is None and verified_sha(no_sidecar) is None and verified_sha(ckpt) is None

    out = tmp_path / "pruned"
    log = Run(stories_dir, out, cli_env, "--resume", "--work-dir", str(work)).wait()
    assert f"recomputing shard 3: {shard} is incomplete or corrupt" in log
    assert f"recomputing shard 5: {no_sidecar} is incomplete or corrupt" in log
    assert f"recomputing round checkpoint: {ckpt} is incomplete or corrupt" in log
    assert "reused shard 0: " in log and untouched.stat().st_mtime_ns == untouched_mtime
    assert verified_sha(shard) is not None and shard.stat().st_size > size // 2
    assert verified_sha(no_sidecar) is not None
    assert verified_sha(ckpt) == ckpt_sha  # recomputed bit-identically
    assert sha256_file(out / WEIGHTS_FILE) == reference["sha"]


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _flip(path: Path) -> None:
    with open(path, "r+b") as f:  # same size, one byte changed in the middle
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x5A]))


# Every artifact kind of a prune's work directory, and the name its recomputation is logged under. A round
# checkpoint is one artifact of many files: damage to any of them recomputes the checkpoint. Two groups per
# corruption, so that each round checkpoint takes one damaged file per resume.
FAULT_GROUPS = {
    "A": [("windows", "calibration windows", lambda w: next(w.glob("windows/*.parquet"))),
          ("prior", "prior table", lambda w: _round_dir(w, 0) / "prior.parquet"),
          ("masks", "mask table", lambda w: _round_dir(w, 1) / "masks.parquet"),
          ("shard", "shard 2", lambda w: _round_dir(w, 0) / "shards" / "shard_0002.parquet"),
          ("importance", "importance table", lambda w: _round_dir(w, 1) / "importance.parquet"),
          ("checkpoint config.json", "round checkpoint", lambda w: _checkpoint(w, 0) / "config.json"),
          ("checkpoint weights", "round checkpoint", lambda w: _checkpoint(w, 1) / WEIGHTS_FILE)],
    "B": [("checkpoint record", "round checkpoint", lambda w: _checkpoint(w, 0) / "pruning_record.json"),
          ("checkpoint tokenizer", "round checkpoint", lambda w: _checkpoint(w, 1) / "tokenizer.json")],
}


@pytest.mark.parametrize("group", sorted(FAULT_GROUPS))
@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "flipped"])
def test_fault_injection_every_artifact_kind(group, damage, stories_dir, tmp_path, cli_env, reference):
    work = tmp_path / "pruned.work"
    shutil.copytree(reference["work"], work)
    damaged = []
    for kind, label, locate in FAULT_GROUPS[group]:
        path = locate(work)
        artifact = path.parent if label == "round checkpoint" else path
        damage(path)
        assert verified_sha(artifact) is None, kind
        damaged.append((kind, label, artifact))
    out = tmp_path / "pruned"
    log = Run(stories_dir, out, cli_env, "--resume", "--work-dir", str(work)).wait()
    for kind, label, artifact in damaged:
        assert f"recomputing {label}: {artifact} is incomplete or corrupt" in log, (kind, log[-4000:])
        assert verified_sha(artifact) is not None, kind
        assert list(artifact.parent.glob(f".{artifact.name}.corrupt-*")), f"{kind}: the damaged copy was not kept"
    assert sha256_file(out / WEIGHTS_FILE) == reference["sha"]
    summary = read_record(out)["summary"]  # the whole prune's tokens, and what this resume computed of them
    assert 0 < summary["forward_tokens_computed"] < summary["forward_tokens"]
    assert f"({summary['forward_tokens_computed']:,} computed now, the rest reused)" in log
