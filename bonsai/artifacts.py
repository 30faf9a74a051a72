"""Artifacts on disk that survive crashes: atomic writes plus a size+hash record checked before reuse.

Every table or checkpoint is written under a temporary name and renamed into place; then a sidecar
`<name>.sha256` records its size and hash. An artifact counts as finished only when the sidecar exists and
matches, so a truncated or corrupt file (or one without a sidecar, e.g. killed between rename and sidecar) is
recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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


def record_artifact(path: str | Path) -> str:
    """Write the sidecar of a finished artifact; returns its sha256."""
    path = Path(path)
    payload = _payload(path)
    digest = sha256_file(payload)
    write_json_atomic(_sidecar(path), {"size": payload.stat().st_size, "sha256": digest})
    return digest


def verified_sha(path: str | Path) -> str | None:
    """sha256 of a finished, intact artifact; None if missing, unrecorded, truncated or corrupt."""
    path = Path(path)
    side = _sidecar(path)
    if not path.exists() or not side.is_file():
        return None
    try:
        rec = json.loads(side.read_text())
        payload = _payload(path)
        if not payload.is_file() or payload.stat().st_size != rec["size"]:
            return None
        return rec["sha256"] if sha256_file(payload) == rec["sha256"] else None
    except (OSError, ValueError, KeyError):
        return None


def discard(path: str | Path) -> None:
    """Remove a broken or partial artifact and its sidecar."""
    path = Path(path)
    _sidecar(path).unlink(missing_ok=True)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


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
