"""Family conformance: every supported family, built tiny and random offline with its quirks (tiny_models.py:
Gemma-3's sliding-window pattern, query pre-attention scalar, extra norms, scaled embeddings and one KV head; Qwen2's
q/k/v biases; Qwen3's q/k norms; Mistral's sliding window; Llama's GQA and tied head), behaves like stock
transformers through the project's loader, an empty prune, its pruned checkpoints and its windows.

(a) dense logits through the project's loader equal stock transformers' (HF safetensors);
(b) a prune that removes nothing gives the dense logits;
(c) a pruned checkpoint (one layer without attention, one without MLP) loaded in a fresh process that has only
    transformers (remote code) gives the in-process model's logits, also step by step through the KV cache;
(d) windows start with BOS exactly when the tokenizer adds one or the family needs one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TINY_CONFIGS, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from bonsai.checkpoint import load_for_pruning, save_pruned
from bonsai.compensation import compensate_and_shrink
from bonsai.data import BOS_FAMILIES, prepare_windows
from bonsai.shrink import shrink_model
from bonsai.units import ATTN, MLP, full_kept, unit_table

FAMILIES = sorted(TINY_CONFIGS)
FRESH_LOAD = Path(__file__).with_name("fresh_load.py")
IDS = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0)).tolist()
TOL = 1e-5


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_a_project_loader_gives_stock_logits(family, tmp_path):
    tiny_model(family).save_pretrained(tmp_path / family)
    tiny_tokenizer().save_pretrained(tmp_path / family)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / family, dtype=torch.float32).eval()
    ours, _, kept = load_for_pruning(tmp_path / family)
    assert kept == full_kept(stock)
    assert torch.equal(_logits(ours), _logits(stock))


@pytest.mark.parametrize("family", FAMILIES)
def test_b_prune_that_removes_nothing_gives_dense_logits(family, tmp_path):
    model = tiny_model(family)
    dense = _logits(model)
    units = unit_table(model)
    nothing = np.zeros(len(units), dtype=bool)
    windows = np.asarray(IDS, dtype=np.int64)
    kept, _ = compensate_and_shrink(model, units, nothing, full_kept(model), windows, mode="refit", batch_size=2)
    out = save_pruned(model, None, tmp_path / "pruned", {"kept_units": kept})
    reloaded, _, _ = load_for_pruning(out)
    assert torch.equal(_logits(model), dense)
    assert (_logits(reloaded) - dense).abs().max().item() <= TOL


def _pruned_dir(family: str, root: Path) -> tuple[Path, torch.nn.Module]:
    model = tiny_model(family, seed=1)
    units = unit_table(model)
    remove = np.random.default_rng(0).random(len(units)) < 0.3
    remove[units.index[(units.layer == 0) & (units.kind == MLP)]] = True  # layer 0: attention only
    remove[units.index[(units.layer == 1) & (units.kind == ATTN)]] = True  # layer 1: MLP only
    kept = shrink_model(model, units, remove, full_kept(model))
    return save_pruned(model, None, root / family, {"kept_units": kept}), model


def test_c_pruned_checkpoints_in_a_fresh_stock_process(tmp_path):
    pruned = {family: _pruned_dir(family, tmp_path) for family in FAMILIES}
    spec = tmp_path / "spec.json"
    new_tokens = 6
    spec.write_text(json.dumps({"ids": IDS, "new_tokens": new_tokens, "dirs": [str(d) for d, _ in pruned.values()]}))
    res = subprocess.run([sys.executable, str(FRESH_LOAD), "--spec", str(spec)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    stock = json.loads(res.stdout.strip().splitlines()[-1])
    for family, (directory, model) in pruned.items():
        got = stock[str(directory)]
        assert got["class"].startswith("Bonsai"), family
        assert (torch.tensor(got["logits"]) - _logits(model)).abs().max().item() <= TOL, family
        # the stock process decoded through its KV cache; the in-process model scores the same sequence at once
        sequences = torch.tensor(got["sequences"])
        full = _logits(model, sequences.tolist())[:, len(IDS[0]) - 1 : -1]
        assert (torch.tensor(got["step_logits"]) - full).abs().max().item() <= TOL, family
        assert torch.equal(full.argmax(-1), sequences[:, len(IDS[0]) :]), family  # greedy agrees step by step


@pytest.fixture(scope="module")
def stories_tokenizers(stories_dir):
    from transformers import AutoTokenizer

    adds = AutoTokenizer.from_pretrained(stories_dir)
    never = AutoTokenizer.from_pretrained(stories_dir, add_bos_token=False)
    assert adds("a").input_ids[0] == adds.bos_token_id and never("a").input_ids[0] != never.bos_token_id
    return adds, never


@pytest.mark.parametrize("family", FAMILIES)
def test_d_windows_start_with_bos_exactly_when_expected(family, stories_tokenizers, wiki_valid):
    for tokenizer in stories_tokenizers:
        bos = tokenizer.bos_token_id
        expect = family in BOS_FAMILIES or tokenizer("a").input_ids[0] == bos
        for purpose in ("calibration", "evaluation"):
            windows, meta = prepare_windows(str(wiki_valid), tokenizer, n_windows=4, seq_len=64, seed=0,
                                            purpose=purpose, model_type=family)
            assert meta["bos_per_window"] is expect
            assert bool((windows[:, 0] == bos).all()) is expect, (family, purpose)
            if expect:
                assert not (windows[:, 1:] == bos).any()  # one BOS per window, never doubled
