"""Perplexity and faithfulness of a (pruned) causal LM on pre-tokenised, non-overlapping token windows.

Every function takes ``windows``: an integer array or tensor of shape ``(n_windows, seq_len)``. The loss is
computed here from the logits (no labels are passed to the model): next-token cross-entropy over positions
``1 .. seq_len-1`` of each window, accumulated in float64. Windows are run ``batch_size`` at a time and the
log-softmax is only ever formed for one window of one batch, so memory stays bounded by one batch of logits
(per model).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bonsai.errors import BonsaiError
from bonsai.memory import release_free_memory

__all__ = [
    "compare_to_reference",
    "evaluation_summary",
    "greedy_continuation",
    "kl_to_reference",
    "reference_log_probs",
    "mean_nll",
    "perplexity",
    "window_nll",
]


def _as_windows(windows: Any) -> torch.Tensor:
    """Validate ``windows`` and return it as a CPU int64 tensor (no copy when already one)."""
    if isinstance(windows, torch.Tensor):
        shape, dtype = tuple(windows.shape), windows.dtype
        is_int = not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    else:
        try:
            arr = np.asarray(windows)
        except Exception:  # ragged nested lists and the like
            raise BonsaiError("windows must be a 2-D integer array (n_windows, seq_len), got a ragged one") from None
        shape, dtype = arr.shape, arr.dtype
        is_int = arr.dtype.kind in "iu"
    if len(shape) != 2:
        raise BonsaiError(f"windows must be 2-D (n_windows, seq_len), got shape {shape}")
    n, seq_len = shape
    if n < 1:
        raise BonsaiError("windows is empty: need at least one window")
    if seq_len < 2:
        raise BonsaiError(f"windows need seq_len >= 2 to predict any token, got seq_len={seq_len}")
    if not is_int:
        raise BonsaiError(f"windows must hold integer token ids, got dtype {dtype}")
    if isinstance(windows, torch.Tensor):
        t = windows.detach().to(device="cpu", dtype=torch.int64)
    else:
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
    if int(t.min()) < 0:
        raise BonsaiError(f"windows hold a negative token id ({int(t.min())})")
    return t


def _check_vocab(model: torch.nn.Module, ids: torch.Tensor) -> None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n_vocab = getattr(emb, "num_embeddings", None)
    if n_vocab is not None and int(ids.max()) >= n_vocab:
        raise BonsaiError(f"windows hold token id {int(ids.max())} but the model's vocabulary has {n_vocab}")


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise BonsaiError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids.to(_device(model)), use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


class _eval_mode:
    """Put models in eval mode for the duration, restoring each one's training flag afterwards."""

    def __init__(self, *models: torch.nn.Module) -> None:
        self.models = [m for m in models if m is not None]
        self.flags: list[bool] = []

    def __enter__(self) -> None:
        self.flags = [m.training for m in self.models]
        for m in self.models:
            m.eval()

    def __exit__(self, *exc: object) -> None:
        for m, flag in zip(self.models, self.flags, strict=True):
            m.train(flag)


