"""Calibration and evaluation text: reading sources, tokenising, self-generated text and token windows.

Pipeline: a text source (local ``.txt``/``.tokens``/``.raw``/``.jsonl``/``.parquet`` file, a
``datasets.save_to_disk`` directory, or a hub spec ``hf:NAME[:CONFIG][@SPLIT]``) is read into documents
(:func:`read_text_source`), tokenised into one flat id stream (:func:`tokenize_stream`) and cut into
non-overlapping windows of exactly ``seq_len`` tokens (:func:`make_windows`). Windows start the way the model
expects (:func:`window_bos`): where its tokenizer adds a BOS token, or its family needs one, every window is BOS
followed by ``seq_len - 1`` text tokens (position 0 is never a prediction target, so BOS is never scored); otherwise
the stream is cut as it is. The source ``"self"`` instead samples text from the model itself, each sequence
starting at BOS (:func:`generate_self_text`, data-free calibration).
:func:`prepare_windows` ties these together and returns provenance metadata; :func:`save_windows` and
:func:`load_windows` persist windows as a Parquet table with the metadata in the schema.

All user-facing failures raise :class:`bonsai.errors.BonsaiError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bonsai.errors import BonsaiError

TEXT_SUFFIXES = (".txt", ".tokens", ".raw")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES

PURPOSES = ("calibration", "evaluation")
SELF_SOURCE = "self"
HF_PREFIX = "hf:"
DEFAULT_HF_SPLIT = "train"
# Evaluation windows from "self" use a derived seed so held-out text never equals calibration text.
EVAL_SEED_OFFSET = 1_000_003
META_KEY = b"bonsai"
DOC_SEPARATOR = "\n\n"
# Characters of text per tokenizer call element; chunks are batched so fast tokenizers encode in parallel.
_CHUNK_CHARS = 1 << 16
_CHUNKS_PER_CALL = 32
# Families trained with BOS at position 0 whose outputs go off-distribution without it, whatever the tokenizer's
# add-BOS flag says (a tokenizer converted from GGUF may not carry that flag).
BOS_FAMILIES = ("gemma", "gemma2", "gemma3", "gemma3_text")


def _one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type name)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


# --------------------------------------------------------------------------------------------------------
# Reading text sources
# --------------------------------------------------------------------------------------------------------


def _check_texts(values: Sequence[Any], where: str) -> list[str]:
    """Keep non-blank strings; reject non-string values; error when nothing is left."""
    texts: list[str] = []
    for i, value in enumerate(values):
        if value is None:
            continue
        if not isinstance(value, str):
            raise BonsaiError(f"{where}: record {i} has a non-text value of type {type(value).__name__}")
        if value.strip():
            texts.append(value)
    if not texts:
        raise BonsaiError(f"no text found in {where}")
    return texts


def _read_lines(path: Path) -> list[str]:
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BonsaiError(f"{path} is not UTF-8 text: {_one_line(exc)}") from exc
    except OSError as exc:
        raise BonsaiError(f"cannot read {path}: {_one_line(exc)}") from exc
    lines = [line.rstrip("\r") for line in content.split("\n")]
    return _check_texts(lines, str(path))


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    values: list[Any] = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BonsaiError(f"{path} line {lineno} is not valid JSON: {_one_line(exc)}") from exc
                if not isinstance(record, dict):
                    raise BonsaiError(f"{path} line {lineno} is not a JSON object")
                if text_field not in record:
                    raise BonsaiError(f"{path} line {lineno} has no field {text_field!r}")
                values.append(record[text_field])
    except UnicodeDecodeError as exc:
        raise BonsaiError(f"{path} is not UTF-8 text: {_one_line(exc)}") from exc
    except OSError as exc:
        raise BonsaiError(f"cannot read {path}: {_one_line(exc)}") from exc
    return _check_texts(values, str(path))


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if text_field not in schema.names:
            raise BonsaiError(
                f"{path} has no column {text_field!r} (columns: {', '.join(schema.names) or 'none'})"
            )
        column = pq.read_table(path, columns=[text_field]).column(text_field)
    except BonsaiError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for corrupt files
        raise BonsaiError(f"cannot read Parquet file {path}: {_one_line(exc)}") from exc
    return _check_texts(column.to_pylist(), str(path))


def _dataset_texts(dataset: Any, text_field: str, where: str) -> list[str]:
    columns = list(getattr(dataset, "column_names", None) or [])
    if text_field not in columns:
        raise BonsaiError(f"{where} has no column {text_field!r} (columns: {', '.join(columns) or 'none'})")
    return _check_texts(dataset[text_field], where)


def _read_saved_dataset(path: Path, text_field: str) -> list[str]:
    try:
        import datasets

        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise BonsaiError(f"cannot load dataset directory {path}: {_one_line(exc)}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded.keys())
        if DEFAULT_HF_SPLIT in loaded:
            split = DEFAULT_HF_SPLIT
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise BonsaiError(
                f"dataset directory {path} has splits {', '.join(splits)} and none is {DEFAULT_HF_SPLIT!r}"
            )
        return _dataset_texts(loaded[split], text_field, f"{path} (split {split})")
    return _dataset_texts(loaded, text_field, str(path))


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """Split ``hf:NAME[:CONFIG][@SPLIT]`` into ``(name, config or None, split)``; split defaults to train."""
    if not spec.startswith(HF_PREFIX):
        raise BonsaiError(f"not a hub dataset spec (expected hf:NAME[:CONFIG][@SPLIT]): {spec!r}")
    body = spec[len(HF_PREFIX) :]
    split = DEFAULT_HF_SPLIT
    if "@" in body:
        body, split = body.rsplit("@", 1)
    name, _, config = body.partition(":")
    if not name or not split or (":" in body and not config):
        raise BonsaiError(f"malformed hub dataset spec {spec!r}; expected hf:NAME[:CONFIG][@SPLIT]")
    return name, (config or None), split


def _read_hf(spec: str, text_field: str) -> list[str]:
    name, config, split = parse_hf_spec(spec)
    try:
        import datasets

        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name/config/split, network errors, ...
        raise BonsaiError(f"cannot load hub dataset {spec!r}: {_one_line(exc)}") from exc
    return _dataset_texts(dataset, text_field, spec)


def read_text_source(source: str, *, text_field: str = "text") -> list[str]:
    """Documents (or lines) of text from a local file, a saved ``datasets`` directory or a hub spec.

    Text files (``.txt``, ``.tokens``, ``.raw``) give one entry per non-blank line; ``.jsonl`` and
    ``.parquet`` give the non-blank values of ``text_field``; ``hf:NAME[:CONFIG][@SPLIT]`` loads a hub
    dataset with ``datasets.load_dataset`` (split defaults to ``train``); a directory is read with
    ``datasets.load_from_disk`` (split ``train``, or its only split, for a ``DatasetDict``).
    """
    source = str(source)
    if source.startswith(HF_PREFIX):
        return _read_hf(source, text_field)
    path = Path(source)
    if path.is_dir():
        return _read_saved_dataset(path, text_field)
    if not path.exists():
        raise BonsaiError(f"data file not found: {source}")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return _read_lines(path)
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, text_field)
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(path, text_field)
    raise BonsaiError(
        f"unsupported data file type {suffix or '(no suffix)'!r} for {source}; supported: "
        f"{', '.join(SUPPORTED_SUFFIXES)}, a datasets directory, or hf:NAME[:CONFIG][@SPLIT]"
    )


# --------------------------------------------------------------------------------------------------------
# Tokenising
# --------------------------------------------------------------------------------------------------------


def _text_chunks(texts: Sequence[str], max_chars: int = _CHUNK_CHARS) -> Iterator[str]:
    """Documents joined with DOC_SEPARATOR into chunks of about ``max_chars`` characters.

    Chunks break only between documents; every chunk but the last ends with the separator, so the
    concatenated chunks equal ``DOC_SEPARATOR.join(texts)``.
    """
    parts: list[str] = []
    size = 0
    for text in texts:
        if parts and size + len(text) > max_chars:
            yield DOC_SEPARATOR.join(parts) + DOC_SEPARATOR
            parts, size = [], 0
        parts.append(text)
        size += len(text) + len(DOC_SEPARATOR)
    if parts:
        yield DOC_SEPARATOR.join(parts)


def _encode_batch(tokenizer: Any, chunks: list[str]) -> list[list[int]]:
    encoded = tokenizer(chunks, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return list(encoded["input_ids"])


def window_bos(tokenizer: Any, model_type: str | None = None) -> int | None:
    """The BOS id every window starts with, or None to cut windows from the stream as it is: BOS when the
    tokenizer adds it on its own (its ``add_special_tokens`` encoding starts with it) or the family needs it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    if model_type in BOS_FAMILIES:
        return int(bos)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if len(probe) and probe[0] == bos else None


