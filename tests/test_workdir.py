"""Data safety of the output and the work directory: checks made before any work, `--overwrite` that never
deletes a file the tool did not write, and one run per work directory (a live holder is named, a dead one's lock
is taken over)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bonsai.cli import main
from bonsai.errors import BonsaiError
from bonsai.workdir import LOCK_FILE, WorkDirLock, check_output_dir

HOLD = """
import sys, time
from bonsai.workdir import WorkDirLock
with WorkDirLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _prune_args(stories_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--model", str(stories_dir), "--out", str(out), "--sparsity", "0.2", "--calib-windows", "4",
            "--calib-seq-len", "64", "--n-samples", "4", "--heldout-windows", "0", *extra]


def _cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bonsai.cli", *args], capture_output=True, text=True, timeout=600,
                          **kw)


def _holder(work: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(work)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_output_checks_come_before_any_work(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(BonsaiError, match="is a file, not a directory"):
        check_output_dir(a_file, overwrite=False)
    with pytest.raises(BonsaiError, match="is a file"):
        check_output_dir(a_file / "sub" / "out", overwrite=False)
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(BonsaiError, match="no write permission"):
            check_output_dir(locked / "out", overwrite=False)
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("bad", ["file", "under_file"])
def test_bad_out_is_refused_in_a_second(bad, tmp_path, stories_dir):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    out = a_file if bad == "file" else a_file / "out"
    started = time.monotonic()
    res = _cli(_prune_args(stories_dir, out))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "is a file" in res.stderr
    assert time.monotonic() - started < 30  # no temporary Prefect API, no model loaded
    assert a_file.read_text() == "x" and not Path(f"{out}.work").exists()


def test_overwrite_never_deletes_a_foreign_file(tmp_path, stories_dir):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "unrelated.txt").write_text("mine")
    (out / "sub" / "y").write_text("mine too")
    assert main(_prune_args(stories_dir, out, "--overwrite")) == 2
    assert (out / "unrelated.txt").read_text() == "mine" and (out / "sub" / "y").read_text() == "mine too"
    assert not Path(f"{out}.work").exists()


def test_lock_is_exclusive_reentrant_and_names_its_holder(tmp_path):
    work = tmp_path / "work"
    holder = _holder(work)
    try:
        with pytest.raises(BonsaiError, match=rf"in use by pid {holder.pid} on "):
            WorkDirLock(work).__enter__()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    with WorkDirLock(work) as lock:  # the dead holder's lock is free again
        assert lock.taken_over.startswith(f"pid {holder.pid} on ")
        with WorkDirLock(work) as inner:  # the same process may take it again (CLI, then the flow)
            assert inner.taken_over is None
        assert (work / LOCK_FILE).read_text()  # still held after the inner block
    assert (work / LOCK_FILE).read_text() == ""  # released cleanly: the next run takes nothing over
    with WorkDirLock(work) as lock:
        assert lock.taken_over is None


def test_two_prunes_on_one_work_dir_exactly_one_runs(tmp_path, stories_dir):
    out = tmp_path / "out"
    work = Path(f"{out}.work")
    first = subprocess.Popen([sys.executable, "-m", "bonsai.cli", *_prune_args(stories_dir, out)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ((work / LOCK_FILE).is_file() and (work / LOCK_FILE).read_text()):
            assert first.poll() is None and time.monotonic() < deadline, "the first prune never took the lock"
            time.sleep(0.05)
        started = time.monotonic()
        second = _cli(_prune_args(stories_dir, out))
        assert second.returncode == 2, second.stderr
        assert f"work directory {work} is in use by pid {first.pid} on " in second.stderr
        assert time.monotonic() - started < 30
        log = first.communicate(timeout=600)[0]
        assert first.returncode == 0, log[-3000:]  # the second one touched nothing of the first's
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert (out / "model.safetensors").is_file()


def test_a_killed_holders_lock_is_taken_over(tmp_path, stories_dir, prefect_harness):
    out = tmp_path / "out"
    work = Path(f"{out}.work")
    holder = _holder(work)  # a run killed while it held the work directory
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (work / LOCK_FILE).read_text()  # its lock file still names it
    assert main(_prune_args(stories_dir, out)) == 0
    assert (out / "model.safetensors").is_file()


def test_concurrent_prunes_of_different_work_dirs_use_their_own_prefect_database(tmp_path, stories_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # one shared home, as two runs of one user share it
    outs = [tmp_path / f"out{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "bonsai.cli", *_prune_args(stories_dir, out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for out in outs]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, out, log in zip(procs, outs, logs, strict=True):
        assert proc.returncode == 0, log[-3000:]
        assert (Path(f"{out}.work") / "prefect.db").is_file()  # not the shared home's database
    assert not (tmp_path / "prefect-home" / "prefect.db").exists()
