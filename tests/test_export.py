"""GGUF export on tiny models of every family: the file read back (gguf reader → torch) gives the checkpoint's
logits, pruned shapes per layer included (a layer without attention, one without MLP, compensation biases); a
dense export loads in stock transformers' GGUF loader and through the project's loader with the same logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import TINY_CONFIGS, tiny_biased_llama, tiny_model, tiny_tokenizer

from bonsai.checkpoint import load_pruned_model, save_pruned
from bonsai.errors import BonsaiError
from bonsai.shrink import shrink_model
from bonsai.units import ATTN, MLP, full_kept, unit_table

gguf = pytest.importorskip("gguf")
from bonsai.export import export_gguf, read_gguf  # noqa: E402

FAMILIES = sorted(TINY_CONFIGS)
IDS = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _pruned(model, root, name):
    units = unit_table(model)
    remove = np.random.default_rng(0).random(len(units)) < 0.3
    remove[units.index[(units.layer == 0) & (units.kind == MLP)]] = True
    remove[units.index[(units.layer == 1) & (units.kind == ATTN)]] = True
    kept = shrink_model(model, units, remove, full_kept(model))
    return save_pruned(model, None, root / name, {"kept_units": kept})


@pytest.mark.parametrize("family", [*FAMILIES, "llama_with_biases"])
def test_pruned_export_reads_back_to_the_same_logits(family, tmp_path):
    model = tiny_biased_llama() if family == "llama_with_biases" else tiny_model(family)
    ckpt = _pruned(model, tmp_path, family)
    reference = _logits(load_pruned_model(ckpt))
    f32 = export_gguf(ckpt, tmp_path / f"{family}.gguf", quant="f32")
    fields = gguf.GGUFReader(str(f32)).fields
    arch = fields["general.architecture"].contents()
    heads = fields[f"{arch}.attention.head_count"].contents()
    assert isinstance(heads, list) and len(heads) == model.config.num_hidden_layers  # per-layer shapes
    assert (_logits(read_gguf(f32)) - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()
    f16 = export_gguf(ckpt, tmp_path / f"{family}-f16.gguf", quant="f16")
    assert f16.stat().st_size < f32.stat().st_size
    assert (_logits(read_gguf(f16)) - reference).abs().max().item() <= 2e-2 * reference.abs().max().item()


def test_dense_export_loads_in_stock_transformers_and_the_project(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from bonsai.sources import load_model_and_tokenizer, resolve_model_source

    monkeypatch.setenv("BONSAI_CACHE", str(tmp_path / "cache"))
    # the families transformers' GGUF loader reads back completely: it takes Qwen3's head_dim as its default (128,
    # not the tiny model's 8), knows nothing of Gemma-3's per-layer attention pattern, and turns a file whose name
    # says "mistral" into an architecture gguf-py does not map (Mistral is written as llama.cpp's Llama)
    for family in ("llama", "qwen2"):
        d = tmp_path / family
        model = tiny_model(family)
        model.save_pretrained(d)
        tiny_tokenizer().save_pretrained(d)
        f = export_gguf(d, tmp_path / f"{family}.gguf", quant="f32")
        stock = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f.name, dtype=torch.float32).eval()
        ours, _ = load_model_and_tokenizer(resolve_model_source(str(f)))
        assert torch.equal(_logits(ours), _logits(stock)), family
        assert (_logits(stock) - _logits(model)).abs().max().item() <= 1e-5, family
        assert (_logits(read_gguf(f)) - _logits(model)).abs().max().item() <= 1e-5, family


def test_bad_inputs_are_one_line_errors_and_leave_no_file(tmp_path):
    model = tiny_model("llama")
    ckpt = _pruned(model, tmp_path, "p")
    with pytest.raises(BonsaiError, match="unknown quantisation"):
        export_gguf(ckpt, tmp_path / "x.gguf", quant="q3_zz")
    with pytest.raises(BonsaiError, match="not a model directory"):
        export_gguf(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(BonsaiError, match="is a directory"):
        export_gguf(ckpt, tmp_path)
    with pytest.raises(BonsaiError, match="not a writable directory"):
        export_gguf(ckpt, tmp_path / "missing" / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


def test_cli_export_and_its_one_line_errors(tmp_path, capsys):
    from bonsai.cli import main

    ckpt = _pruned(tiny_model("qwen2"), tmp_path, "p")
    assert main(["export", "--model", str(ckpt), "--out", str(tmp_path / "p.gguf"), "--quant", "q8_0"]) == 0
    assert "wrote " in capsys.readouterr().out
    assert (_logits(read_gguf(tmp_path / "p.gguf")) - _logits(load_pruned_model(ckpt))).abs().max().item() < 0.05
    capsys.readouterr()
    assert main(["export", "--model", str(ckpt), "--out", str(tmp_path / "q.gguf"), "--quant", "q3_zz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bonsai: error: unknown quantisation") and "\n" not in err
    assert not (tmp_path / "q.gguf").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_project_loader_reads_its_own_dense_export_exactly(family, tmp_path, monkeypatch):
    """Conformance (a), GGUF: the project's loader rebuilds every family from the config the export embeds, so a
    dense tiny model comes back with its own logits even where transformers' GGUF loader would not."""
    from bonsai.sources import load_model_and_tokenizer, resolve_model_source

    monkeypatch.setenv("BONSAI_CACHE", str(tmp_path / "cache"))
    model = tiny_model(family)
    model.save_pretrained(tmp_path / family)
    tiny_tokenizer().save_pretrained(tmp_path / family)
    f = export_gguf(tmp_path / family, tmp_path / f"{family}.gguf", quant="f32")
    ours, tokenizer = load_model_and_tokenizer(resolve_model_source(str(f)))
    assert tokenizer is not None
    assert (_logits(ours) - _logits(model)).abs().max().item() <= 1e-5 * _logits(model).abs().max().item()
