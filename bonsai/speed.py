"""Inference speed and memory of (pruned) causal LMs: prefill and decode throughput, peak memory, size on disk.

Method (batch 1, greedy, the model's own dtype, ``torch.inference_mode``):

* **prefill**: one forward pass over ``prompt_len`` random token ids (seeded; ids >= 3 so no special tokens),
  ``use_cache=True`` and ``logits_to_keep=1`` as ``generate`` runs it (only the last position's logits are
  needed to start decoding); throughput = ``prompt_len / seconds``.
* **decode**: ``model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)``
  with the KV cache. A streamer time-stamps the first generated token (which comes out of the prefill) and the
  end, so decode throughput = ``(new_tokens - 1) / (t_end - t_first_token)`` counts only cached one-token steps;
  ``generate_tokens_per_s`` (= ``new_tokens`` / whole call, prefill included) and ``time_to_first_token_s``
  are reported too.
* **weight streaming** (the decode bound): one token's activation multiplied through every linear layer's weight
  once, in model order (the LM head included), nothing else: the memory traffic a decode step cannot avoid. At
  batch 1 a decode step reads every weight, so ``weight_stream_tokens_per_s`` is what decode would reach if
  attention, norms, the KV cache and per-op dispatch cost nothing. Its ratio between two models
  (``weight_stream_speedup``) is the ceiling of their decode speed-up on this machine: decode time = streaming
  time + the rest, and any cost the two share (same code, same layer count, a KV cache) pulls the speed-up below
  the streaming ratio. Each run keeps the best of 3 passes.
* Each figure is the **median** over ``runs`` timed repetitions after ``warmup`` untimed ones. On CUDA every
  timing is bracketed by ``torch.cuda.synchronize()``.
* **peak memory**, measured in a separate pass (one prefill, one generate) after the timed runs:

  - CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (exact allocator peak; weights
    included), and its excess over ``memory_allocated`` at the start (activations + KV cache).
  - CPU: the kernel's peak resident set size of this process. ``/proc/self/clear_refs`` (write ``5``) resets the
    high-water mark ``VmHWM`` to the current ``VmRSS`` before the pass, and ``VmHWM`` is read after it; freed heap
    memory is first returned to the OS (``gc.collect`` and glibc ``malloc_trim``) so the pass's allocations show
    up in RSS. The mark is process-wide: other threads' allocations during the pass count too, and
    allocator caching makes the excess a lower bound on the working memory. Where ``clear_refs`` is not
    writable, a thread samples ``VmRSS`` every millisecond instead (method ``"sampled VmRSS"``).

:func:`compare_speed` times several models in one process, interleaving their runs so that background load hits
all of them alike, and adds ratios against the first model (the dense one).
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bonsai.errors import BonsaiError
from bonsai.memory import release_free_memory

__all__ = ["compare_speed", "dir_size", "measure_speed"]

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def dir_size(path: str | Path) -> int:
    """Bytes on disk of a file, or of all regular files under a directory (symlinks not followed)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise BonsaiError(f"{path} does not exist")
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            p = Path(root) / name
            if not p.is_symlink():
                total += p.stat().st_size
    return total


# ---------------------------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class _CpuPeak:
    """Peak RSS of this process during a ``with`` block: kernel high-water mark reset via clear_refs, else a
    sampling thread."""

    def __init__(self) -> None:
        self.start = self.peak = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _CpuPeak:
        gc.collect()
        release_free_memory()
        try:
            _CLEAR_REFS.write_text("5")
            self.method = "VmHWM after clear_refs reset"
        except OSError:
            self.method = "sampled VmRSS (1 ms)"
            self._thread = threading.Thread(target=self._sample, daemon=True)
        self.start = (_status_kb("VmRSS") or 0) * 1024
        self.peak = self.start
        if self._thread is not None:
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, (_status_kb("VmRSS") or 0) * 1024)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, (_status_kb("VmRSS") or 0) * 1024)
        else:
            self.peak = (_status_kb("VmHWM") or 0) * 1024


class _CudaPeak:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "torch.cuda.max_memory_allocated"

    def __enter__(self) -> _CudaPeak:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)


