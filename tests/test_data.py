"""Tests for bonsai.data: text sources, tokenising, self-generated text, windows and their Parquet files."""

from __future__ import annotations

import hashlib
import json
import os
import time
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bonsai import data
from bonsai.data import (
    generate_self_text,
    load_windows,
    make_windows,
    parse_hf_spec,
    prepare_windows,
    read_text_source,
    save_windows,
    tokenize_stream,
    window_bos,
)
from bonsai.errors import BonsaiError

# --------------------------------------------------------------------------------------------------------
# Fakes and fixtures
# --------------------------------------------------------------------------------------------------------


class FakeTokenizer:
    """Character-level tokenizer: id = 3 + (code point % 250); BOS 1 and EOS 2 (BOS optional)."""

    def __init__(self, bos: int | None = 1, eos: int | None = 2) -> None:
        self.bos_token_id = bos
        self.eos_token_id = eos
        self.name_or_path = "fake-char-tokenizer"
        self.calls: list[list[str]] = []

    def __len__(self) -> int:
        return 253

    def encode_text(self, text: str) -> list[int]:
        return [3 + ord(c) % 250 for c in text]

    def __call__(self, texts, add_special_tokens=True, **kwargs):
        batch = [texts] if isinstance(texts, str) else list(texts)
        self.calls.append(batch)
        ids = []
        for text in batch:
            enc = self.encode_text(text)
            if add_special_tokens and self.bos_token_id is not None:
                enc = [self.bos_token_id, *enc]
            ids.append(enc)
        return {"input_ids": ids[0] if isinstance(texts, str) else ids}


class FixedDistributionLM(torch.nn.Module):
    """Fake causal LM: next-token logits depend only on the last input token via a fixed table."""

    def __init__(self, table: torch.Tensor, bos: int | None = None, eos: int | None = None) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table.clone(), requires_grad=False)
        self.config = SimpleNamespace(bos_token_id=bos, eos_token_id=eos, max_position_embeddings=4096)
        self.cache_lengths: list[int] = []

    def forward(self, input_ids, past_key_values=None, use_cache=False):
        assert use_cache
        past = 0 if past_key_values is None else past_key_values
        self.cache_lengths.append(past)
        logits = self.table[input_ids]  # (batch, len, vocab)
        return SimpleNamespace(logits=logits, past_key_values=past + input_ids.shape[1])


@pytest.fixture(scope="module")
def stories(stories_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    model.eval()
    return model, tokenizer


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip(), f"error message must be one non-empty line: {msg!r}"
    return msg


# --------------------------------------------------------------------------------------------------------
# read_text_source
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".txt", ".tokens", ".raw", ".TXT"])
def test_read_text_file_lines_drops_empty(tmp_path, suffix):
    p = tmp_path / f"corpus{suffix}"
    p.write_text("first line\n\n   \n = Title = \r\nlast", encoding="utf-8")
    assert read_text_source(str(p)) == ["first line", " = Title = ", "last"]


def test_read_jsonl_field_and_errors(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text('{"text": "alpha beta"}\n\n{"text": "gamma", "body": "x"}\n{"text": ""}\n', encoding="utf-8")
    assert read_text_source(str(p)) == ["alpha beta", "gamma"]

    with pytest.raises(BonsaiError) as exc:
        read_text_source(str(p), text_field="body")
    msg = _one_line(exc)
    assert "'body'" in msg and "line 1" in msg

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(BonsaiError) as exc:
        read_text_source(str(bad))
    assert "line 2" in _one_line(exc)

    nontext = tmp_path / "nontext.jsonl"
    nontext.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(BonsaiError):
        read_text_source(str(nontext))


def test_read_parquet_column_and_errors(tmp_path):
    p = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["one", "", "two"], "id": [1, 2, 3]}), p)
    assert read_text_source(str(p), text_field="content") == ["one", "two"]
    with pytest.raises(BonsaiError) as exc:
        read_text_source(str(p))
    msg = _one_line(exc)
    assert "'text'" in msg and "content" in msg

    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not a parquet file at all")
    with pytest.raises(BonsaiError) as exc:
        read_text_source(str(corrupt))
    _one_line(exc)


