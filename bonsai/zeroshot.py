"""Zero-shot accuracy of a (pruned) causal LM, with EleutherAI's lm-evaluation-harness as the engine.

Seven multiple-choice tasks, as in the Bonsai paper: boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge,
openbookqa. lm-eval does all the scoring (log-likelihood of each choice, ``acc`` and length-normalised
``acc_norm``); this module only chooses the data source and collects the numbers.

Data source:

* ``data_dir=None``: lm-eval's stock tasks, which download their datasets from the Hugging Face hub.
* ``data_dir=<dir>``: offline task configs written by :func:`write_offline_task_configs` into a temporary (or
  given) folder. Each mirrors its stock task — the same ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target``
  prompts, output type and metrics as the YAML of lm-eval 0.4 (``lm_eval/tasks/<name>/``), with the scored split
  (validation, or test for ARC and OpenBookQA) read with ``dataset_path: json`` from local JSON-lines files:

  - ``boolq/validation.jsonl``: ``question``, ``passage``, ``label`` (0 = no, 1 = yes);
  - ``piqa/validation.jsonl``: ``goal``, ``sol1``, ``sol2``, ``label``;
  - ``hellaswag/validation.jsonl``: ``query``, ``choices``, ``label`` — already what the stock ``process_docs``
    makes of the hub rows;
  - ``winogrande/validation.jsonl``: ``context_options``, ``continuation``, ``gold`` — the partial-scoring form
    the stock task builds with its ``doc_to_choice`` / ``doc_to_target`` / ``doc_to_text`` functions;
  - ``arc_easy/test.jsonl``, ``arc_challenge/test.jsonl``: ``question``, ``choices.text/label``, ``answerKey``;
  - ``openbookqa/test.jsonl``: ``question_stem``, ``choices.text/label``, ``answerKey``.

  Offline task names are ``bonsai_<stock name>`` (:data:`OFFLINE_NAMES`) so they never clash with stock tasks;
  results are reported under the stock names.

Headline metric per task (:data:`HEADLINE_METRIC`): ``acc_norm`` wherever the stock task reports it (hellaswag,
piqa, arc_easy, arc_challenge, openbookqa), ``acc`` otherwise (boolq, winogrande, whose stock configs have only
``acc``). ``mean`` is the unweighted mean of the headline metric over the tasks run.

``limit`` makes lm-eval score the first ``limit`` documents of each task's split (not a random sample); say so
wherever such numbers are reported.
"""

from __future__ import annotations

import copy
import os
import tempfile
from importlib.metadata import version as _pkg_version
from pathlib import Path
from typing import Any

import yaml

from bonsai.errors import BonsaiError

__all__ = [
    "HEADLINE_METRIC",
    "OFFLINE_NAMES",
    "ZEROSHOT_TASKS",
    "lm_eval_version",
    "offline_task_config",
    "run_zeroshot",
    "run_zeroshot_path",
    "write_offline_task_configs",
]

ZEROSHOT_TASKS: tuple[str, ...] = (
    "boolq",
    "piqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)
OFFLINE_NAMES: dict[str, str] = {name: f"bonsai_{name}" for name in ZEROSHOT_TASKS}
_STOCK_OF = {v: k for k, v in OFFLINE_NAMES.items()}

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
_ARC = {
    "split": ("test", "test.jsonl"),
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
    "metrics": [_ACC, _ACC_NORM],
    "version": 1.0,
}

# What each stock task (lm-eval 0.4.x YAML) asks for, restated for the local files. The split is the one lm-eval
# scores (test when the stock config has a test split, else validation).
_SPECS: dict[str, dict[str, Any]] = {
    # lm_eval/tasks/super_glue/boolq/default.yaml
    "boolq": {
        "split": ("validation", "validation.jsonl"),
        "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": ["no", "yes"],
        "metrics": [_ACC],
        "version": 2.0,
    },
    # lm_eval/tasks/piqa/piqa.yaml
    "piqa": {
        "split": ("validation", "validation.jsonl"),
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}",
        "metrics": [_ACC, _ACC_NORM],
        "version": 1.0,
    },
    # lm_eval/tasks/hellaswag/hellaswag.yaml; the stock process_docs (utils.process_docs) output is what the local
    # file holds (query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), choices), so
    # there is no process_docs here.
    "hellaswag": {
        "split": ("validation", "validation.jsonl"),
        "doc_to_text": "{{query}}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": "choices",
        "metrics": [_ACC, _ACC_NORM],
        "version": 1.0,
    },
    # lm_eval/tasks/winogrande/default.yaml + preprocess_winogrande.py: the choices are the two contexts
    # sentence[:blank] + option (doc_to_choice), the scored continuation is the text after the blank
    # (doc_to_target) and doc_to_text returns the gold option's index (an int, i.e. "multiple inputs"). The local
    # file stores exactly those: context_options, continuation, gold.
    "winogrande": {
        "split": ("validation", "validation.jsonl"),
        "doc_to_text": "gold",
        "doc_to_target": "continuation",
        "doc_to_choice": "context_options",
        "metrics": [_ACC],
        "version": 1.0,
    },
    # lm_eval/tasks/arc/arc_easy.yaml, arc_challenge.yaml
    "arc_easy": _ARC,
    "arc_challenge": _ARC,
    # lm_eval/tasks/openbookqa/openbookqa.yaml
    "openbookqa": {
        "split": ("test", "test.jsonl"),
        "doc_to_text": "question_stem",
        "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
        "doc_to_choice": "{{choices.text}}",
        "metrics": [_ACC, _ACC_NORM],
        "version": 1.0,
    },
}