# ---------------------------------------------------------------------------------------------------- timing


class _Stamps:
    """A generate() streamer recording when the first generated token and the end arrive."""

    def __init__(self, sync) -> None:
        self.sync = sync
        self.calls = 0
        self.first: float | None = None
        self.end_t: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # call 1 is the prompt, call 2 the first generated token
            self.sync()
            self.first = time.perf_counter()

    def end(self) -> None:
        self.sync()
        self.end_t = time.perf_counter()


class _Bench:
    def __init__(
        self, model: nn.Module, device: torch.device, prompt_len: int, new_tokens: int, seed: int, compile_decode: bool
    ):
        self.model = model
        self.generate_kwargs = _compiled_decode_kwargs() if compile_decode else {}
        self.device = device
        self.prompt_len, self.new_tokens = prompt_len, new_tokens
        emb = model.get_input_embeddings()
        vocab = int(getattr(emb, "num_embeddings", None) or model.config.vocab_size)
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(min(3, vocab - 1), vocab, (1, prompt_len), generator=gen).to(device)
        self.mask = torch.ones_like(self.ids)
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        pad = getattr(model.config, "pad_token_id", None)
        if pad is None:
            pad = eos[0] if isinstance(eos, list | tuple) and eos else eos
        self.pad = 0 if pad is None else int(pad)
        self.linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        widths = {m.in_features for m in self.linears}
        self.token_rows = {n: torch.randn(1, n, generator=gen).to(device) for n in widths}
        self.prefill_s: list[float] = []
        self.stream_s: list[float] = []
        self.decode_s: list[float] = []
        self.generate_s: list[float] = []
        self.ttft_s: list[float] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prefill(self) -> float:
        self.sync()
        t0 = time.perf_counter()
        out = self.model(input_ids=self.ids, attention_mask=self.mask, use_cache=True, logits_to_keep=1)
        self.sync()
        dt = time.perf_counter() - t0
        del out
        return dt

    def weight_stream(self) -> float:
        self.sync()
        t0 = time.perf_counter()
        for lin in self.linears:
            torch.nn.functional.linear(self.token_rows[lin.in_features], lin.weight)
        self.sync()
        return time.perf_counter() - t0

    def generate(self) -> tuple[float, float, float]:
        stamps = _Stamps(self.sync)
        self.sync()
        t0 = time.perf_counter()
        out = self.model.generate(
            input_ids=self.ids,
            attention_mask=self.mask,
            max_new_tokens=self.new_tokens,
            min_new_tokens=self.new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=self.pad,
            streamer=stamps,
            **self.generate_kwargs,
        )
        self.sync()
        t_end = stamps.end_t if stamps.end_t is not None else time.perf_counter()
        produced = out.shape[1] - self.prompt_len
        if produced != self.new_tokens:
            raise BonsaiError(f"generate produced {produced} tokens, expected {self.new_tokens}")
        first = stamps.first if stamps.first is not None else t_end
        return t_end - t0, first - t0, t_end - first


