"""Evaluation shards on Dask (prefect-dask): `--workers 2` (a local cluster of two single-thread worker processes)
and `--scheduler ADDR` (an existing cluster) give the same prune as the in-process runner, bit for bit.

Real tiny model stories260K (skipped without ../shared), two rounds of 8 sub-models in shards of 2.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bonsai.artifacts import read_table
from bonsai.checkpoint import WEIGHTS_FILE, read_record, sha256_file
from bonsai.cli import main
from bonsai.config import PruneConfig, resolve_config
from bonsai.errors import BonsaiError

KNOBS = ["--sparsity", "0.2", "--seed", "0", "--n-samples", "8", "--shard-size", "2",
         "--calib-windows", "4", "--calib-seq-len", "64", "--heldout-windows", "0"]
pytestmark = pytest.mark.usefixtures("prefect_harness")


def _prune(stories_dir: Path, out: Path, *placement: str) -> Path:
    assert main(["prune", "--model", str(stories_dir), "--out", str(out), *KNOBS, *placement]) == 0
    return out


def _rounds(out: Path) -> list[Path]:
    return sorted(Path(f"{out}.work").glob("round_*"))


def _assert_same_prune(a: Path, b: Path) -> None:
    assert sha256_file(a / WEIGHTS_FILE) == sha256_file(b / WEIGHTS_FILE)
    assert read_record(a)["kept_units"] == read_record(b)["kept_units"]
    rounds_a, rounds_b = _rounds(a), _rounds(b)
    assert [r.name for r in rounds_a] == [r.name for r in rounds_b] and len(rounds_a) >= 2
    for ra, rb in zip(rounds_a, rounds_b, strict=True):
        importance_a, importance_b = (read_table(r / "importance.parquet")[0] for r in (ra, rb))
        pd.testing.assert_frame_equal(importance_a, importance_b, check_exact=True)
        scores_a, scores_b = (
            pd.concat(read_table(p)[0] for p in sorted((r / "shards").glob("*.parquet")))[["sample", "mean_nll"]]
            for r in (ra, rb)
        )
        assert scores_a["mean_nll"].tolist() == scores_b["mean_nll"].tolist()  # exact: same floats


@pytest.fixture(scope="module")
def in_process(stories_dir, tmp_path_factory, prefect_harness) -> Path:
    return _prune(stories_dir, tmp_path_factory.mktemp("dist") / "one", "--workers", "1")


def test_runner_choice():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.prune import shard_runner

    assert isinstance(shard_runner(PruneConfig()), ThreadPoolTaskRunner)
    local = shard_runner(PruneConfig(workers=3))
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs["n_workers"] == 3 and local.cluster_kwargs["threads_per_worker"] == 1
    assert local.cluster_kwargs["processes"] is True
    remote = shard_runner(PruneConfig(scheduler="tcp://10.0.0.5:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"


def test_blank_scheduler_is_refused():
    with pytest.raises(BonsaiError, match="scheduler must be a Dask scheduler address"):
        resolve_config({"scheduler": " "})


def test_two_local_dask_workers_match_one_process(in_process, stories_dir, tmp_path):
    _assert_same_prune(in_process, _prune(stories_dir, tmp_path / "two", "--workers", "2"))


def test_existing_scheduler_with_a_two_thread_worker(in_process, stories_dir, tmp_path, monkeypatch):
    """Two shards at a time in one worker process share its one model replica, in turn; a relative --out works
    although the worker runs in another directory."""
    from distributed import Client, LocalCluster

    import tasks.prune_tasks as prune_tasks

    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        monkeypatch.chdir(tmp_path)  # after the worker started: it stays in the old directory
        _prune(stories_dir, Path("remote"), "--scheduler", cluster.scheduler_address)
        loads = client.run(lambda: prune_tasks._checkpoint.cache_info().misses)
    assert sum(loads.values()) >= 2  # each round's checkpoint was loaded in the cluster's worker, not here
    _assert_same_prune(in_process, tmp_path / "remote")