def tokenize_stream(tokenizer: Any, texts: list[str], *, leading_bos: bool = True) -> np.ndarray:
    """Token ids (int64) of ``"\\n\\n".join(texts)``, with one BOS at the very start if the tokenizer has one
    and ``leading_bos`` (windows that carry their own BOS take the stream without it).

    No other special tokens are added. The text is encoded in chunks (split between documents) that are
    batched per tokenizer call, so no giant string is built and fast tokenizers encode in parallel.
    """
    if not texts:
        raise BonsaiError("no text to tokenise")
    pieces: list[np.ndarray] = []
    bos = getattr(tokenizer, "bos_token_id", None) if leading_bos else None
    if bos is not None:
        pieces.append(np.asarray([bos], dtype=np.int64))
    batch: list[str] = []
    for chunk in _text_chunks(texts):
        batch.append(chunk)
        if len(batch) == _CHUNKS_PER_CALL:
            pieces.extend(np.asarray(ids, dtype=np.int64) for ids in _encode_batch(tokenizer, batch))
            batch = []
    if batch:
        pieces.extend(np.asarray(ids, dtype=np.int64) for ids in _encode_batch(tokenizer, batch))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if stream.size == (1 if bos is not None else 0):
        raise BonsaiError("the text produced no tokens")
    return stream