def _compiled_decode_kwargs() -> dict[str, Any]:
    """generate() options for the deployment-style decode: a static KV cache and the one-token step compiled with
    torch.compile (transformers does this by itself on CUDA; `_compile_all_devices` extends it to CPU). It removes
    most per-op dispatch overhead, which is the same for a dense and a pruned model and so caps their ratio."""
    from transformers.generation import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False)
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def _check_positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BonsaiError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BonsaiError("device 'cuda' requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _param_info(model: nn.Module) -> dict[str, Any]:
    from bonsai.architectures import non_embedding_params, total_params

    info: dict[str, Any] = {"params": total_params(model)}
    try:
        info["non_embedding_params"] = non_embedding_params(model)
    except Exception:  # a model without the embedding accessors
        info["non_embedding_params"] = None
    info["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    info["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    return info


def _kv_cache_bytes(model: nn.Module, positions: int) -> int | None:
    """Bytes of keys and values a full-attention KV cache holds after `positions` tokens (what the last decode
    step reads); None for a model without the family accessors."""
    from bonsai.architectures import attn_groups, decoder_layers, head_dim, query_head_units

    try:
        layers, width = decoder_layers(model), head_dim(model.config)
    except Exception:  # not a supported family
        return None
    size = next(model.parameters()).element_size()
    heads = [attn_groups(layer, model.config) for layer in layers]
    if query_head_units(model.config):  # units are query heads over one shared KV head
        heads = [min(h, 1) for h in heads]
    return sum(2 * h * width * positions * size for h in heads)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else math.inf


def _memory(bench: _Bench) -> dict[str, Any]:
    peak_cls = _CudaPeak if bench.device.type == "cuda" else _CpuPeak
    out: dict[str, Any] = {}
    for phase, fn in (("prefill", bench.prefill), ("decode", bench.generate)):
        meter = peak_cls(bench.device) if bench.device.type == "cuda" else peak_cls()
        with meter:
            fn()
        out[f"{phase}_peak_bytes"] = int(meter.peak)
        out[f"{phase}_peak_delta_bytes"] = int(max(meter.peak - meter.start, 0))
        out["memory_method"] = meter.method
    out["peak_memory_bytes"] = max(out["prefill_peak_bytes"], out["decode_peak_bytes"])
    out["peak_memory_delta_bytes"] = max(out["prefill_peak_delta_bytes"], out["decode_peak_delta_bytes"])
    return out


def _measure(
    models: dict[str, nn.Module],
    *,
    prompt_len: int,
    new_tokens: int,
    runs: int,
    warmup: int,
    device: str | torch.device,
    seed: int,
    memory: bool,
    threads: int | None,
    compile_decode: bool = False,
) -> dict[str, dict[str, Any]]:
    if not models:
        raise BonsaiError("no models to measure")
    _check_positive_int("prompt_len", prompt_len)
    _check_positive_int("new_tokens", new_tokens, 2)
    _check_positive_int("runs", runs)
    _check_positive_int("warmup", warmup, 0)
    dev = _resolve_device(device)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(_check_positive_int("threads", threads))
    homes = {name: _model_device(m) for name, m in models.items()}
    flags = {name: m.training for name, m in models.items()}
    try:
        benches = {}
        for name, m in models.items():
            m.to(dev).eval()
            benches[name] = _Bench(m, dev, prompt_len, new_tokens, seed, compile_decode)
        with torch.inference_mode():
            for _ in range(warmup):
                for b in benches.values():
                    b.prefill()
                    b.generate()
            for _ in range(runs):  # interleaved: drifting background load hits every model alike
                for b in benches.values():
                    b.prefill_s.append(b.prefill())
                    # best of 3 passes: one pass is ~0.1 s, short enough for one preemption to double it
                    b.stream_s.append(min(b.weight_stream() for _ in range(3)))
            for _ in range(runs):
                for b in benches.values():
                    total, ttft, decode = b.generate()
                    b.generate_s.append(total)
                    b.ttft_s.append(ttft)
                    b.decode_s.append(decode)
            mem = {name: _memory(b) for name, b in benches.items()} if memory else {}
        results = {}
        for name, b in benches.items():
            results[name] = {
                **_param_info(b.model),
                "kv_cache_bytes": _kv_cache_bytes(b.model, prompt_len + new_tokens),
                "device": str(dev),
                "torch_threads": torch.get_num_threads(),
                "prompt_len": prompt_len,
                "new_tokens": new_tokens,
                "decode_mode": "static cache, torch.compile" if compile_decode else "eager",
                "runs": runs,
                "warmup": warmup,
                "prefill_tokens_per_s": _rate(prompt_len, _median(b.prefill_s)),
                "decode_tokens_per_s": _rate(new_tokens - 1, _median(b.decode_s)),
                "generate_tokens_per_s": _rate(new_tokens, _median(b.generate_s)),
                "weight_stream_tokens_per_s": _rate(1, _median(b.stream_s)),
                "time_to_first_token_s": _median(b.ttft_s),
                "prefill_s": b.prefill_s,
                "weight_stream_s": b.stream_s,
                "decode_s": b.decode_s,
                "generate_s": b.generate_s,
                **mem.get(name, {}),
            }
        return results
    finally:
        torch.set_num_threads(old_threads)
        for name, m in models.items():
            m.to(homes[name]).train(flags[name])
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def measure_speed(
    model: nn.Module,
    *,
    prompt_len: int = 512,
    new_tokens: int = 128,
    runs: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    seed: int = 0,
    memory: bool = True,
    threads: int | None = None,
    compile_decode: bool = False,
) -> dict[str, Any]:
    """Speed of one model (module docstring for the method). ``device``: ``"cpu"``, ``"cuda[:i]"`` or ``"auto"``;
    the model is moved there for the measurement and back afterwards. ``threads``: torch CPU threads for the
    measurement (default: leave as set; on a CPU shared with other work, more threads than free cores can be
    many times slower, so pass 1 there). ``compile_decode``: time generate() with a static cache and the decode
    step compiled (warm-up runs absorb the compilation, so keep ``warmup`` >= 1).

    Returns ``params``, ``non_embedding_params``, ``model_bytes``, ``kv_cache_bytes`` (keys and values of every
    layer after prompt + new tokens, as if every layer attended to all of them), ``dtype``, ``device``,
    ``torch_threads``, the
    settings, ``prefill_tokens_per_s``, ``decode_tokens_per_s``, ``generate_tokens_per_s``,
    ``time_to_first_token_s``, ``weight_stream_tokens_per_s`` (medians), the raw per-run seconds ``prefill_s`` /
    ``decode_s`` / ``generate_s`` / ``weight_stream_s``
    and, with ``memory``, ``peak_memory_bytes`` / ``peak_memory_delta_bytes`` (max over the two phases, each
    also reported as ``prefill_*`` / ``decode_*``) and ``memory_method``.
    """
    return _measure(
        {"model": model},
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        runs=runs,
        warmup=warmup,
        device=device,
        seed=seed,
        memory=memory,
        threads=threads,
        compile_decode=compile_decode,
    )["model"]


_RATIO_KEYS = {
    "prefill_speedup": "prefill_tokens_per_s",
    "decode_speedup": "decode_tokens_per_s",
    "generate_speedup": "generate_tokens_per_s",
    "weight_stream_speedup": "weight_stream_tokens_per_s",
    "params_ratio": "params",
    "non_embedding_params_ratio": "non_embedding_params",
    "model_bytes_ratio": "model_bytes",
    "kv_cache_ratio": "kv_cache_bytes",
    "peak_memory_delta_ratio": "peak_memory_delta_bytes",
}


def compare_speed(
    models: dict[str, nn.Module],
    *,
    prompt_len: int = 512,
    new_tokens: int = 128,
    runs: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    seed: int = 0,
    memory: bool = True,
    threads: int | None = None,
    disk: dict[str, str | Path] | None = None,
    compile_decode: bool = False,
) -> dict[str, Any]:
    """Measure every model in ``models`` (name -> model; the first is the baseline, normally ``"dense"``) in this
    process with interleaved runs. ``disk`` optionally maps names to checkpoint paths for ``disk_bytes``;
    ``compile_decode`` as in :func:`measure_speed`.

    Returns ``{"baseline": name, "models": {name: measure_speed-like dict}, "ratios": {name: {...}}}``; the
    ratios are model / baseline (``*_speedup`` for throughputs, ``*_ratio`` for sizes; None where undefined).
    """
    if not isinstance(models, dict) or not models:
        raise BonsaiError("compare_speed needs a non-empty dict of name -> model")
    results = _measure(
        models,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        runs=runs,
        warmup=warmup,
        device=device,
        seed=seed,
        memory=memory,
        threads=threads,
        compile_decode=compile_decode,
    )
    for name, path in (disk or {}).items():
        if name in results:
            results[name]["disk_bytes"] = dir_size(path)
    keys = dict(_RATIO_KEYS)
    if disk:
        keys["disk_ratio"] = "disk_bytes"
    baseline = next(iter(models))
    base = results[baseline]
    ratios = {}
    for name, r in results.items():
        ratios[name] = {}
        for out_key, key in keys.items():
            a, b = r.get(key), base.get(key)
            ratios[name][out_key] = a / b if a is not None and b not in (None, 0) else None
    return {"baseline": baseline, "models": results, "ratios": ratios}
