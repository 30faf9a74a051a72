"""The Prefect deployments: `prefect.yaml` (work pool + worker style) and `deploy/serve.py` (`flow.serve` style).

Static checks need no server. The last tests start a real `prefect server start` on 127.0.0.1 (random free port,
PREFECT_HOME in a temporary directory), deploy `prefect.yaml` to it with `prefect --no-prompt deploy --all`, read
the deployment back, and run it once through a process worker on the tiny model stories260K.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from bonsai.checkpoint import WEIGHTS_FILE, read_record, sha256_file
from bonsai.config import PruneConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO_ROOT / "prefect.yaml"
SERVE_SCRIPT = REPO_ROOT / "deploy" / "serve.py"
DEPLOYMENT = "bonsai-prune-nightly"
FULL_NAME = f"bonsai-prune/{DEPLOYMENT}"
PREFECT = [sys.executable, "-m", "prefect"]


def _deployment_spec() -> dict:
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    matches = [d for d in spec["deployments"] if d["name"] == DEPLOYMENT]
    assert len(matches) == 1, [d["name"] for d in spec["deployments"]]
    return matches[0]


def _load_flow(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    path, func = entrypoint.split(":")
    return load_flow_from_entrypoint(f"{REPO_ROOT / path}:{func}")


def _serve_module():
    spec = importlib.util.spec_from_file_location("bonsai_deploy_serve", SERVE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prefect_yaml_deployment_is_valid():
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    dep = _deployment_spec()
    flow = _load_flow(dep["entrypoint"])
    assert flow.name == "bonsai-prune"
    params = flow.validate_parameters(dep["parameters"])  # the JSON object becomes a PruneConfig
    cfg = params["config"]
    assert isinstance(cfg, PruneConfig)
    from bonsai.config import PRESETS

    assert cfg.validate().n_samples == PRESETS["fast"]["n_samples"]
    # a deployment that names only the preset runs the preset's knobs (not the dataclass defaults)
    paper = flow.validate_parameters({**dep["parameters"], "config": {**dep["parameters"]["config"],
                                                                      "preset": "paper"}})["config"].validate()
    assert (paper.n_samples, paper.regression, paper.p_iter) == (200, "lasso_cv", 0.05)
    assert (cfg.model, cfg.sparsity, cfg.preset) == ("smollm2-135m", 0.5, "fast")
    assert params["out"] == "data/scheduled/pruned" and not Path(params["out"]).is_absolute()
    assert params["overwrite"] is True  # a nightly schedule must be able to replace last night's output

    from prefect.client.schemas.schedules import CronSchedule

    (schedule,) = dep["schedules"]
    assert CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone")).cron == "0 2 * * *"
    assert dep["work_pool"]["name"] == "bonsai-local"

    # the pull step's directory comes from a deploy-time build step, never from a committed absolute path
    (build,) = spec["build"]
    (pull,) = spec["pull"]
    step_id = build["prefect.deployments.steps.set_working_directory"]["id"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == f"{{{{ {step_id}.directory }}}}"
    assert not re.search(r"(^|\s)/(home|root|work|tmp|Users)/", PREFECT_YAML.read_text())


def test_bad_parameters_are_rejected_by_the_flow_schema():
    from prefect.exceptions import ParameterTypeError

    flow = _load_flow(_deployment_spec()["entrypoint"])
    with pytest.raises(ParameterTypeError, match="config.sparsity"):
        flow.validate_parameters({"config": {"sparsity": "half"}, "out": "o"})
    with pytest.raises(ParameterTypeError, match="config.bogus"):
        flow.validate_parameters({"config": {"bogus": 1}, "out": "o"})


def test_serve_script_builds_the_same_deployment():
    serve = _serve_module()
    deployment = serve.build_deployment()
    assert deployment.name == serve.NAME != DEPLOYMENT  # never overwrites the prefect.yaml deployment
    assert deployment.entrypoint.endswith("flows/prune.py:prune_flow")
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == serve.CRON == _deployment_spec()["schedules"][0]["cron"]
    assert deployment.parameters == _deployment_spec()["parameters"]
    params = _load_flow(_deployment_spec()["entrypoint"]).validate_parameters(deployment.parameters)
    assert isinstance(params["config"], PruneConfig)
    assert serve.build_deployment(out="elsewhere").parameters["out"] == "elsewhere"


def test_served_flow_validates_parameters_after_pickling():
    """`flow.serve` runs each flow run from a cloudpickled copy of the flow (function pickled by value): its
    annotations must still resolve `PruneConfig` (they did not while flows/prune.py postponed annotations)."""
    import cloudpickle

    from flows.prune import prune_flow

    copy = pickle.loads(cloudpickle.dumps(prune_flow))
    params = copy.validate_parameters(_serve_module().PARAMETERS)
    assert isinstance(params["config"], PruneConfig) and params["config"].sparsity == 0.5


# ------------------------------------------------------------------------------------------------------------
# Against a real Prefect server
# ------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free local port with its own PREFECT_HOME; yields the CLI environment."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen([*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("prefect server did not become healthy:\n" + (home / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield env
    finally:
        _stop(server)
        log.close()


def _prefect(env, *args, cwd=REPO_ROOT, timeout=180) -> str:
    res = subprocess.run([*PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"prefect {' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def deployed(prefect_server) -> dict:
    """Work pool + `prefect --no-prompt deploy --all` from the repository root, as docs/operations.md says."""
    env = prefect_server
    _prefect(env, "work-pool", "create", "bonsai-local", "--type", "process")
    before = PREFECT_YAML.read_bytes()
    out = _prefect(env, "--no-prompt", "deploy", "--all")
    assert f"Deployment '{FULL_NAME}' successfully created" in " ".join(out.split())
    assert PREFECT_YAML.read_bytes() == before  # deploying never rewrites the committed file
    return json.loads(_prefect(env, "deployment", "inspect", FULL_NAME, "--output", "json"))


def test_deploy_registers_cron_schedule_parameters_and_pull_step(prefect_server, deployed):
    (schedule,) = deployed["schedules"]
    assert schedule["active"] and schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == "UTC"
    assert deployed["work_pool_name"] == "bonsai-local"
    assert deployed["entrypoint"] == "flows/prune.py:prune_flow"
    assert deployed["parameters"] == _deployment_spec()["parameters"]
    assert deployed["parameter_openapi_schema"]["properties"]["config"]["$ref"] == "#/definitions/PruneConfig"
    (pull,) = deployed["pull_steps"]
    assert Path(pull["prefect.deployments.steps.set_working_directory"]["directory"]) == REPO_ROOT
    # the server's scheduler has already planned upcoming nightly runs at 02:00 UTC
    deadline = time.monotonic() + 60
    while True:
        runs = json.loads(_prefect(prefect_server, "flow-run", "ls", "--state", "SCHEDULED", "--output", "json"))
        runs = [r for r in runs if r["deployment_id"] == deployed["id"]]
        if runs or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert runs, "no scheduled runs were created for the cron schedule"
    assert all(re.search(r"T02:00:00(\.0+)?(Z|\+00:00)$", r["expected_start_time"]) for r in runs), runs


def test_deployment_runs_through_a_process_worker(prefect_server, deployed, stories_dir, tmp_path):
    """One run of the deployed flow with overridden parameters, picked up by `prefect worker start --run-once`."""
    env = prefect_server
    # pausing the schedule deletes the planned 02:00 runs: only our run may be picked up by the worker below
    _prefect(env, "deployment", "schedule", "pause", FULL_NAME, deployed["schedules"][0]["id"])
    out = tmp_path / "pruned"
    params = {
        "config": {"model": str(stories_dir), "sparsity": 0.2, "n_samples": 8, "shard_size": 4,
                   "calib_windows": 4, "calib_seq_len": 32},
        "out": str(out),
    }

    created = _prefect(env, "deployment", "run", FULL_NAME, "--params", json.dumps(params))
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", created).group(1)
    worker = _prefect(env, "worker", "start", "--pool", "bonsai-local", "--run-once", cwd=tmp_path, timeout=300)
    run = json.loads(_prefect(env, "flow-run", "inspect", run_id, "--output", "json"))
    assert run["state_type"] == "COMPLETED", worker[-3000:]
    assert run["parameters"]["config"]["n_samples"] == 8 and run["parameters"]["overwrite"] is True  # merged
    assert "round 0: 0 of 2 shards reused" in _prefect(env, "flow-run", "logs", run_id)  # logs reach the API
    record = read_record(out)
    assert abs(record["summary"]["sparsity"] - 0.2) <= 0.005
    assert record["config"]["n_samples"] == 8 and record["config"]["preset"] == "fast"
    assert record["weights_sha256"] == sha256_file(out / WEIGHTS_FILE)


def test_preset_sample_windows_fit_the_calibration_windows():
    """`fast` scores sub-models on its first 4 windows; a run with no more windows than that scores on all of
    them instead of failing validation, and an explicit value is still checked."""
    from bonsai.config import PRESETS
    from bonsai.errors import BonsaiError

    k = PRESETS["fast"]["sample_windows"]
    assert 0 < k < PRESETS["fast"]["calib_windows"] and PruneConfig().validate().sample_windows == k
    assert PruneConfig(calib_windows=k).validate().sample_windows == 0
    assert PruneConfig(calib_windows=2).validate().sample_windows == 0
    assert PruneConfig(calib_windows=32).validate().sample_windows == k
    with pytest.raises(BonsaiError, match="sample_windows must be in"):
        PruneConfig(calib_windows=2, sample_windows=3).validate()
