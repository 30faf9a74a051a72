"""Zero-shot accuracy through lm-evaluation-harness, offline from ../shared, on stories260K (dense and pruned)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from bonsai.zeroshot import (  # noqa: E402
    HEADLINE_METRIC,
    OFFLINE_NAMES,
    ZEROSHOT_TASKS,
    run_zeroshot,
    run_zeroshot_path,
    write_offline_task_configs,
)

# Where each stock task's YAML lives in the installed lm_eval package.
STOCK_YAML = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}
LIMIT = 10


def _stock_config(name: str) -> dict:
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(lm_eval.tasks.__file__).parent / STOCK_YAML[name]
    cfg = load_yaml(path, resolve_func=True, recursive=True)
    assert cfg["task"] == name
    return cfg


def _stock_task(name: str, docs: list[dict]):
    """The stock task object (its YAML and Python functions as installed), fed ``docs`` in stock format
    instead of its hub dataset."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    cfg = _stock_config(name)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    splits = {cfg.get(k) for k in ("training_split", "validation_split", "test_split")} - {None}
    # every split the config names holds the docs (only the scored one matters at zero shots)
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({s: datasets.Dataset.from_list(docs) for s in splits})
    return ConfigurableTask(config=cfg)


def _stock_form(name: str, doc: dict) -> dict | None:
    """The local doc in the stock dataset's raw form (None when it cannot be rebuilt exactly)."""
    if name == "hellaswag":  # raw HF fields; the stock process_docs must turn them back into query/choices
        label, _, ctx = doc["query"].partition(": ")
        return {"activity_label": label, "ctx_a": ctx, "ctx_b": "", "endings": doc["choices"],
                "label": str(doc["label"])}
    if name == "winogrande":  # sentence with a blank, two options, answer "1"/"2"
        a, b = doc["context_options"]
        prefix = os.path.commonprefix([a, b])
        if "_" in prefix or doc["continuation"] != doc["continuation"].strip():
            return None
        return {"sentence": f"{prefix}_ {doc['continuation']}", "option1": a[len(prefix):],
                "option2": b[len(prefix):], "answer": doc["answer"]}
    return doc  # the other files keep the hub dataset's fields


def _rendered(task, doc) -> tuple[list[tuple], int]:
    """What lm-eval scores for ``doc``: the (context, continuation) pairs and the gold index."""
    ctx = task.fewshot_context(doc, 0)
    reqs = task.construct_requests(doc, ctx, metadata=(task.config.task, 0, 1))
    pairs = [tuple(r.arguments) for r in reqs]
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        gold = task.doc_to_choice(doc).index(gold)
    return pairs, int(gold)


@pytest.fixture(scope="module")
def offline_tasks(zeroshot_dir, tmp_path_factory):
    from lm_eval.tasks import TaskManager

    cfg_dir = tmp_path_factory.mktemp("zeroshot-configs")
    names = write_offline_task_configs(zeroshot_dir, cfg_dir)
    loaded = TaskManager(include_path=str(cfg_dir), include_defaults=False).load(names)["tasks"]
    return cfg_dir, loaded


@pytest.mark.parametrize("name", ZEROSHOT_TASKS)
def test_offline_task_renders_like_the_stock_task(name, offline_tasks):
    cfg_dir, loaded = offline_tasks
    task = loaded[OFFLINE_NAMES[name]]
    stock_cfg = _stock_config(name)
    # same output type and metrics as the stock YAML
    assert task.config.output_type == stock_cfg["output_type"] == "multiple_choice"
    assert sorted(task._metric_fn_list) == sorted(m["metric"] for m in stock_cfg["metric_list"])
    assert HEADLINE_METRIC[name] == ("acc_norm" if "acc_norm" in task._metric_fn_list else "acc")
    # the same prompt template strings wherever the stock task uses templates on the hub fields
    if name not in ("hellaswag", "winogrande"):
        for key in ("doc_to_text", "doc_to_choice", "doc_to_target"):
            assert getattr(task.config, key) == stock_cfg[key], key
    # what lm-eval would score for real documents equals what the stock task's own functions produce
    docs = [task.eval_docs[i] for i in range(5)]
    stock_docs = [(d, s) for d in docs if (s := _stock_form(name, d)) is not None]
    assert len(stock_docs) >= 3
    stock = _stock_task(name, [s for _, s in stock_docs])
    for i, (doc, _) in enumerate(stock_docs):
        stock_doc = stock.eval_docs[i]  # after the stock process_docs, where there is one
        assert _rendered(task, doc) == _rendered(stock, stock_doc)
    pairs, gold = _rendered(task, docs[0])
    assert len(pairs) >= 2 and 0 <= gold < len(pairs)
    assert all(isinstance(c, str) and isinstance(x, str) and x.startswith(" ") for c, x in pairs)