def _score(
    model: torch.nn.Module,
    windows: Any,
    batch_size: int,
    desc: str | None,
    reference: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """One pass over ``windows``: per-window summed NLL (float64) for ``model`` and, when a ``reference``
    is given, for it too, plus the summed KL(reference || model) and the top-1 agreement count."""
    ids = _as_windows(windows)
    batch_size = _check_batch_size(batch_size)
    _check_vocab(model, ids)
    if reference is not None:
        _check_vocab(reference, ids)
    n, seq_len = ids.shape
    nll = np.zeros(n, dtype=np.float64)
    ref_nll = np.zeros(n, dtype=np.float64) if reference is not None else None
    kl_sum = 0.0
    agree = 0
    same = reference is model

    starts = range(0, n, batch_size)
    with torch.inference_mode(), _eval_mode(model, reference):
        for start in tqdm(starts, total=len(starts), desc=desc, disable=None, leave=False, unit="batch"):
            batch = ids[start : start + batch_size]
            logits = _logits(model, batch)
            ref_logits = None
            if reference is not None:
                ref_logits = logits if same else _logits(reference, batch)
            for i in range(batch.shape[0]):
                target = batch[i, 1:].to(logits.device)
                lp = F.log_softmax(logits[i, :-1].float(), dim=-1)  # (seq_len-1, vocab)
                nll[start + i] = -lp.gather(-1, target[:, None]).double().sum().item()
                if ref_logits is None:
                    continue
                rl = ref_logits[i, :-1]
                if rl.device != lp.device:
                    rl = rl.to(lp.device)
                rlp = F.log_softmax(rl.float(), dim=-1)
                ref_nll[start + i] = -rlp.gather(-1, target[:, None]).double().sum().item()
                kl_pos = (rlp.exp() * (rlp - lp)).sum(-1)  # (seq_len-1,), per-position KL(ref || model)
                kl_sum += kl_pos.double().sum().item()
                agree += int((rl.argmax(-1) == logits[i, :-1].argmax(-1)).sum().item())
                del rl, rlp, kl_pos
            del logits, ref_logits
    release_free_memory()  # keeps the heap from creeping over hundreds of sub-model passes (bonsai/memory.py)
    return {
        "nll_sum": nll,
        "ref_nll_sum": ref_nll,
        "kl_sum": kl_sum,
        "agree": agree,
        "n_windows": int(n),
        "seq_len": int(seq_len),
        "tokens": int(n) * (int(seq_len) - 1),
    }


def _mean(sums: np.ndarray, tokens: int) -> float:
    return math.fsum(sums.tolist()) / tokens


def window_nll(model: torch.nn.Module, windows: Any, batch_size: int = 8, *, desc: str | None = None) -> np.ndarray:
    """Per-window mean next-token NLL (nats), float64 of shape ``(n_windows,)``."""
    s = _score(model, windows, batch_size, desc if desc is not None else "nll")
    return s["nll_sum"] / (s["seq_len"] - 1)


def mean_nll(model: torch.nn.Module, windows: Any, batch_size: int = 8, *, desc: str | None = None) -> float:
    """Token-weighted mean next-token NLL over all windows (nats)."""
    s = _score(model, windows, batch_size, desc if desc is not None else "nll")
    return _mean(s["nll_sum"], s["tokens"])


def perplexity(model: torch.nn.Module, windows: Any, batch_size: int = 8, *, desc: str | None = None) -> float:
    """``exp(mean_nll)``: token-level perplexity over all windows."""
    return math.exp(mean_nll(model, windows, batch_size, desc=desc if desc is not None else "perplexity"))


def compare_to_reference(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    windows: Any,
    batch_size: int = 8,
    *,
    desc: str | None = None,
) -> dict[str, float]:
    """Faithfulness of ``model`` to ``reference`` on the same windows.

    Returns ``kl`` (mean over predicted positions of KL(reference || model) of the next-token
    distributions, nats), ``top1_agreement`` (share of predicted positions whose argmax logits agree),
    ``ppl`` and ``reference_ppl``. Both models run batch by batch.
    """
    s = _score(model, windows, batch_size, desc if desc is not None else "compare", reference=reference)
    return _comparison(s)


def _comparison(s: dict[str, Any]) -> dict[str, float]:
    tokens = s["tokens"]
    return {
        "kl": max(s["kl_sum"] / tokens, 0.0),
        "top1_agreement": s["agree"] / tokens,
        "ppl": math.exp(_mean(s["nll_sum"], tokens)),
        "reference_ppl": math.exp(_mean(s["ref_nll_sum"], tokens)),
    }


def evaluation_summary(
    model: torch.nn.Module,
    windows: Any,
    *,
    batch_size: int = 8,
    reference: torch.nn.Module | None = None,
    desc: str | None = None,
) -> dict[str, Any]:
    """Everything an evaluation report needs, from one pass (two models when ``reference`` is given).

    Keys: ``ppl``, ``mean_nll``, ``n_windows``, ``seq_len``, ``tokens`` (predicted tokens), ``per_window``
    (list of per-window mean NLLs) and, with a ``reference``, ``kl``, ``top1_agreement``, ``reference_ppl``.
    """
    s = _score(model, windows, batch_size, desc if desc is not None else "evaluate", reference=reference)
    nll = _mean(s["nll_sum"], s["tokens"])
    out: dict[str, Any] = {
        "ppl": math.exp(nll),
        "mean_nll": nll,
        "n_windows": s["n_windows"],
        "seq_len": s["seq_len"],
        "tokens": s["tokens"],
    }
    if reference is not None:
        cmp = _comparison(s)
        out.update(kl=cmp["kl"], top1_agreement=cmp["top1_agreement"], reference_ppl=cmp["reference_ppl"])
    out["per_window"] = (s["nll_sum"] / (s["seq_len"] - 1)).tolist()
    return out


def greedy_continuation(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32) -> str:
    """The model's greedy continuation of `prompt` (the text after it only), decoded; deterministic, so a dense
    and a pruned model can be read side by side."""
    if max_new_tokens < 1:
        raise BonsaiError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(_device(model))
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def reference_log_probs(model: torch.nn.Module, windows: Any, batch_size: int = 8) -> torch.Tensor:
    """Next-token log-probabilities of ``model`` at positions ``0 .. seq_len-2`` of every window, stored as
    bfloat16 (n_windows, seq_len-1, vocab) on the CPU: the dense model's distributions that sub-models are
    compared with (`kl_to_reference`). The rounding is the same for every sub-model compared, so it shifts
    their KLs alike and leaves their order."""
    ids = _as_windows(windows)
    _check_vocab(model, ids)
    out = []
    with torch.inference_mode(), _eval_mode(model):
        for start in range(0, ids.shape[0], _check_batch_size(batch_size)):
            logits = _logits(model, ids[start : start + batch_size])
            out.extend(F.log_softmax(row[:-1].float(), dim=-1).to(torch.bfloat16).cpu()[None] for row in logits)
            del logits
    return torch.cat(out)


def kl_to_reference(
    model: torch.nn.Module, windows: Any, ref_log_probs: torch.Tensor, batch_size: int = 8
) -> tuple[float, float]:
    """(mean KL(reference || model) over predicted positions, mean next-token NLL) of ``model`` on ``windows``,
    against log-probabilities from `reference_log_probs` on the same windows."""
    ids = _as_windows(windows)
    batch_size = _check_batch_size(batch_size)
    if tuple(ref_log_probs.shape[:2]) != (ids.shape[0], ids.shape[1] - 1):
        raise BonsaiError(
            f"reference log-probabilities of shape {tuple(ref_log_probs.shape)} do not match windows {tuple(ids.shape)}"
        )
    kl_sum = nll_sum = 0.0
    with torch.inference_mode(), _eval_mode(model):
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size]
            logits = _logits(model, batch)
            for i in range(batch.shape[0]):  # one window's log-softmax at a time, as in _score
                lp = F.log_softmax(logits[i, :-1].float(), dim=-1).cpu()
                rlp = ref_log_probs[start + i].float()
                kl_sum += float((rlp.exp() * (rlp - lp)).sum(-1).double().sum())
                nll_sum -= float(lp.gather(-1, batch[i, 1:, None]).double().sum())
                del lp, rlp
            del logits
    release_free_memory()
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    return max(kl_sum / tokens, 0.0), nll_sum / tokens