HEADLINE_METRIC: dict[str, str] = {
    name: ("acc_norm" if any(m["metric"] == "acc_norm" for m in spec["metrics"]) else "acc")
    for name, spec in _SPECS.items()
}


def lm_eval_version() -> str:
    try:
        return _pkg_version("lm_eval")
    except Exception:  # not installed under that distribution name
        import lm_eval

        return getattr(lm_eval, "__version__", "unknown")


def _check_tasks(tasks: list[str] | tuple[str, ...] | None) -> list[str]:
    if tasks is None:
        return list(ZEROSHOT_TASKS)
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks:
        raise BonsaiError("no zero-shot tasks given")
    unknown = [t for t in tasks if t not in _SPECS]
    if unknown:
        raise BonsaiError(f"unknown zero-shot task(s) {unknown}; supported: {', '.join(ZEROSHOT_TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise BonsaiError(f"zero-shot tasks listed twice: {tasks}")
    return tasks


def _data_file(data_dir: Path, name: str) -> Path:
    split, file = _SPECS[name]["split"]
    path = Path(data_dir) / name / file
    if not path.is_file():
        raise BonsaiError(f"zero-shot data for {name} not found: expected {path}")
    return path.resolve()


def offline_task_config(name: str, data_dir: Path) -> dict[str, Any]:
    """The lm-eval task config (a dict, as its YAML would hold) of stock task ``name`` reading ``data_dir``."""
    if name not in _SPECS:
        raise BonsaiError(f"unknown zero-shot task {name!r}; supported: {', '.join(ZEROSHOT_TASKS)}")
    spec = _SPECS[name]
    split, _ = spec["split"]
    return {
        "task": OFFLINE_NAMES[name],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(_data_file(data_dir, name))}},
        "output_type": "multiple_choice",
        f"{split}_split": split,
        "doc_to_text": spec["doc_to_text"],
        "doc_to_target": spec["doc_to_target"],
        "doc_to_choice": copy.deepcopy(spec["doc_to_choice"]),
        "metric_list": copy.deepcopy(spec["metrics"]),
        "metadata": {"version": spec["version"], "stock_task": name},
    }


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_offline_task_configs(
    data_dir: Path, out_dir: Path, tasks: list[str] | tuple[str, ...] | None = None
) -> list[str]:
    """Write one lm-eval task YAML per task (default: all seven) into ``out_dir``, reading ``data_dir``.

    Returns the offline task names (``bonsai_<stock name>``, in the order of ``tasks``); point
    ``TaskManager(include_path=out_dir)`` at the folder to load them. The YAMLs hold absolute paths to the data
    files, so they belong to this machine: regenerate rather than copy them.
    """
    tasks = _check_tasks(tasks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for name in tasks:
        cfg = offline_task_config(name, Path(data_dir))
        text = (
            f"# Offline mirror of lm-eval's stock task '{name}' (written by bonsai.zeroshot; lm-eval "
            f"{lm_eval_version()}).\n" + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=1000)
        )
        _write_text_atomic(out_dir / f"{cfg['task']}.yaml", text)
        names.append(cfg["task"])
    return names