def test_zeroshot_all_seven_tasks_offline(stories_dir, zeroshot_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    tok = AutoTokenizer.from_pretrained(stories_dir)
    res = run_zeroshot(model, tok, list(ZEROSHOT_TASKS), data_dir=zeroshot_dir, limit=LIMIT, batch_size=16,
                       config_dir=tmp_path / "cfg")
    assert sorted(res["tasks"]) == sorted(ZEROSHOT_TASKS)
    assert res["limit"] == LIMIT and res["source"] == "offline" and res["lm_eval_version"].startswith("0.4")
    for name, r in res["tasks"].items():
        assert r["n"] == LIMIT, name
        assert r["metric"] == HEADLINE_METRIC[name] and r["value"] == r[r["metric"]]
        assert 0.0 <= r["acc"] <= 1.0
        assert (r["acc_norm"] is None) == (name in ("boolq", "winogrande"))
        # accuracies are multiples of 1/LIMIT: lm-eval really scored LIMIT documents
        assert abs(r["value"] * LIMIT - round(r["value"] * LIMIT)) < 1e-9
    assert res["mean"] == pytest.approx(np.mean([r["value"] for r in res["tasks"].values()]))
    assert sorted(p.name for p in (tmp_path / "cfg").iterdir()) == sorted(f"{n}.yaml" for n in OFFLINE_NAMES.values())


def _pruned_checkpoint(stories_dir: Path, out: Path) -> tuple[Path, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bonsai.architectures import total_params
    from bonsai.checkpoint import save_pruned
    from bonsai.shrink import shrink_model
    from bonsai.units import ATTN, full_kept, unit_table

    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    tok = AutoTokenizer.from_pretrained(stories_dir)
    units = unit_table(model)
    remove = np.random.default_rng(0).random(len(units)) < 0.3
    remove[units.index[(units.layer == 2) & (units.kind == ATTN)]] = True  # one layer loses its attention
    kept = shrink_model(model, units, remove, full_kept(model))
    save_pruned(model, tok, out, {"kept_units": kept})
    return out, total_params(model)


def test_pruned_checkpoint_evaluates_through_lm_eval_by_path(stories_dir, zeroshot_dir, tmp_path):
    ckpt, n_params = _pruned_checkpoint(stories_dir, tmp_path / "pruned")
    tasks = ["piqa", "winogrande", "arc_easy"]
    # trust_remote_code stays off: this process registered the pruned classes, so no shipped code runs
    res = run_zeroshot_path(ckpt, tasks, data_dir=zeroshot_dir, limit=8, batch_size=16, device="cpu")
    assert res["model"]["params"] == n_params  # lm-eval loaded the pruned shapes
    assert res["model"]["class"].endswith("BonsaiLlamaForCausalLM")
    assert sorted(res["tasks"]) == sorted(tasks)
    assert all(0.0 <= r["value"] <= 1.0 and r["n"] == 8 for r in res["tasks"].values())

    # A process that never imports this project: lm-eval's own loader runs the model code shipped in the
    # checkpoint (trust_remote_code) and scores an offline task.
    cfg_dir = tmp_path / "cfg"
    write_offline_task_configs(zeroshot_dir, cfg_dir, ["piqa"])
    script = textwrap.dedent(
        f"""
        import json, sys
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        lm = HFLM(pretrained={str(ckpt)!r}, trust_remote_code=True, device="cpu", dtype="float32", batch_size=8)
        tm = TaskManager(include_path={str(cfg_dir)!r}, include_defaults=False)
        out = lm_eval.simple_evaluate(model=lm, tasks=["bonsai_piqa"], limit=4, task_manager=tm, log_samples=False)
        assert "bonsai" not in {{m.split(".")[0] for m in sys.modules}}
        print(json.dumps({{"module": type(lm.model).__module__, "params": sum(p.numel() for p in lm.model.parameters()),
                          "acc": out["results"]["bonsai_piqa"]["acc,none"]}}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["module"].startswith("transformers_modules")  # the checkpoint's own code, not ours
    assert info["params"] == n_params
    assert 0.0 <= info["acc"] <= 1.0


def test_unknown_task_and_missing_data_are_reported(tmp_path):
    from bonsai.errors import BonsaiError

    with pytest.raises(BonsaiError, match="unknown zero-shot task"):
        write_offline_task_configs(tmp_path, tmp_path / "cfg", ["mmlu"])
    with pytest.raises(BonsaiError, match="zero-shot data for piqa not found"):
        write_offline_task_configs(tmp_path, tmp_path / "cfg", ["piqa"])
