"""Post-pruning adaptation (LoRA + distillation, merged) on the real tiny model stories260K, through the CLI and
the library (skipped without ../shared)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import bonsai.adapt as adapt_module
from bonsai.adapt import (
    ADAPTER_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    AdaptConfig,
    attach_lora,
    batch_indices,
    check_adaptable,
    distillation_loss,
    latest_state,
    load_state,
    train_adapter,
)
from bonsai.checkpoint import RECORD_FILE, load_for_pruning, read_record, sha256_file
from bonsai.cli import main
from bonsai.data import load_windows
from bonsai.errors import BonsaiError

pytestmark = pytest.mark.usefixtures("prefect_harness")

# Loads the merged checkpoint as a user of plain transformers would (the project cannot be imported) and writes
# its logits for the given token ids.
FRESH_LOGITS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("bonsai", "flows", "tasks"):
            raise ImportError(f"the project module {name} must not be needed to load a checkpoint")
sys.meta_path.insert(0, Block())
sys.path = [p for p in sys.path if p not in ("", ".")]
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(input_ids=load_file(sys.argv[2])["ids"], use_cache=False).logits
save_file({"logits": logits.contiguous()}, sys.argv[3])
"""
# the knobs of the CLI run: few steps on short windows; lr 1e-3 so that 8 steps move the tiny model clearly
ADAPT_ARGS = (
    "--steps 8 --save-every 4 --seq-len 64 --batch-size 4 --windows 16 --lr 1e-3 --rank 16 --alpha 64 --eval-windows 8"
).split()


@pytest.fixture(scope="module")
def pruned(stories_dir, tmp_path_factory, prefect_harness) -> Path:
    out = tmp_path_factory.mktemp("adapt") / "pruned"
    args = ["prune", "--model", str(stories_dir), "--out", str(out),
            *"--sparsity 0.5 --seed 0 --n-samples 16 --heldout-windows 0".split()]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def adapted(pruned) -> Path:
    out = pruned.parent / "adapted"
    assert main(["adapt", "--pruned", str(pruned), "--out", str(out), *ADAPT_ARGS]) == 0
    return out


def _cfg(record: dict) -> AdaptConfig:
    return AdaptConfig(**record["adaptation"]["config"])


def _train_windows(adapted: Path) -> np.ndarray:
    return load_windows(next((adapted.parent / "adapted.work" / "windows").glob("calibration-*.parquet")))[0]


def _objective(student, teacher, windows: np.ndarray, kl_weight: float) -> float:
    ids = torch.from_numpy(windows)
    with torch.no_grad():
        return distillation_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits, ids, kl_weight)[0].item()


def test_adaptation_reduces_training_loss(adapted, pruned, stories_dir):
    a = read_record(adapted)["adaptation"]
    assert a["steps"] == 8 and a["resumed_from"] == 0 and len(a["losses"]) == 8
    assert a["loss_end"] < a["loss_start"]
    assert a["eval"]["ppl_after"] < a["eval"]["ppl_before"]  # held-out text (teacher samples, its own seed)
    # the objective on all training windows, same batch for both models: lower after the 8 steps
    teacher = load_for_pruning(stories_dir)[0]
    windows = _train_windows(adapted)
    before = _objective(load_for_pruning(pruned)[0], teacher, windows, a["config"]["kl_weight"])
    after = _objective(load_for_pruning(adapted)[0], teacher, windows, a["config"]["kl_weight"])
    assert after < before