def _collect(results: dict[str, Any], tasks: list[str], offline: bool, limit: int | None) -> dict[str, Any]:
    per_task: dict[str, Any] = {}
    for name in tasks:
        key = OFFLINE_NAMES[name] if offline else name
        if key not in results["results"]:
            raise BonsaiError(f"lm-eval returned no result for task {key}")
        r = results["results"][key]

        def metric(m: str, r: dict[str, Any] = r) -> float | None:
            v = r.get(f"{m},none")
            return None if v is None or v == "N/A" else float(v)

        head = HEADLINE_METRIC[name]
        value = metric(head)
        if value is None:
            raise BonsaiError(f"lm-eval reported no {head} for task {key}")
        n = results.get("n-samples", {}).get(key, {})
        per_task[name] = {
            "metric": head,
            "value": value,
            "acc": metric("acc"),
            "acc_norm": metric("acc_norm"),
            "acc_stderr": metric("acc_stderr"),
            "acc_norm_stderr": metric("acc_norm_stderr"),
            "n": n.get("effective"),
            "n_total": n.get("original"),
            "lm_eval_task": key,
            "task_version": results.get("versions", {}).get(key),
        }
    return {
        "lm_eval_version": lm_eval_version(),
        "limit": limit,
        "source": "offline" if offline else "hub",
        "tasks": per_task,
        "mean": sum(t["value"] for t in per_task.values()) / len(per_task),
    }


def _evaluate(lm, tasks: list[str], data_dir: Path | None, limit: int | None, seed: int,
              config_dir: Path | None) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = _check_tasks(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise BonsaiError(f"limit must be a positive integer or None, got {limit!r}")
    with tempfile.TemporaryDirectory(prefix="bonsai-zeroshot-") as tmp:
        if data_dir is not None:
            cfg_dir = Path(config_dir) if config_dir is not None else Path(tmp)
            names = write_offline_task_configs(Path(data_dir), cfg_dir, tasks)
            manager = TaskManager(include_path=str(cfg_dir), include_defaults=False)
        else:
            names = list(tasks)
            manager = TaskManager()
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=0,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    if results is None:  # only non-zero ranks of a distributed launch get None
        raise BonsaiError("lm-eval returned no results (not rank 0?)")
    out = _collect(results, tasks, data_dir is not None, limit)
    model = lm.model
    out["model"] = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "params": sum(p.numel() for p in model.parameters()),
        "device": str(lm.device),
    }
    return out


def run_zeroshot(
    model,
    tokenizer,
    tasks: list[str] | tuple[str, ...] = ZEROSHOT_TASKS,
    *,
    data_dir: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    config_dir: Path | None = None,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of an already-loaded ``model`` (any ``PreTrainedModel``, pruned ones included — no
    remote code is involved) with lm-eval's ``HFLM`` wrapper, on its current device.

    ``tasks``: stock names from :data:`ZEROSHOT_TASKS`. ``data_dir``: local task files (module docstring); None
    uses the stock tasks from the hub. ``limit``: first N documents per task. ``config_dir``: keep the generated
    offline YAMLs there (default: a temporary folder). ``max_length``: lm-eval's context length (default: the
    model's ``max_position_embeddings``; longer prompts are truncated from the left by lm-eval).

    Returns ``{"lm_eval_version", "limit", "source", "model": {"class", "params", "device"}, "tasks":
    {stock_name: {"metric", "value", "acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n", "n_total",
    "lm_eval_task", "task_version"}}, "mean"}`` (``acc_norm`` is None where the task has no such metric).
    ``metric``/``value`` is the headline metric: ``acc_norm`` where the stock task reports it (hellaswag, piqa,
    arc_easy, arc_challenge, openbookqa), ``acc`` otherwise (boolq, winogrande); ``mean`` averages ``value``.
    """
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:
        raise BonsaiError("run_zeroshot needs the model's tokenizer")
    lm = HFLM(
        pretrained=model,
        tokenizer=copy.deepcopy(tokenizer),  # lm-eval may set a pad token on it
        batch_size=batch_size,
        max_length=max_length,
    )
    return _evaluate(lm, list(tasks), data_dir, limit, seed, config_dir)


def run_zeroshot_path(
    model_dir: str | Path,
    tasks: list[str] | tuple[str, ...] = ZEROSHOT_TASKS,
    *,
    data_dir: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    config_dir: Path | None = None,
    max_length: int | None = None,
) -> dict[str, Any]:
    """As :func:`run_zeroshot`, but lm-eval loads the model itself from ``model_dir`` with its own HF loader
    (``HFLM(pretrained=<dir>)``); ``trust_remote_code`` stays off unless the caller asks (inputs are untrusted).
    In a process that has imported :mod:`bonsai.checkpoint`, transformers picks the classes it registered for
    pruned checkpoints, so none of the code shipped in the directory runs; elsewhere a pruned checkpoint needs
    ``trust_remote_code=True`` to run its shipped copy (its ``auto_map``), exactly as a user of lm-eval would
    load it. ``device`` defaults to CUDA when available, else CPU."""
    import torch
    from lm_eval.models.huggingface import HFLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise BonsaiError(f"{model_dir} is not a model directory (no config.json)")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = HFLM(
        pretrained=str(model_dir),
        trust_remote_code=trust_remote_code,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        max_length=max_length,
    )
    return _evaluate(lm, list(tasks), data_dir, limit, seed, config_dir)
