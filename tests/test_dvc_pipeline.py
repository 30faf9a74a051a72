"""The DVC pipeline (dvc.yaml + flows/stages.py) end to end on stories260K, in a throw-away copy of the repository.

`dvc repro` runs every stage as its own process; they all talk to the session's Prefect test server (the
`prefect_harness` fixture) through PREFECT_API_URL, instead of starting a temporary server each (~15 s apiece).
Skipped without ../shared.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
COPIED = ("flows", "tasks", "bonsai", "dvc.yaml", "params.yaml")
STAGES = ("model", "calibration", "prune", "evaluate", "report", "adapt")

pytestmark = pytest.mark.slow


def _env(root: Path) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": str(root),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(root.parent / "prefect-home"),
        "BONSAI_CACHE": str(root.parent / "bonsai-cache"),
        "DVC_NO_ANALYTICS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    url = PREFECT_API_URL.value()
    if url:
        env["PREFECT_API_URL"] = url
    return env


def _run(root: Path, *args: str, timeout: int = 400) -> str:
    cmd = [sys.executable, "-m", *args] if args[0] == "dvc" else list(args)
    res = subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(args)} failed ({res.returncode}):\n{out[-4000:]}"
    return out


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def _write_params(root: Path, **changes) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        section, name = key.split("__")
        params.setdefault(section, {})[name] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def pipeline(stories_dir, zeroshot_dir, tmp_path_factory, prefect_harness):
    """A repository copy after its first `dvc repro`; returns (root, output of that repro)."""
    lock_existed = (REPO_ROOT / "dvc.lock").exists()
    root = tmp_path_factory.mktemp("dvc") / "repo"
    root.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in COPIED:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=ignore)
        else:
            shutil.copy2(src, root / name)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _run(root, "dvc", "init", "-q")
    shutil.copy2(REPO_ROOT / ".dvcignore", root / ".dvcignore")  # the project's (ignores byte code)
    _run(root, "dvc", "config", "core.analytics", "false")
    _run(root, "dvc", "config", "core.check_update", "false")
    _write_params(
        root,
        model__source=str(stories_dir),
        calibration__n_windows=4,
        calibration__seq_len=32,
        prune__preset="fast",
        prune__sparsity=0.3,
        prune__n_samples=8,
        evaluate__n_windows=4,
        evaluate__seq_len=32,
        evaluate__zeroshot_tasks=["piqa"],
        evaluate__zeroshot_dir=str(zeroshot_dir),
        evaluate__zeroshot_limit=4,
        adapt__steps=2,
        adapt__rank=8,
        adapt__alpha=32,
        adapt__seq_len=32,
        adapt__batch_size=2,
        adapt__n_windows=4,
        adapt__save_every=1,
        adapt__eval_windows=4,
        adapt__eval_seq_len=32,
    )
    out = _run(root, "dvc", "repro")
    yield root, out
    assert (REPO_ROOT / "dvc.lock").exists() == lock_existed, "the test must not touch the repository's dvc.lock"


def test_first_repro_runs_every_stage(pipeline):
    root, out = pipeline
    assert _ran(out) == set(STAGES), out[-3000:]
    assert "Starting temporary server" not in out  # every stage used the session's Prefect server
    # the calibration windows are computed once: the prune flow reuses the calibration stage's file
    assert "reused calibration windows" in out
    record = json.loads((root / "data/pruned/pruning_record.json").read_text())
    assert abs(record["summary"]["sparsity"] - 0.3) <= 0.005
    assert record["calibration"]["windows_sha256"] == json.loads(
        (root / "data/calibration/windows.json").read_text()
    )["sha256"]
    assert (root / "data/calibration/windows.parquet").is_file()
    assert any((root / "data/work").glob("round_*/checkpoint-*.sha256"))
    metrics = json.loads((root / "data/metrics/eval.json").read_text())
    assert metrics["eval"]["n_windows"] == 4 and metrics["eval"]["seq_len"] == 32
    assert metrics["pruned"]["ppl"] > metrics["dense"]["ppl"] > 1
    assert metrics["pruned"]["kl"] > 0 and 0 < metrics["pruned"]["top1_agreement"] < 1
    assert metrics["pruned"]["non_embedding_params"] == record["summary"]["non_embedding_params_after"]
    report = root / "reports/pipeline"
    assert (report / "ppl_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (report / "rounds.csv").read_text().splitlines()
    assert rows[0].startswith("round,non_embedding_params") and len(rows) == 2 + len(record["rounds"])
    assert "| pruned |" in (report / "report.md").read_text()
    assert 0.0 <= metrics["pruned"]["zeroshot_piqa"] <= 1.0  # zero-shot through lm-eval in the evaluate step
    assert "piqa" in (report / "report.md").read_text()
    adapted = json.loads((root / "data/adapted/pruning_record.json").read_text())
    assert adapted["adaptation"]["steps"] == 2 and adapted["kept_units"] == record["kept_units"]
    adapt_metrics = json.loads((root / "data/metrics/adapt.json").read_text())
    assert adapt_metrics["ppl_before"] == adapted["adaptation"]["eval"]["ppl_before"] > 1
    assert "## Adaptation" in (root / "reports/adapt/report.md").read_text()
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert set(lock["stages"]["evaluate"]["params"]["params.yaml"]) == {
        "evaluate.data", "evaluate.n_windows", "evaluate.seq_len", "evaluate.batch_size",
        "evaluate.zeroshot_tasks", "evaluate.zeroshot_dir", "evaluate.zeroshot_limit",
    }


def test_second_repro_changes_nothing(pipeline):
    root, _ = pipeline
    out = _run(root, "dvc", "repro")
    assert not _ran(out), out
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in out
    assert "Data and pipelines are up to date" in out


def test_metrics_show(pipeline):
    root, _ = pipeline
    out = _run(root, "dvc", "metrics", "show")
    assert "data/metrics/eval.json" in out
    for key in ("dense.ppl", "pruned.ppl", "pruned.kl", "pruned.top1_agreement", "pruned.non_embedding_params"):
        assert key in out, out


def test_evaluation_knob_reruns_evaluate_and_report_only(pipeline):
    """Runs last in this module: it changes the copy's params."""
    root, _ = pipeline
    _write_params(root, evaluate__n_windows=6)
    status = _run(root, "dvc", "status")
    assert "evaluate:" in status and "prune:" not in status and "calibration:" not in status, status
    out = _run(root, "dvc", "repro")
    assert _ran(out) == {"evaluate", "report"}, out[-3000:]
    assert "Stage 'prune' didn't change, skipping" in out
    assert json.loads((root / "data/metrics/eval.json").read_text())["eval"]["n_windows"] == 6
