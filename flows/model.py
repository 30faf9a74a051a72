"""Model flow: a model source (alias, GGUF, local dir, hub id) → a self-contained local safetensors directory.

The DVC `model` stage runs this so that every later stage reads one fixed directory (`data/model`) whose content
DVC hashes, whatever the source was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from prefect import flow, get_run_logger

from bonsai.sources import DEFAULT_MODEL
from tasks.data_tasks import materialize_model_task

MARKER = "bonsai_materialized.json"  # written last into the directory: what it was made from


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link weight files when source and target share a filesystem, else copy; True when linked.

    Only `*.safetensors` files are linked: they are large and never edited in place (every writer here replaces
    files atomically). Small files (config, tokenizer) are copied, so editing them in the output cannot change the
    source or the shared model cache through a shared inode.
    """
    if src.suffix == ".safetensors":
        try:
            os.link(src, dst)
            return True
        except OSError:
            pass
    shutil.copy2(src, dst)
    return False


def publish_model_dir(src: str | Path, out: str | Path, info: dict) -> dict:
    """Mirror the model directory `src` into `out` atomically (temporary sibling, then one rename)."""
    src, out = Path(src).resolve(), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    linked = copied = 0
    try:
        for root, dirs, files in os.walk(src):
            dirs.sort()
            rel = Path(root).relative_to(src)
            (tmp / rel).mkdir(parents=True, exist_ok=True)
            for name in sorted(files):
                if _link_or_copy(Path(root) / name, tmp / rel / name):
                    linked += 1
                else:
                    copied += 1
        (tmp / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"path": str(out), "linked_files": linked, "copied_files": copied}


@flow(name="bonsai-model")
def model_flow(source: str = DEFAULT_MODEL, out: str = "data/model") -> dict:
    """Resolve `source` (converting a GGUF / fetching the alias when needed) and publish it as `out`."""
    ref = materialize_model_task(source)
    # the resolved path is machine-specific: keep it out of the marker so `out` hashes the same everywhere
    result = publish_model_dir(ref["path"], out, {"source": source, "sha256": ref["sha256"]})
    get_run_logger().info(
        "model %s (sha256 %s…) → %s: %d file(s) hard-linked, %d copied",
        source,
        ref["sha256"][:12],
        out,
        result["linked_files"],
        result["copied_files"],
    )
    return {**result, "source": source, "sha256": ref["sha256"]}
