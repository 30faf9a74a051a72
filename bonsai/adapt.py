"""Post-pruning adaptation: LoRA on every linear projection, distilled from the dense model, merged back.

The pruned student gets LoRA adapters (``peft``) on each q/k/v/o/gate/up/down projection it still has and is
trained on calibration-corpus windows with ``loss = CE + kl_weight · KL(teacher ‖ student)``, the teacher being
the dense source model whose logits are computed on the fly (under ``no_grad``; caching full-vocabulary logits
would cost ``seq_len × vocab`` floats per window on disk, more than recomputing them). The paper's settings are
the defaults: rank 128, alpha 512, learning rate 1e-4, KL weight 0.01.

Training is deterministic and resumable: the batch of step ``s`` is a pure function of ``(seed, s)``; every
``save_every`` steps (and at the end) the adapter weights, the optimizer state and the torch RNG state are
written as safetensors plus a JSON file, into a directory that is renamed into place only when complete. A
resumed run therefore continues at the saved step and ends bitwise equal to an uninterrupted one. At the end the
adapters are merged into the pruned weights (:func:`merge_adapter`) and saved as a plain pruned checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from bonsai.artifacts import record_artifact, remove_artifact, verified_sha
from bonsai.checkpoint import is_pruned_checkpoint, read_record, write_json_atomic
from bonsai.errors import BonsaiError

# the linear projections of every supported family; the embedding and LM head (often tied) are not adapted
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STATE_PREFIX = "state-"
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
KEEP_STATES = 2  # the newest state plus one before it, in case the newest is found damaged


@dataclass(frozen=True)
class AdaptConfig:
    """Knobs of one adaptation run. `steps` and `save_every` do not change the trajectory (a run with more
    steps continues the same one); every other field does (see :meth:`trajectory`)."""

    steps: int = 100
    rank: int = 128
    alpha: float = 512.0
    lr: float = 1e-4
    kl_weight: float = 0.01
    seq_len: int = 256
    batch_size: int = 4
    n_windows: int = 128  # distinct training windows drawn from the text; steps cycle through them
    save_every: int = 25
    seed: int = 0
    dropout: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping

    def validate(self) -> AdaptConfig:
        """Self, checked; a bad value raises a one-line BonsaiError."""
        ints = {"steps": 1, "rank": 1, "seq_len": 2, "batch_size": 1, "n_windows": 1, "save_every": 1, "seed": 0}
        for name, least in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
                raise BonsaiError(f"adapt {name} must be an integer >= {least}, got {value!r}")
        for name in ("alpha", "lr"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise BonsaiError(f"adapt {name} must be a positive number, got {value!r}")
        for name in ("kl_weight", "max_grad_norm"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise BonsaiError(f"adapt {name} must be a number >= 0, got {value!r}")
        if not _finite(self.dropout) or not 0 <= self.dropout < 1:
            raise BonsaiError(f"adapt dropout must be in [0, 1), got {self.dropout!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def trajectory(self) -> dict[str, Any]:
        """The fields that determine the weights after step s (for naming a run's state directory)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("steps", "save_every")}


def _finite(value: Any) -> bool:
    return (
        isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


# ------------------------------------------------------------------------------------------------ checks


def check_adaptable(pruned: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """The pruning record of a checkpoint that can be adapted (into `out`); a BonsaiError says why one cannot."""
    path = Path(pruned)
    if out is not None and Path(out).resolve() == path.resolve():
        raise BonsaiError("the adapted model needs its own output directory, not the pruned model's")
    if not path.is_dir():
        raise BonsaiError(f"pruned model directory not found: {pruned}")
    if not is_pruned_checkpoint(path):
        raise BonsaiError(f"{pruned} is not a Bonsai-pruned checkpoint (no bonsai_layers in config.json)")
    record = read_record(path)
    if (record.get("summary") or {}).get("sparsity_basis") == "nonzero":
        # merged LoRA updates are dense: they would fill the zeros an unstructured method left in the weights
        raise BonsaiError(
            f"{pruned} was pruned by {record.get('method')} (unstructured zeros); adaptation would undo them"
        )
    return record


def lora_targets(model: nn.Module) -> list[str]:
    """Full names of the projections to adapt: every q/k/v/o/gate/up/down Linear with no zero dimension (a
    module that lost all its units owns no Linear at all, but a zero-width one cannot carry an adapter)."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS and min(module.weight.shape) > 0
    ]
    if not names:
        raise BonsaiError("the model has no linear projections left to adapt")
    return names


# ------------------------------------------------------------------------------------------------ training


def attach_lora(model: nn.Module, cfg: AdaptConfig) -> nn.Module:
    """`model` wrapped by peft with fresh LoRA adapters on :func:`lora_targets` (initialised from `cfg.seed`)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn from the global generator
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=lora_targets(model),
        bias="none",
    )
    with warnings.catch_warnings():
        # peft 0.21 still calls transformers' deprecated `is_gradient_checkpointing`; nothing for a user to act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def merge_adapter(peft_model: nn.Module) -> nn.Module:
    """The plain model with every adapter folded into its base weights (peft's merge_and_unload)."""
    return peft_model.merge_and_unload().eval()


def batch_indices(step: int, n_windows: int, batch_size: int, seed: int) -> np.ndarray:
    """Window indices of the batch of (0-based) `step`: consecutive slices of one seeded permutation of the
    windows per epoch. A pure function of its arguments, so a resumed run draws the same batches."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    perms: dict[int, np.ndarray] = {}
    out = np.empty(batch_size, dtype=np.int64)
    for j, pos in enumerate(positions):
        epoch, i = divmod(pos, n_windows)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n_windows)
        out[j] = perms[epoch][i]
    return out


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor, kl_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kl) over next-token positions: `ce` the mean cross-entropy of the student, `kl` the mean over
    positions of KL(teacher ‖ student), `loss = ce + kl_weight · kl`."""
    vocab = student_logits.shape[-1]
    s = student_logits[:, :-1].reshape(-1, vocab).float()
    t = teacher_logits[:, :-1].reshape(-1, vocab).float()
    ce = F.cross_entropy(s, ids[:, 1:].reshape(-1))
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")
    return ce + kl_weight * kl, ce, kl


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def train_adapter(
    student: nn.Module,
    teacher: nn.Module,
    windows: np.ndarray,
    cfg: AdaptConfig,
    state_dir: str | Path,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the LoRA adapters of `student` (from :func:`attach_lora`) for `cfg.steps` steps in total.

    Resumes from the newest intact state under `state_dir` (a state saved after more steps than `cfg.steps` is
    an error). Returns ``resumed_from`` (the step training started at), ``step``, ``state`` (the directory of
    the final state) and ``losses`` (per step: ``loss``, ``ce``, ``kl``, from step 1 on).
    """
    cfg = cfg.validate()
    ids_all = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
    if ids_all.ndim != 2 or ids_all.shape[1] != cfg.seq_len or ids_all.shape[0] < 1:
        raise BonsaiError(f"training windows must have shape (n, {cfg.seq_len}), got {tuple(ids_all.shape)}")
    state_dir = Path(state_dir)
    params = _trainable(student)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=cfg.lr, weight_decay=0.0)
    torch.manual_seed(cfg.seed)  # LoRA dropout draws from the global generator; saved and restored per state
    step, losses = 0, []
    latest = latest_state(state_dir)
    if latest is not None:
        step, losses = load_state(latest, student, optimizer)
        if step > cfg.steps:
            raise BonsaiError(f"{state_dir} already holds {step} adaptation steps, more than the {cfg.steps} asked for")
    resumed_from = step
    teacher.eval()
    student.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="adapt", unit="step", file=sys.stderr, disable=not progress)
    saved = latest if latest is not None and step == cfg.steps else None
    try:
        while step < cfg.steps:
            batch = ids_all[torch.from_numpy(batch_indices(step, len(ids_all), cfg.batch_size, cfg.seed))]
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch, use_cache=False).logits
            student_logits = student(input_ids=batch, use_cache=False).logits
            loss, ce, kl = distillation_loss(student_logits, teacher_logits, batch, cfg.kl_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.max_grad_norm)
            optimizer.step()
            step += 1
            losses.append({"loss": loss.item(), "ce": ce.item(), "kl": kl.item()})
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in losses[-1].items()})
            del teacher_logits, student_logits, loss, ce, kl
            if step % cfg.save_every == 0 or step == cfg.steps:
                saved = save_state(state_dir, step, student, optimizer, losses)
    finally:
        bar.close()
        student.eval()
    return {"resumed_from": resumed_from, "step": step, "state": str(saved), "losses": losses}


# ------------------------------------------------------------------------------------------------ states


def _state_name(step: int) -> str:
    return f"{STATE_PREFIX}{step:08d}"


def save_state(
    state_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, losses: list[dict]
) -> Path:
    """Write the state after `step` atomically (temp dir, then rename) and prune states older than the last
    KEEP_STATES. Tensors go to safetensors; scalars, the param groups and the loss history to JSON."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    final = state_dir / _state_name(step)
    tmp = state_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    names = [n for n, _ in _trainable(model)]
    save_file({n: p.detach().contiguous() for n, p in _trainable(model)}, tmp / ADAPTER_FILE)
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng": torch.get_rng_state()}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    save_file(tensors, tmp / OPTIMIZER_FILE)
    state = {
        "step": step,
        "param_names": names,
        "param_groups": opt["param_groups"],
        "optimizer_scalars": scalars,
        "losses": losses,
    }
    write_json_atomic(tmp / STATE_FILE, state)
    if final.exists():  # the same step saved by an earlier, identical run: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    record_artifact(final)  # size + hash of every file, state.json included (bonsai/artifacts.py)
    for old in _states(state_dir)[:-KEEP_STATES]:
        remove_artifact(old)
    return final


def _states(state_dir: str | Path) -> list[Path]:
    return sorted(p for p in Path(state_dir).glob(f"{STATE_PREFIX}*") if p.is_dir())


def _intact(path: Path) -> dict[str, Any] | None:
    """The state.json of a complete, undamaged state directory (every file as its sidecar records), else None."""
    if verified_sha(path) is None:
        return None
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def latest_state(state_dir: str | Path) -> Path | None:
    """The newest intact state under `state_dir` (a damaged one is skipped for the one before it)."""
    for path in reversed(_states(state_dir)):
        if _intact(path) is not None:
            return path
    return None


def load_state(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[int, list[dict]]:
    """Put a saved state's adapter weights into `model` (and its optimizer and RNG state into `optimizer` and
    torch); returns (step, loss history). Only safetensors and JSON are read, never pickles."""
    path = Path(path)
    state = _intact(path)
    if state is None:
        raise BonsaiError(f"adaptation state {path} is incomplete or damaged")
    params = _trainable(model)
    if [n for n, _ in params] != state["param_names"]:
        raise BonsaiError(f"adaptation state {path} belongs to adapters of another shape or target set")
    weights = load_file(path / ADAPTER_FILE)
    with torch.no_grad():
        for name, p in params:
            p.copy_(weights[name])
    if optimizer is not None:
        tensors = load_file(path / OPTIMIZER_FILE)
        torch.set_rng_state(tensors.pop("rng"))
        entries: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            idx, name = key.split(".", 1)
            entries.setdefault(int(idx), {})[name] = value
        for idx, values in state["optimizer_scalars"].items():
            entries.setdefault(int(idx), {}).update(values)
        optimizer.load_state_dict({"state": entries, "param_groups": state["param_groups"]})
    return int(state["step"]), list(state["losses"])


def loss_summary(losses: list[dict]) -> dict[str, Any]:
    """Start and end of the training loss: means over the first and the last `window` steps (single steps are
    noisy: each sees a different batch), plus the whole per-step curve."""
    if not losses:
        return {}
    window = max(1, min(10, len(losses) // 5))
    out: dict[str, Any] = {"loss_window": window}
    for key in ("loss", "ce", "kl"):
        out[f"{key}_start"] = float(np.mean([r[key] for r in losses[:window]]))
        out[f"{key}_end"] = float(np.mean([r[key] for r in losses[-window:]]))
    out["losses"] = [r["loss"] for r in losses]
    return out
