"""Perplexity / faithfulness on token windows: checked against the HF loss, a naive loop, and itself."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bonsai.errors import BonsaiError
from bonsai.evaluate import (
    compare_to_reference,
    evaluation_summary,
    kl_to_reference,
    mean_nll,
    perplexity,
    reference_log_probs,
    window_nll,
)

STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "friends. One day, she saw a big red ball under a tree. She ran to the ball and picked it up. "
    '"Can I play with you?" asked a small dog. Lily smiled and said yes. They played all day long and '
    "had so much fun. When the sun went down, Lily went home and told her mom about her new friend. "
    "Her mom was happy and gave her a big hug. The next day, Lily and the dog played again in the park."
)


def _tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    return _tiny_llama(0)


@pytest.fixture(scope="module")
def tiny_other() -> LlamaForCausalLM:
    return _tiny_llama(1)


@pytest.fixture(scope="module")
def tiny_windows() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 64, size=(7, 16), dtype=np.int64)


@pytest.fixture(scope="module")
def stories(stories_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    ids = tok(STORY)["input_ids"]
    seq_len = 24
    n = len(ids) // seq_len
    assert n >= 3, len(ids)
    windows = np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)
    return model, windows


def _hf_ppl(model, windows) -> float:
    """exp of the mean over windows of HF's own (label-shifted, token-mean) loss, one window at a time.

    Every window predicts seq_len - 1 tokens, so the mean of per-window means is the token-weighted mean."""
    with torch.no_grad():
        losses = [
            model(torch.as_tensor(w)[None], labels=torch.as_tensor(w)[None]).loss.item() for w in windows
        ]
    return math.exp(sum(losses) / len(losses))


def _naive_window_nll(model, windows) -> list[float]:
    """Plain Python: logits of the whole window, then -log softmax of each next token, one at a time."""
    out = []
    with torch.no_grad():
        for w in windows:
            logits = model(torch.as_tensor(w)[None]).logits[0].double().tolist()
            total = 0.0
            for t in range(len(w) - 1):
                row = logits[t]
                m = max(row)
                lse = m + math.log(sum(math.exp(x - m) for x in row))
                total += lse - row[int(w[t + 1])]
            out.append(total / (len(w) - 1))
    return out


def _direct_compare(model, reference, windows) -> tuple[float, float]:
    """KL(reference || model) and top-1 agreement of all windows at once, via torch.kl_div."""
    with torch.no_grad():
        ids = torch.as_tensor(windows)
        lm = torch.log_softmax(model(ids).logits[:, :-1].double(), -1)
        lr = torch.log_softmax(reference(ids).logits[:, :-1].double(), -1)
    kl = torch.nn.functional.kl_div(lm, lr, log_target=True, reduction="none").sum(-1).mean().item()
    top1 = (lm.argmax(-1) == lr.argmax(-1)).double().mean().item()
    return kl, top1


# ---------------------------------------------------------------- perplexity against the HF loss / naive loop


@pytest.mark.parametrize("which", ["tiny", "stories"])
def test_perplexity_matches_hf_loss_and_naive_loop(which, request):
    if which == "tiny":
        model, windows = request.getfixturevalue("tiny"), request.getfixturevalue("tiny_windows")
    else:
        model, windows = request.getfixturevalue("stories")
    ppl = perplexity(model, windows, batch_size=2)
    assert ppl == pytest.approx(_hf_ppl(model, windows), rel=1e-6)

    naive = _naive_window_nll(model, windows)
    np.testing.assert_allclose(window_nll(model, windows, batch_size=2), naive, rtol=1e-6)
    assert mean_nll(model, windows) == pytest.approx(sum(naive) / len(naive), rel=1e-6)
    assert ppl == pytest.approx(math.exp(sum(naive) / len(naive)), rel=1e-6)


def test_trained_model_beats_uniform(stories):
    model, windows = stories
    ppl = perplexity(model, windows)
    assert 1.0 < ppl < model.config.vocab_size / 4  # a trained model is far better than uniform
    # and the number is the model's: the same windows through an independent loss computation
    with torch.no_grad():
        logits = model(torch.as_tensor(windows)).logits
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                                  torch.as_tensor(windows)[:, 1:].reshape(-1))
    assert abs(math.log(ppl) - reference.item()) <= 1e-6 * reference.item()
    with torch.no_grad():  # scrambled weights (same shapes) lose the skill: the measure sees the difference
        noisy = copy.deepcopy(model)
        for p in noisy.parameters():
            p.copy_(p[torch.randperm(p.shape[0], generator=torch.Generator().manual_seed(0))])
    assert perplexity(noisy, windows) > 4 * ppl


def test_accepts_tensor_and_numpy_alike(tiny, tiny_windows):
    a = window_nll(tiny, tiny_windows)
    b = window_nll(tiny, torch.as_tensor(tiny_windows))
    c = window_nll(tiny, tiny_windows.astype(np.int32))
    assert a.dtype == np.float64 and a.shape == (len(tiny_windows),)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


# ---------------------------------------------------------------- batch size invariance


@pytest.mark.parametrize("which", ["tiny", "stories"])
def test_batch_size_does_not_change_result(which, request):
    if which == "tiny":
        model, windows = request.getfixturevalue("tiny"), request.getfixturevalue("tiny_windows")
    else:
        model, windows = request.getfixturevalue("stories")
    n = len(windows)
    per = [window_nll(model, windows, batch_size=bs) for bs in (1, 3, n, n + 5)]
    for other in per[1:]:
        np.testing.assert_allclose(other, per[0], rtol=1e-6, atol=0)
    ppls = [perplexity(model, windows, batch_size=bs) for bs in (1, 3, n)]
    assert ppls[1] == pytest.approx(ppls[0], rel=1e-6)
    assert ppls[2] == pytest.approx(ppls[0], rel=1e-6)


# ---------------------------------------------------------------- faithfulness


@pytest.mark.parametrize("which", ["tiny", "stories"])
def test_kl_to_itself_is_zero(which, request):
    if which == "tiny":
        model, windows = request.getfixturevalue("tiny"), request.getfixturevalue("tiny_windows")
    else:
        model, windows = request.getfixturevalue("stories")
    res = compare_to_reference(model, model, windows, batch_size=2)
    assert res["kl"] <= 1e-9
    assert res["top1_agreement"] == 1.0
    assert res["ppl"] == pytest.approx(res["reference_ppl"], rel=1e-12)
    assert res["ppl"] == pytest.approx(perplexity(model, windows), rel=1e-12)

    # a distinct but identical copy (two separate forward passes) is also KL 0
    twin = _tiny_llama(0) if which == "tiny" else type(model)(model.config).eval()
    if which != "tiny":
        twin.load_state_dict(model.state_dict())
    res2 = compare_to_reference(twin, model, windows, batch_size=3)
    assert res2["kl"] <= 1e-9
    assert res2["top1_agreement"] == 1.0


def test_kl_against_different_model(tiny, tiny_other, tiny_windows):
    res = compare_to_reference(tiny_other, tiny, tiny_windows, batch_size=3)
    kl, top1 = _direct_compare(tiny_other, tiny, tiny_windows)
    assert res["kl"] > 1e-4
    assert res["kl"] == pytest.approx(kl, rel=1e-5)
    assert res["top1_agreement"] == pytest.approx(top1, abs=1e-12)
    assert res["top1_agreement"] < 1.0
    assert res["ppl"] == pytest.approx(perplexity(tiny_other, tiny_windows), rel=1e-12)
    assert res["reference_ppl"] == pytest.approx(perplexity(tiny, tiny_windows), rel=1e-12)
    # direction: KL(reference || model); the swapped roles match the swapped direct computation
    swapped = compare_to_reference(tiny, tiny_other, tiny_windows, batch_size=3)
    assert swapped["kl"] == pytest.approx(_direct_compare(tiny, tiny_other, tiny_windows)[0], rel=1e-5)
    assert abs(swapped["kl"] - kl) > 1e-5 * kl  # the two directions differ by more than the tolerance above
    # batch size does not change it either
    res1 = compare_to_reference(tiny_other, tiny, tiny_windows, batch_size=1)
    assert res1["kl"] == pytest.approx(res["kl"], rel=1e-6)
    assert res1["top1_agreement"] == res["top1_agreement"]


def test_kl_pruned_like_stories(stories):
    """A damaged copy of the real model (one MLP zeroed) drifts from the original: KL > 0, ppl worse."""
    model, windows = stories
    damaged = type(model)(model.config).eval()
    damaged.load_state_dict(model.state_dict())
    with torch.no_grad():
        damaged.model.layers[0].mlp.down_proj.weight.zero_()
    res = compare_to_reference(damaged, model, windows, batch_size=2)
    kl, top1 = _direct_compare(damaged, model, windows)
    assert res["kl"] > 1e-4
    assert res["kl"] == pytest.approx(kl, rel=1e-5)
    assert res["top1_agreement"] == pytest.approx(top1, abs=1e-12)
    assert res["ppl"] > res["reference_ppl"]


# ---------------------------------------------------------------- summary


def test_evaluation_summary(tiny, tiny_other, tiny_windows):
    n, seq_len = tiny_windows.shape
    s = evaluation_summary(tiny, tiny_windows, batch_size=4)
    assert set(s) == {"ppl", "mean_nll", "n_windows", "seq_len", "tokens", "per_window"}
    assert (s["n_windows"], s["seq_len"], s["tokens"]) == (n, seq_len, n * (seq_len - 1))
    assert s["mean_nll"] == pytest.approx(mean_nll(tiny, tiny_windows), rel=1e-12)
    assert s["ppl"] == pytest.approx(math.exp(s["mean_nll"]), rel=1e-12)
    assert isinstance(s["per_window"], list) and len(s["per_window"]) == n
    np.testing.assert_allclose(s["per_window"], window_nll(tiny, tiny_windows), rtol=1e-12)
    assert s["mean_nll"] == pytest.approx(float(np.mean(s["per_window"])), rel=1e-12)

    r = evaluation_summary(tiny_other, tiny_windows, batch_size=4, reference=tiny)
    assert set(r) == set(s) | {"kl", "top1_agreement", "reference_ppl"}
    cmp = compare_to_reference(tiny_other, tiny, tiny_windows, batch_size=4)
    for k in ("kl", "top1_agreement", "ppl", "reference_ppl"):
        assert r[k] == pytest.approx(cmp[k], rel=1e-12)
    assert r["reference_ppl"] == pytest.approx(s["ppl"], rel=1e-12)


def test_training_flag_is_restored(tiny, tiny_windows):
    tiny.train()
    try:
        perplexity(tiny, tiny_windows)
        assert tiny.training
    finally:
        tiny.eval()


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((0, 8), dtype=np.int64),  # no windows
        np.zeros((3, 1), dtype=np.int64),  # seq_len 1: nothing to predict
        np.zeros((3, 0), dtype=np.int64),
        np.zeros(8, dtype=np.int64),  # 1-D
        np.zeros((2, 3, 4), dtype=np.int64),  # 3-D
        np.zeros((2, 8), dtype=np.float32),  # not token ids
        torch.zeros(2, 8),  # float tensor
        torch.zeros(0, 8, dtype=torch.long),
        np.full((2, 8), -1, dtype=np.int64),  # negative id
        np.full((2, 8), 64, dtype=np.int64),  # out of vocabulary
        [[1, 2, 3], [4, 5]],  # ragged
    ],
)
def test_bad_windows_raise(tiny, bad):
    for fn in (window_nll, mean_nll, perplexity, evaluation_summary):
        with pytest.raises(BonsaiError) as ei:
            fn(tiny, bad)
        assert "\n" not in str(ei.value)
    with pytest.raises(BonsaiError):
        compare_to_reference(tiny, tiny, bad)


@pytest.mark.parametrize("bs", [0, -1, 1.5])
def test_bad_batch_size_raises(tiny, tiny_windows, bs):
    with pytest.raises(BonsaiError):
        perplexity(tiny, tiny_windows, batch_size=bs)


def test_kl_to_cached_reference_matches_the_two_model_pass():
    """The KL utility's cached (bfloat16) reference log-probs: the reference itself scores about 0 (the rounding's
    constant shift), another model the KL of the exact two-model pass plus that shift (to 1%), and the NLL is
    mean_nll's."""
    dense, other = _tiny_llama(0), _tiny_llama(1)
    windows = np.random.default_rng(0).integers(0, dense.config.vocab_size, size=(5, 12))
    ref = reference_log_probs(dense, windows, batch_size=2)
    assert ref.shape == (5, 11, dense.config.vocab_size) and ref.dtype == torch.bfloat16
    kl, nll = kl_to_reference(other, windows, ref, batch_size=3)
    exact = compare_to_reference(other, dense, windows, batch_size=2)
    self_kl, _ = kl_to_reference(dense, windows, ref)
    assert self_kl < 0.02 * kl
    assert kl - self_kl == pytest.approx(exact["kl"], rel=1e-2) and kl > 0.01
    assert nll == pytest.approx(mean_nll(other, windows, batch_size=2), abs=1e-9)
    with pytest.raises(BonsaiError, match="do not match windows"):
        kl_to_reference(other, windows[:4], ref)
