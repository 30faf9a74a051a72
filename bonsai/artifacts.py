"""Artifacts on disk that survive crashes: atomic writes plus a size+hash record checked before reuse.

Every table or checkpoint is written under a temporary name and renamed into place; then a sidecar
`<name>.sha256` records the size and hash of every file it is made of (a checkpoint directory: all of its files,
config and record included, since later steps read them all). An artifact counts as finished only when the sidecar
exists and every file matches it, so a truncated, edited or corrupt file (or one without a sidecar, e.g. killed
between rename and sidecar) is set aside and recomputed, never used. The artifact's identity (`sha256`, what later
artifacts are keyed by) is the hash of its payload: the table, or a checkpoint's weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bonsai.checkpoint import WEIGHTS_FILE, sha256_file, write_json_atomic

META_KEY = b"bonsai"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _payload(path: Path) -> Path:
    """The file whose bytes stand for the artifact (a checkpoint dir is represented by its weights)."""
    return path / WEIGHTS_FILE if path.is_dir() else path


def _files(path: Path) -> dict[str, Path]:
    """Every file an artifact is made of, by name relative to it (a file artifact: itself, under "")."""
    if not path.is_dir():
        return {"": path}
    return {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.is_file()}


def record_artifact(path: str | Path) -> str:
    """Write the sidecar of a finished artifact; returns its sha256: the payload's (a file, a checkpoint's
    weights), or for a directory without weights the hash of its file list with every file's size and hash."""
    path = Path(path)
    files = {name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for name, p in _files(path).items()}
    payload = _payload(path)
    name = "" if payload == path else payload.relative_to(path).as_posix()
    if name in files:
        identity = files[name]
    else:
        listing = json.dumps(files, sort_keys=True).encode()
        identity = {"size": len(listing), "sha256": hashlib.sha256(listing).hexdigest()}
    write_json_atomic(_sidecar(path), {**identity, "files": files})
    return identity["sha256"]


def verified_sha(path: str | Path) -> str | None:
    """sha256 of a finished, intact artifact; None if missing, unrecorded, truncated, edited or corrupt (any of
    its files differs from the sidecar, or a file was added or removed)."""
    path = Path(path)
    side = _sidecar(path)
    if not path.exists() or not side.is_file():
        return None
    try:
        rec = json.loads(side.read_text())
        files = rec["files"]
        present = _files(path)
        if set(present) != set(files):
            return None
        for name, p in present.items():
            if p.stat().st_size != files[name]["size"] or sha256_file(p) != files[name]["sha256"]:
                return None
        return rec["sha256"]
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def remove_artifact(path: str | Path) -> None:
    """Delete a superseded artifact and its sidecar (sidecar first: a half-deleted artifact is never finished)."""
    path = Path(path)
    _sidecar(path).unlink(missing_ok=True)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def discard(path: str | Path) -> Path | None:
    """Set a broken or partial artifact aside (renamed `.<name>.corrupt-<time>` beside it, where a user can still
    look at it) and drop its sidecar; returns where it went (None: there was nothing)."""
    path = Path(path)
    _sidecar(path).unlink(missing_ok=True)
    if not path.exists():
        return None
    aside = path.with_name(f".{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(path, aside)
    return aside


def write_table(df: pd.DataFrame, path: str | Path, meta: dict[str, Any] | None = None) -> str:
    """Parquet with JSON metadata, atomically; returns the sha256 recorded in the sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[META_KEY] = json.dumps(meta or {}, default=str).encode()
    table = table.replace_schema_metadata(schema_meta)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return record_artifact(path)


def read_table(path: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    return table.to_pandas(), meta


def content_key(*parts: Any) -> str:
    """Short hash naming an artifact by everything it is computed from."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