def test_merged_model_loads_fresh_and_equals_adapter_model(adapted, pruned, tmp_path):
    record, source = read_record(adapted), read_record(pruned)
    assert record["weights_sha256"] == sha256_file(adapted / "model.safetensors") != source["weights_sha256"]
    assert record["layer_shapes"] == source["layer_shapes"] and record["kept_units"] == source["kept_units"]
    assert record["adaptation"]["pruned_weights_sha256"] == source["weights_sha256"]
    # the adapter model: the pruned weights + the adapters of the last training state, unmerged
    student = attach_lora(load_for_pruning(pruned)[0], _cfg(record))
    state = latest_state(next((adapted.parent / "adapted.work").glob("train-*")))
    assert state.name.endswith("00000008")
    load_state(state, student)
    ids = torch.from_numpy(_train_windows(adapted)[:4])
    with torch.no_grad():
        expected = student.eval()(input_ids=ids, use_cache=False).logits
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    res = subprocess.run(
        [sys.executable, "-c", FRESH_LOGITS, str(adapted), str(tmp_path / "ids.safetensors"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    got = load_file(tmp_path / "o")["logits"]
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_cli_resume_continues_at_saved_step(adapted, pruned, capsys):
    """More steps on the same work directory: training continues at step 8 (the saved state), not from 0."""
    out = adapted.parent / "adapted-12"
    args = [
        "adapt",
        "--pruned",
        str(pruned),
        "--out",
        str(out),
        *ADAPT_ARGS,
        "--steps",
        "12",
        "--work-dir",
        str(adapted.parent / "adapted.work"),
    ]
    assert main(args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    a = read_record(out)["adaptation"]
    assert a["resumed_from"] == 8 and a["steps"] == 12 and len(a["losses"]) == 12
    assert a["losses"][:8] == read_record(adapted)["adaptation"]["losses"]
    assert a["eval"]["ppl_before"] == read_record(adapted)["adaptation"]["eval"]["ppl_before"]


def _trainer(pruned, teacher, windows, cfg):
    """Train fresh adapters on the pruned model into (or on from) a state directory."""

    def run(state_dir: Path) -> dict:
        return train_adapter(
            attach_lora(load_for_pruning(pruned)[0], cfg), teacher, windows, cfg, state_dir, progress=False
        )

    return run


def test_interrupted_training_resumes_bitwise(adapted, pruned, stories_dir, tmp_path, monkeypatch):
    """Killed during step 5 of 6 (states every 2 steps): the rerun starts at step 4 and ends with exactly the
    weights and optimizer state of an uninterrupted run."""
    cfg = AdaptConfig(steps=6, save_every=2, rank=8, alpha=32, lr=1e-3, seq_len=64, batch_size=4, n_windows=16)
    teacher = load_for_pruning(stories_dir)[0]
    windows = _train_windows(adapted)
    run = _trainer(pruned, teacher, windows, cfg)

    whole = run(tmp_path / "whole")
    assert whole["resumed_from"] == 0 and whole["step"] == 6

    calls = {"n": 0}
    real_loss = adapt_module.distillation_loss

    def dying_loss(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(adapt_module, "distillation_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed")
    monkeypatch.undo()
    assert latest_state(tmp_path / "killed").name.endswith("00000004")
    resumed = run(tmp_path / "killed")
    assert resumed["resumed_from"] == 4 and resumed["step"] == 6
    assert resumed["losses"] == whole["losses"]
    for name in (ADAPTER_FILE, OPTIMIZER_FILE):
        a, b = load_file(Path(whole["state"]) / name), load_file(Path(resumed["state"]) / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    # a damaged newest state is skipped for the one before it; asking for fewer steps than saved is refused
    (Path(resumed["state"]) / ADAPTER_FILE).write_bytes(b"broken")
    assert latest_state(tmp_path / "killed").name.endswith("00000004")
    with pytest.raises(BonsaiError, match="more than"):
        train_adapter(
            attach_lora(load_for_pruning(pruned)[0], cfg),
            teacher,
            windows,
            AdaptConfig(**{**cfg.to_dict(), "steps": 3}),
            tmp_path / "whole",
            progress=False,
        )


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    path.write_bytes(bytes(data))


def test_fault_injection_every_file_of_an_adapt_state(adapted, pruned, stories_dir, tmp_path):
    """Each file of the newest state (adapter, optimizer, state.json) truncated or with one byte flipped: the state
    is skipped for the one before it and training resumes from there to exactly the uninterrupted run's weights."""
    cfg = AdaptConfig(steps=4, save_every=2, rank=8, alpha=32, lr=1e-3, seq_len=64, batch_size=4, n_windows=16)
    run = _trainer(pruned, load_for_pruning(stories_dir)[0], _train_windows(adapted), cfg)

    whole = run(tmp_path / "whole")
    reference = load_file(Path(whole["state"]) / ADAPTER_FILE)
    for name in (ADAPTER_FILE, OPTIMIZER_FILE, STATE_FILE):
        for damage in (_truncate, _flip):
            states = tmp_path / f"{name}-{damage.__name__}"
            shutil.copytree(tmp_path / "whole", states)
            damage(states / Path(whole["state"]).name / name)
            assert latest_state(states).name.endswith("00000002"), (name, damage.__name__)
            resumed = run(states)
            assert resumed["resumed_from"] == 2 and resumed["losses"] == whole["losses"], (name, damage.__name__)
            got = load_file(Path(resumed["state"]) / ADAPTER_FILE)
            assert all(torch.equal(got[k], reference[k]) for k in reference), (name, damage.__name__)


def test_batch_order_is_seeded_and_covers_every_window():
    epoch = np.concatenate([batch_indices(s, 12, 4, seed=3) for s in range(3)])
    assert sorted(epoch.tolist()) == list(range(12))
    assert np.array_equal(batch_indices(5, 12, 4, seed=3), batch_indices(5, 12, 4, seed=3))
    assert not np.array_equal(epoch, np.concatenate([batch_indices(s, 12, 4, seed=4) for s in range(3)]))


@pytest.mark.parametrize(
    "field, value",
    [
        ("steps", 0),
        ("rank", 0),
        ("lr", -1.0),
        ("alpha", float("nan")),
        ("dropout", 1.0),
        ("kl_weight", -0.1),
        ("seq_len", 1),
        ("steps", 2.5),
        ("seed", -1),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(BonsaiError, match=field):
        AdaptConfig(**{field: value}).validate()


def test_cli_bad_inputs(pruned, stories_dir, tmp_path, capsys):
    unstructured = tmp_path / "mosaic"
    shutil.copytree(pruned, unstructured)
    record = json.loads((unstructured / RECORD_FILE).read_text())
    record.update(method="mosaic", summary={**record["summary"], "sparsity_basis": "nonzero"})
    (unstructured / RECORD_FILE).write_text(json.dumps(record))
    out = str(tmp_path / "out")
    cases = {
        "not found": ["--pruned", str(tmp_path / "missing"), "--out", out],
        "not a Bonsai-pruned checkpoint": ["--pruned", str(stories_dir), "--out", out],
        "steps must be an integer >= 1": ["--pruned", str(pruned), "--out", out, "--steps", "0"],
        "lr must be a positive number": ["--pruned", str(pruned), "--out", out, "--lr", "-1"],
        "--eval-windows must be >= 0": ["--pruned", str(pruned), "--out", out, "--eval-windows", "-2"],
        "adaptation would undo them": ["--pruned", str(unstructured), "--out", out],
        "its own output directory": ["--pruned", str(pruned), "--out", str(pruned)],
    }
    for message, args in cases.items():
        assert main(["adapt", *args]) == 2, message
        err = capsys.readouterr().err.strip()
        assert err.startswith("bonsai: error: ") and message in err and "\n" not in err, err
    with pytest.raises(BonsaiError, match="unstructured"):
        check_adaptable(unstructured)
    assert not Path(out).exists()