# --------------------------------------------------------------------------------------------------------
# Self-generated text (data-free calibration)
# --------------------------------------------------------------------------------------------------------


def _start_token(model: Any, tokenizer: Any) -> int:
    config = getattr(model, "config", None)
    for candidate in (
        getattr(tokenizer, "bos_token_id", None),
        getattr(config, "bos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(config, "eos_token_id", None),
    ):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    raise BonsaiError("cannot generate text: the tokenizer and model define neither a BOS nor an EOS token")


def generate_self_text(
    model: Any, tokenizer: Any, n_sequences: int, seq_len: int, seed: int, batch_size: int = 16
) -> np.ndarray:
    """Sample ``n_sequences`` sequences of ``seq_len`` tokens from the model itself (int64, first = start).

    Pure ancestral sampling (temperature 1.0, no top-k/top-p) from the BOS token (EOS if there is no
    BOS), with a KV cache and a local ``torch.Generator`` seeded with ``seed``: the same model, seed and
    batch size give the same ids. Sampling happens on the CPU in float32, independent of the model device.
    """
    import torch
    from tqdm.auto import tqdm

    if n_sequences < 1:
        raise BonsaiError(f"n_sequences must be >= 1, got {n_sequences}")
    if seq_len < 1:
        raise BonsaiError(f"seq_len must be >= 1, got {seq_len}")
    if batch_size < 1:
        raise BonsaiError(f"batch_size must be >= 1, got {batch_size}")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_pos, int) and seq_len > max_pos:
        raise BonsaiError(f"seq_len {seq_len:,} exceeds the model's context of {max_pos:,} tokens")
    start = _start_token(model, tokenizer)
    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device("cpu")

    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    out = np.empty((n_sequences, seq_len), dtype=np.int64)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with (
            torch.no_grad(),
            tqdm(
                total=n_sequences * seq_len,
                desc="generating self text",
                unit="tok",
                file=sys.stderr,
                disable=None,
            ) as bar,
        ):
            for lo in range(0, n_sequences, batch_size):
                bsz = min(batch_size, n_sequences - lo)
                ids = torch.full((bsz, seq_len), start, dtype=torch.long)
                step_input = ids[:, :1].to(device)
                past = None
                bar.update(bsz)
                for t in range(1, seq_len):
                    result = model(input_ids=step_input, past_key_values=past, use_cache=True)
                    past = result.past_key_values
                    logits = result.logits[:, -1, :].float().cpu()
                    probs = torch.softmax(logits, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                    ids[:, t] = nxt
                    step_input = nxt.unsqueeze(1).to(device)
                    bar.update(bsz)
                out[lo : lo + bsz] = ids.numpy()
                del past
    finally:
        if was_training:
            model.train()
    return out


# --------------------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------------------


def make_windows(
    stream: np.ndarray, n_windows: int, seq_len: int, seed: int, *, sample: bool, bos: int | None = None
) -> np.ndarray:
    """``n_windows`` non-overlapping windows of exactly ``seq_len`` tokens, shape (n_windows, seq_len), int64.

    The stream is split into consecutive chunks of ``seq_len`` tokens, or of ``seq_len - 1`` when ``bos`` is
    given, each chunk then prefixed with it. ``sample=True`` (calibration) picks ``n_windows`` chunks at random
    without replacement using a NumPy generator seeded with ``seed`` (returned in stream order);
    ``sample=False`` (evaluation) takes the first ``n_windows`` chunks in order.
    """
    stream = np.asarray(stream)
    if stream.ndim != 1:
        raise BonsaiError(f"token stream must be one-dimensional, got shape {stream.shape}")
    if n_windows < 1:
        raise BonsaiError(f"number of windows must be >= 1, got {n_windows}")
    if seq_len < (1 if bos is None else 2):
        raise BonsaiError(f"window length must be >= {1 if bos is None else 2}, got {seq_len}")
    text_len = seq_len if bos is None else seq_len - 1
    n_chunks = len(stream) // text_len
    if n_chunks < n_windows:
        what = "calibration" if sample else "evaluation"
        raise BonsaiError(
            f"{what} text has {len(stream):,} tokens; {n_windows:,} windows × {text_len:,} tokens"
            f"{' after their BOS' if bos is not None else ''} "
            f"need {n_windows * text_len:,}"
        )
    chunks = stream[: n_chunks * text_len].reshape(n_chunks, text_len)
    if sample:
        rng = np.random.default_rng(seed)
        picked = np.sort(rng.choice(n_chunks, size=n_windows, replace=False))
    else:
        picked = np.arange(n_windows)
    windows = chunks[picked]
    if bos is not None:
        windows = np.concatenate([np.full((n_windows, 1), bos, dtype=np.int64), windows], axis=1)
    return np.ascontiguousarray(windows, dtype=np.int64)


def _hash_path(path: Path) -> str:
    """sha256 of a file's bytes, or of a directory's files (relative paths and bytes, sorted)."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(p.relative_to(path).as_posix().encode() + b"\0")
            h.update(_hash_path(p).encode())
        return h.hexdigest()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hash_texts(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _tokenizer_meta(tokenizer: Any) -> dict[str, Any]:
    try:
        vocab = len(tokenizer)
    except TypeError:
        vocab = getattr(tokenizer, "vocab_size", None)
    return {
        "tokenizer": getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
        "vocab_size": None if vocab is None else int(vocab),
    }


def prepare_windows(
    source: str,
    tokenizer: Any,
    *,
    n_windows: int,
    seq_len: int,
    seed: int,
    purpose: str,
    model: Any = None,
    model_type: str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Token windows for calibration (sampled) or evaluation (first chunks), plus provenance metadata.

    ``source == "self"`` samples ``n_windows`` sequences of ``seq_len`` tokens from ``model`` (required);
    evaluation uses the seed ``seed + 1_000_003`` so it never repeats the calibration text. Any other source
    goes through :func:`read_text_source`, :func:`tokenize_stream` and :func:`make_windows`, with the BOS of
    :func:`window_bos` (``model_type``: the model's family, else ``model``'s config says it) at each window's start.
    """
    if purpose not in PURPOSES:
        raise BonsaiError(f"unknown purpose {purpose!r}; choose one of {', '.join(PURPOSES)}")
    source = str(source)
    sample = purpose == "calibration"
    if source == SELF_SOURCE:
        if model is None:
            raise BonsaiError('data source "self" needs the model to generate text, but none was given')
        used_seed = seed if sample else seed + EVAL_SEED_OFFSET
        windows = generate_self_text(model, tokenizer, n_windows, seq_len, used_seed)
        n_tokens = int(windows.size)
        digest = hashlib.sha256(np.ascontiguousarray(windows, dtype="<i8").tobytes()).hexdigest()
        config = getattr(model, "config", None)
        extra: dict[str, Any] = {
            "generation_seed": used_seed,
            "generator": "ancestral sampling, temperature 1.0",
            "model": getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None),
        }
        bos_first = bool(windows[:, 0].min() == windows[:, 0].max() == getattr(tokenizer, "bos_token_id", None))
    else:
        texts = read_text_source(source)
        model_type = model_type or getattr(getattr(model, "config", None), "model_type", None)
        bos = window_bos(tokenizer, model_type)
        stream = tokenize_stream(tokenizer, texts, leading_bos=bos is None)
        n_tokens = int(stream.size)
        windows = make_windows(stream, n_windows, seq_len, seed, sample=sample, bos=bos)
        bos_first = bos is not None
        path = Path(source)
        digest = _hash_path(path) if path.exists() else _hash_texts(texts)
        extra = {"n_documents": len(texts)}
    meta: dict[str, Any] = {
        "source": source,
        "purpose": purpose,
        "n_windows": int(n_windows),
        "seq_len": int(seq_len),
        "seed": int(seed),
        "n_tokens_available": n_tokens,
        "source_sha256": digest,
        # every window starts with the BOS token (a text file's windows: by window_bos; self text: its start token)
        "bos_per_window": bos_first,
        **_tokenizer_meta(tokenizer),
        **extra,
    }
    return windows, meta


