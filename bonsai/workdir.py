"""Where a run writes: checks of the output directory made before any work, and the lock that gives one run at
a time its work directory.

A pruned or adapted checkpoint is a flat directory of the files in CHECKPOINT_FILES. `--overwrite` replaces such a
directory and nothing else: a directory that holds anything the tool does not write is refused, so no user file
is ever deleted. The work-directory lock is an `fcntl.flock` on `<work>/.lock`; the kernel drops it when the
holding process dies, so a lock left by a killed run is taken over by the next one at once, while a live holder
(named in the file by pid, host and start time) stops a second run before it touches anything.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from bonsai.errors import BonsaiError

LOCK_FILE = ".lock"
RUN_DATABASE = "prefect.db"  # a one-off CLI run's Prefect database (bonsai/cli.py), with SQLite's -wal / -shm
# Every file a checkpoint of this tool can hold (model, record, remote code, tokenizer, generation settings).
CHECKPOINT_FILES = frozenset({
    "config.json", "model.safetensors", "pruning_record.json", "generation_config.json",
    "configuration_bonsai.py", "modeling_bonsai.py",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
})


def foreign_entries(directory: Path) -> list[str]:
    """Names in `directory` that no checkpoint of this tool contains (sub-directories included)."""
    return sorted(p.name for p in directory.iterdir() if not (p.is_file() and p.name in CHECKPOINT_FILES))


def _check_creatable(path: Path, what: str) -> None:
    """`path` (a directory to be) is not a file and its nearest existing ancestor is a writable directory."""
    if path.exists() and not path.is_dir():
        raise BonsaiError(f"{what} {path} is a file, not a directory")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BonsaiError(f"cannot create {what} {path}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BonsaiError(f"cannot create {what} {path}: no write permission in {parent}")


def check_output_dir(out: str | Path, *, overwrite: bool) -> None:
    """Refuse, before any work, an output that cannot be written or must not be replaced."""
    out = Path(out)
    _check_creatable(out, "output directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise BonsaiError(f"output directory {out} exists and is not empty; choose another --out "
                              f"(--overwrite replaces a checkpoint this tool wrote)")
        foreign = foreign_entries(out)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise BonsaiError(f"--overwrite refused: {out} holds files this tool did not write ({shown}); "
                              f"move them or choose another --out")


def check_work_dir(work: str | Path) -> None:
    _check_creatable(Path(work), "work directory")


def holds_earlier_run(work: str | Path) -> bool:
    """Whether a work directory holds anything besides its lock file and the run's Prefect database."""
    work = Path(work)
    return work.is_dir() and any(
        p.name != LOCK_FILE and not p.name.startswith(RUN_DATABASE) for p in work.iterdir()
    )


class WorkDirLock:
    """`with WorkDirLock(work):` — this process is the only run using `work` until the block ends. Re-entrant
    within a process (the CLI takes it, then the flow it calls takes it again). `taken_over` names the holder of a
    lock left behind by a process that died (None when the lock was free)."""

    _depth: dict[str, int] = {}
    _fds: dict[str, int] = {}

    def __init__(self, work: str | Path):
        self.work = Path(work)
        self.key = str(self.work.absolute())
        self.taken_over: str | None = None

    def __enter__(self) -> WorkDirLock:
        if self.key in self._depth:
            self._depth[self.key] += 1
            return self
        self.work.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.work / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        previous = os.read(fd, 4096).decode("utf-8", "replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BonsaiError(f"work directory {self.work} is in use by {_describe(previous)}; wait for that run "
                              f"to end or choose another --out / --work-dir") from None
        self.taken_over = _describe(previous) if previous else None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fds[self.key], self._depth[self.key] = fd, 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth[self.key] -= 1
        if self._depth[self.key]:
            return
        del self._depth[self.key]
        fd = self._fds.pop(self.key)
        try:
            os.ftruncate(fd, 0)  # an empty lock file: the last holder ended normally
        except OSError:  # the work directory was removed while held (a run that found nothing worth keeping)
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _describe(holder_json: str) -> str:
    try:
        h = json.loads(holder_json)
        return f"pid {h['pid']} on {h['host']} (since {h['started']})"
    except (ValueError, KeyError, TypeError):
        return "another run (its lock file names no holder)"