def test_read_errors_missing_unsupported_empty(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(BonsaiError) as exc:
        read_text_source(str(missing))
    assert _one_line(exc) == f"data file not found: {missing}"

    csv = tmp_path / "table.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(BonsaiError) as exc:
        read_text_source(str(csv))
    msg = _one_line(exc)
    assert "'.csv'" in msg
    for suffix in (".txt", ".tokens", ".raw", ".jsonl", ".parquet"):
        assert suffix in msg

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(BonsaiError) as exc:
        read_text_source(str(empty))
    assert "no text" in _one_line(exc)


def test_read_saved_dataset_directory(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["hello world", "", "second doc"], "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "plain"))
    assert read_text_source(str(tmp_path / "plain")) == ["hello world", "second doc"]

    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert read_text_source(str(tmp_path / "dict")) == ["hello world", "second doc"]

    with pytest.raises(BonsaiError) as exc:
        read_text_source(str(tmp_path / "plain"), text_field="body")
    assert "'body'" in _one_line(exc)

    with pytest.raises(BonsaiError):
        read_text_source(str(tmp_path))  # a directory that is not a saved dataset


def test_parse_hf_spec():
    assert parse_hf_spec("hf:wikitext:wikitext-2-raw-v1@train") == ("wikitext", "wikitext-2-raw-v1", "train")
    assert parse_hf_spec("hf:org/name@validation") == ("org/name", None, "validation")
    assert parse_hf_spec("hf:org/name") == ("org/name", None, "train")
    for bad in ("hf:", "hf:@train", "hf:name@", "hf:name:@test"):
        with pytest.raises(BonsaiError):
            parse_hf_spec(bad)


@pytest.mark.parametrize(
    "spec", ["hf:bonsai-no-such-org/no-such-dataset-xyz@train", "hf:wikitext:wikitext-2-raw-v1@train"]
)
def test_hf_spec_offline_gives_one_line_error(spec, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))  # no cached copy to fall back on
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache", raising=False)
    with pytest.raises(BonsaiError) as exc:
        read_text_source(spec)
    msg = _one_line(exc)
    assert msg.startswith(f"cannot load hub dataset {spec!r}: ")


# --------------------------------------------------------------------------------------------------------
# tokenize_stream
# --------------------------------------------------------------------------------------------------------


def test_tokenize_stream_joins_docs_with_single_bos():
    tok = FakeTokenizer()
    texts = ["abc", "de", "f"]
    stream = tokenize_stream(tok, texts)
    assert stream.dtype == np.int64
    assert stream.tolist() == [1, *tok.encode_text("abc\n\nde\n\nf")]
    assert (stream == 1).sum() == 1


def test_tokenize_stream_without_bos_and_across_chunks():
    tok = FakeTokenizer(bos=None)
    texts = [f"document {i} " + "x" * (i % 97) for i in range(5000)]  # well over one chunk of characters
    stream = tokenize_stream(tok, texts)
    assert stream.tolist() == tok.encode_text("\n\n".join(texts))
    # chunked: no single tokenizer input holds all the text
    assert max(len(t) for call in tok.calls for t in call) < sum(map(len, texts))


def test_tokenize_stream_rejects_empty():
    with pytest.raises(BonsaiError):
        tokenize_stream(FakeTokenizer(), [])


def test_tokenize_real_wiki_fast_and_exact(stories, wiki_valid):
    _, tokenizer = stories
    texts = read_text_source(str(wiki_valid))
    start = time.perf_counter()
    stream = tokenize_stream(tokenizer, texts)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"tokenising {wiki_valid.stat().st_size:,} bytes took {elapsed:.2f} s"
    assert stream.dtype == np.int64 and stream[0] == tokenizer.bos_token_id
    assert (stream == tokenizer.bos_token_id).sum() == 1
    assert (stream == tokenizer.eos_token_id).sum() == 0
    whole = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    assert stream[1:].tolist() == whole


# --------------------------------------------------------------------------------------------------------
# make_windows
# --------------------------------------------------------------------------------------------------------


def test_make_windows_deterministic_and_seed_dependent():
    stream = np.arange(10_000, dtype=np.int64)
    a = make_windows(stream, 8, 64, seed=3, sample=True)
    b = make_windows(stream, 8, 64, seed=3, sample=True)
    c = make_windows(stream, 8, 64, seed=4, sample=True)
    assert a.shape == (8, 64) and a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_make_windows_are_non_overlapping_chunks():
    stream = np.arange(64 * 40 + 17, dtype=np.int64)
    w = make_windows(stream, 30, 64, seed=0, sample=True)
    starts = w[:, 0]
    assert len(set(starts.tolist())) == 30
    assert (starts % 64 == 0).all()  # aligned to chunk boundaries, hence disjoint
    np.testing.assert_array_equal(w, starts[:, None] + np.arange(64))
    assert w.max() < 64 * 40  # the incomplete tail chunk is never used


def test_make_windows_evaluation_takes_first_chunks_in_order():
    stream = np.arange(1000, dtype=np.int64) * 7
    w = make_windows(stream, 5, 100, seed=123, sample=False)
    np.testing.assert_array_equal(w, stream[:500].reshape(5, 100))
    np.testing.assert_array_equal(w, make_windows(stream, 5, 100, seed=9, sample=False))


def test_make_windows_too_short_message():
    stream = np.zeros(1_234, dtype=np.int64)
    with pytest.raises(BonsaiError) as exc:
        make_windows(stream, 10, 128, seed=0, sample=True)
    assert _one_line(exc) == "calibration text has 1,234 tokens; 10 windows × 128 tokens need 1,280"
    with pytest.raises(BonsaiError) as exc:
        make_windows(np.zeros(5_000, dtype=np.int64), 3, 2_048, seed=0, sample=False)
    assert _one_line(exc) == "evaluation text has 5,000 tokens; 3 windows × 2,048 tokens need 6,144"
    # exactly enough is fine, and every chunk is used
    w = make_windows(np.arange(1_280), 10, 128, seed=0, sample=True)
    np.testing.assert_array_equal(w, np.arange(1_280).reshape(10, 128))


# --------------------------------------------------------------------------------------------------------
# prepare_windows
# --------------------------------------------------------------------------------------------------------


def test_prepare_windows_from_text_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(f"line number {i} with some words" for i in range(300)), encoding="utf-8")
    tok = FakeTokenizer()
    cal, meta = prepare_windows(str(p), tok, n_windows=6, seq_len=50, seed=1, purpose="calibration")
    cal2, _ = prepare_windows(str(p), tok, n_windows=6, seq_len=50, seed=1, purpose="calibration")
    ev, ev_meta = prepare_windows(str(p), tok, n_windows=6, seq_len=50, seed=1, purpose="evaluation")
    np.testing.assert_array_equal(cal, cal2)
    # the fake tokenizer adds BOS: every window is BOS + the next 49 tokens of the stream (which has no BOS)
    stream = tokenize_stream(tok, read_text_source(str(p)), leading_bos=False)
    np.testing.assert_array_equal(ev[:, 1:], stream[:294].reshape(6, 49))
    assert (ev[:, 0] == 1).all() and (cal[:, 0] == 1).all() and (cal[:, 1:] != 1).all()
    assert meta["bos_per_window"] and ev_meta["bos_per_window"]
    assert meta["source"] == str(p)
    assert meta["purpose"] == "calibration" and ev_meta["purpose"] == "evaluation"
    assert (meta["n_windows"], meta["seq_len"], meta["seed"]) == (6, 50, 1)
    assert meta["n_tokens_available"] == len(stream)
    assert meta["source_sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert meta["tokenizer"] == "fake-char-tokenizer" and meta["vocab_size"] == 253
    json.dumps(meta)  # serialisable as is

    with pytest.raises(BonsaiError):
        prepare_windows(str(p), tok, n_windows=6, seq_len=50, seed=1, purpose="training")
    with pytest.raises(BonsaiError) as exc:
        prepare_windows(str(p), tok, n_windows=1000, seq_len=50, seed=1, purpose="calibration")
    assert _one_line(exc).startswith("calibration text has ")


class NoBosTokenizer(FakeTokenizer):
    """Has a BOS token but, like GPT-2-style tokenizers, does not add it when encoding."""

    def __call__(self, texts, add_special_tokens=True, **kwargs):
        return super().__call__(texts, add_special_tokens=False, **kwargs)


def test_window_bos_follows_the_tokenizer_and_the_family():
    assert window_bos(FakeTokenizer()) == 1  # adds BOS when encoding
    assert window_bos(FakeTokenizer(bos=None)) is None
    assert window_bos(NoBosTokenizer()) is None  # has one, never adds it: windows stay as cut
    assert window_bos(NoBosTokenizer(), "gemma3_text") == 1  # Gemma needs it whatever the tokenizer says
    assert window_bos(FakeTokenizer(bos=None), "gemma3_text") is None  # nothing to put there


def test_windows_without_bos_policy_are_cut_from_the_stream_as_before(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(f"line number {i} with some words" for i in range(300)), encoding="utf-8")
    tok = NoBosTokenizer()
    ev, meta = prepare_windows(str(p), tok, n_windows=6, seq_len=50, seed=1, purpose="evaluation")
    stream = tokenize_stream(tok, read_text_source(str(p)))
    assert stream[0] == 1  # the stream's one BOS at the very start, as before
    np.testing.assert_array_equal(ev, stream[:300].reshape(6, 50))
    assert not meta["bos_per_window"]
    gemma, gemma_meta = prepare_windows(str(p), tok, n_windows=6, seq_len=50, seed=1, purpose="evaluation",
                                        model_type="gemma3_text")
    assert (gemma[:, 0] == 1).all() and (gemma[:, 1:] != 1).all() and gemma_meta["bos_per_window"]


def test_make_windows_with_bos_keeps_chunks_disjoint():
    stream = np.arange(10, 1_010)
    w = make_windows(stream, 5, 100, seed=0, sample=True, bos=1)
    assert w.shape == (5, 100) and (w[:, 0] == 1).all()
    chunks = stream[: (1_000 // 99) * 99].reshape(-1, 99)
    for row in w[:, 1:]:
        assert any((row == c).all() for c in chunks)  # a whole text chunk after the BOS
    assert len({int(r[1]) for r in w}) == 5  # no chunk twice
    with pytest.raises(BonsaiError, match="window length must be >= 2"):
        make_windows(stream, 1, 1, seed=0, sample=False, bos=1)


def test_prepare_windows_self_needs_model():
    with pytest.raises(BonsaiError) as exc:
        prepare_windows("self", FakeTokenizer(), n_windows=2, seq_len=8, seed=0, purpose="calibration")
    assert "model" in _one_line(exc)


def test_prepare_windows_real_wiki(stories, wiki_test_raw):
    _, tokenizer = stories
    kw = {"n_windows": 8, "seq_len": 128, "seed": 0}
    a, meta = prepare_windows(str(wiki_test_raw), tokenizer, purpose="calibration", **kw)
    b, _ = prepare_windows(str(wiki_test_raw), tokenizer, purpose="calibration", **kw)
    e, _ = prepare_windows(str(wiki_test_raw), tokenizer, purpose="evaluation", **kw)
    np.testing.assert_array_equal(a, b)
    assert a.shape == e.shape == (8, 128)
    assert e[0, 0] == tokenizer.bos_token_id  # evaluation starts at the beginning of the stream
    assert meta["n_tokens_available"] > 100_000
    assert meta["vocab_size"] == 512


# --------------------------------------------------------------------------------------------------------
# Self-generated text
# --------------------------------------------------------------------------------------------------------


def test_generate_self_text_stories_deterministic(stories):
    model, tokenizer = stories
    rng_state = torch.get_rng_state()
    a = generate_self_text(model, tokenizer, 4, 32, seed=7, batch_size=3)
    b = generate_self_text(model, tokenizer, 4, 32, seed=7, batch_size=3)
    c = generate_self_text(model, tokenizer, 4, 32, seed=8, batch_size=3)
    assert torch.equal(rng_state, torch.get_rng_state()), "must not draw from the global torch RNG"
    assert a.shape == (4, 32) and a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (a[:, 0] == tokenizer.bos_token_id).all()
    assert ((a >= 0) & (a < 512)).all()
    assert len({tuple(row) for row in a.tolist()}) == 4  # sampled, not greedy: rows differ


def test_prepare_windows_self_calibration_differs_from_evaluation(stories):
    model, tokenizer = stories
    kw = {"n_windows": 4, "seq_len": 32, "seed": 0, "model": model}
    cal, meta = prepare_windows("self", tokenizer, purpose="calibration", **kw)
    cal2, _ = prepare_windows("self", tokenizer, purpose="calibration", **kw)
    ev, ev_meta = prepare_windows("self", tokenizer, purpose="evaluation", **kw)
    np.testing.assert_array_equal(cal, cal2)
    assert not np.array_equal(cal, ev)
    assert cal.shape == ev.shape == (4, 32)
    assert meta["source"] == "self" and meta["n_tokens_available"] == 4 * 32
    assert meta["source_sha256"] == hashlib.sha256(cal.astype("<i8").tobytes()).hexdigest()
    assert meta["source_sha256"] != ev_meta["source_sha256"]
    assert meta["vocab_size"] == 512


def test_generate_self_text_uses_cache_and_follows_model():
    vocab = 5
    table = torch.full((vocab, vocab), -1e9)
    for i in range(vocab):
        table[i, (i + 1) % vocab] = 0.0  # deterministic successor
    model = FixedDistributionLM(table, eos=4)
    model.train()
    out = generate_self_text(model, FakeTokenizer(bos=None, eos=None), 3, 7, seed=0, batch_size=2)
    assert model.training, "training mode must be restored"
    expected = [(4 + t) % vocab for t in range(7)]  # starts at EOS (no BOS anywhere)
    assert out.tolist() == [expected] * 3
    # one token per step after the first, with a growing cache: 2 batches × 6 forward calls
    assert model.cache_lengths == list(range(6)) * 2


def test_generate_self_text_is_temperature_one_sampling():
    probs = torch.tensor([0.7, 0.2, 0.1])
    table = probs.log().expand(3, 3).clone()
    model = FixedDistributionLM(table, bos=0)
    out = generate_self_text(model, FakeTokenizer(bos=None, eos=None), 1000, 7, seed=1, batch_size=250)
    freq = np.bincount(out[:, 1:].ravel(), minlength=3) / 6000
    np.testing.assert_allclose(freq, probs.numpy(), atol=0.025)


def test_generate_self_text_errors():
    table = torch.zeros(3, 3)
    with pytest.raises(BonsaiError) as exc:
        generate_self_text(FixedDistributionLM(table), FakeTokenizer(bos=None, eos=None), 1, 4, seed=0)
    assert "BOS" in _one_line(exc)
    with pytest.raises(BonsaiError):
        generate_self_text(FixedDistributionLM(table, bos=0), FakeTokenizer(), 0, 4, seed=0)
    with pytest.raises(BonsaiError):
        generate_self_text(FixedDistributionLM(table, bos=0), FakeTokenizer(), 1, 5000, seed=0)


# --------------------------------------------------------------------------------------------------------
# save_windows / load_windows
# --------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_no_temp_files(tmp_path):
    windows = np.arange(5 * 16, dtype=np.int64).reshape(5, 16) * 3
    meta = {"source": "x.txt", "seed": np.int64(3), "n_windows": 5, "nested": {"a": [1, 2]}}
    target = tmp_path / "sub" / "windows.parquet"
    digest = save_windows(target, windows, meta)
    assert sorted(os.listdir(target.parent)) == ["windows.parquet"]
    assert digest == hashlib.sha256(target.read_bytes()).hexdigest()

    loaded, loaded_meta = load_windows(str(target))
    assert loaded.dtype == np.int64
    np.testing.assert_array_equal(loaded, windows)
    assert loaded_meta == {"source": "x.txt", "seed": 3, "n_windows": 5, "nested": {"a": [1, 2]}}

    table = pq.read_table(target)
    assert table.schema.field("window").type == pa.int32()
    assert table.schema.field("token_ids").type == pa.list_(pa.int32())
    assert json.loads(table.schema.metadata[b"bonsai"]) == loaded_meta

    # same content gives the same bytes; overwriting leaves no temp files either
    assert save_windows(target, windows, meta) == digest
    assert sorted(os.listdir(target.parent)) == ["windows.parquet"]


def test_save_is_atomic_when_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "w.parquet"
    original = np.ones((2, 4), dtype=np.int64)
    save_windows(target, original, {"v": 1})
    before = target.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(data.os, "replace", boom)
    with pytest.raises(OSError):
        save_windows(target, np.zeros((3, 4), dtype=np.int64), {"v": 2})
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.parquet"]


def test_load_truncated_missing_and_foreign_files(tmp_path):
    target = tmp_path / "w.parquet"
    save_windows(target, np.arange(40, dtype=np.int64).reshape(4, 10), {"v": 1})
    raw = target.read_bytes()

    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BonsaiError) as exc:
        load_windows(truncated)
    assert str(truncated) in _one_line(exc)

    with pytest.raises(BonsaiError) as exc:
        load_windows(tmp_path / "missing.parquet")
    assert _one_line(exc) == f"windows file not found: {tmp_path / 'missing.parquet'}"

    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"window": pa.array([0], pa.int32()), "token_ids": [[1, 2]]}), foreign)
    with pytest.raises(BonsaiError) as exc:
        load_windows(foreign)
    assert "metadata" in _one_line(exc)


def test_load_rejects_ragged_windows(tmp_path):
    ragged = tmp_path / "ragged.parquet"
    table = pa.table(
        {
            "window": pa.array([0, 1], pa.int32()),
            "token_ids": pa.array([[1, 2, 3], [4, 5]], pa.list_(pa.int32())),
        }
    ).replace_schema_metadata({b"bonsai": b"{}"})
    pq.write_table(table, ragged)
    with pytest.raises(BonsaiError) as exc:
        load_windows(ragged)
    assert "ragged" in _one_line(exc)


def test_save_rejects_bad_windows(tmp_path):
    with pytest.raises(BonsaiError):
        save_windows(tmp_path / "w.parquet", np.arange(5), {})
    with pytest.raises(BonsaiError):
        save_windows(tmp_path / "w.parquet", np.zeros((2, 3)), {})
    assert not (tmp_path / "w.parquet").exists()