# --------------------------------------------------------------------------------------------------------
# Persistence
# --------------------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_windows(path: str | os.PathLike[str], windows: np.ndarray, meta: dict[str, Any]) -> str:
    """Write windows to Parquet atomically; return the sha256 hex of the written file.

    Columns: ``window`` (int32 index) and ``token_ids`` (list<int32>); ``meta`` is stored as JSON under the
    schema metadata key ``b"bonsai"``. The file is written to a temporary file in the same directory,
    fsynced and moved into place with ``os.replace``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 1:
        raise BonsaiError(f"windows must be a non-empty 2-D array, got shape {windows.shape}")
    if not np.issubdtype(windows.dtype, np.integer):
        raise BonsaiError(f"windows must hold integer token ids, got dtype {windows.dtype}")
    info = np.iinfo(np.int32)
    if windows.min() < info.min or windows.max() > info.max:
        raise BonsaiError("token ids do not fit in int32")
    try:
        meta_json = json.dumps(meta, sort_keys=True, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise BonsaiError(f"window metadata is not JSON serialisable: {_one_line(exc)}") from exc

    n, seq_len = windows.shape
    values = pa.array(np.ascontiguousarray(windows, dtype=np.int32).reshape(-1), type=pa.int32())
    offsets = pa.array(np.arange(0, n * seq_len + 1, seq_len, dtype=np.int32), type=pa.int32())
    table = pa.table(
        {
            "window": pa.array(np.arange(n, dtype=np.int32), type=pa.int32()),
            "token_ids": pa.ListArray.from_arrays(offsets, values),
        }
    ).replace_schema_metadata({META_KEY: meta_json.encode("utf-8")})

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        digest = _hash_path(Path(tmp_name))
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where directories can be fsynced
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return digest


def load_windows(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Read windows written by :func:`save_windows`: (n_windows, seq_len) int64 ids and the metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise BonsaiError(f"windows file not found: {p}")
    try:
        table = pq.read_table(p)
    except Exception as exc:
        raise BonsaiError(f"cannot read windows file {p}: {_one_line(exc)}") from exc
    if "window" not in table.column_names or "token_ids" not in table.column_names:
        raise BonsaiError(f"{p} is not a windows file: it needs columns 'window' and 'token_ids'")
    raw_meta = (table.schema.metadata or {}).get(META_KEY)
    if raw_meta is None:
        raise BonsaiError(f"{p} is not a windows file: no {META_KEY.decode()!r} metadata")
    try:
        meta = json.loads(raw_meta.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BonsaiError(f"{p} has corrupt window metadata: {_one_line(exc)}") from exc
    if table.num_rows == 0:
        raise BonsaiError(f"{p} holds no windows")
    column = table.column("token_ids").combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise BonsaiError(f"{p}: column 'token_ids' must be a list of integers, got {column.type}")
    if column.null_count:
        raise BonsaiError(f"{p}: column 'token_ids' has missing windows")
    lengths = np.asarray(column.value_lengths())
    if lengths.min() != lengths.max():
        raise BonsaiError(
            f"{p} has ragged windows: lengths range from {int(lengths.min()):,} to {int(lengths.max()):,}"
        )
    seq_len = int(lengths[0])
    if seq_len < 1:
        raise BonsaiError(f"{p} holds empty windows")
    flat = column.flatten()
    if flat.null_count:
        raise BonsaiError(f"{p}: column 'token_ids' has missing token ids")
    windows = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.int64).reshape(-1, seq_len)
    order = np.argsort(np.asarray(table.column("window").to_numpy()), kind="stable")
    return np.ascontiguousarray(windows[order]), meta
