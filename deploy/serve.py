"""Serve the Bonsai prune flow on a cron schedule from this process (no work pool, no worker).

The other deployment style is `prefect.yaml` + `prefect --no-prompt deploy --all` + a process worker (see
docs/operations.md). This script is the `flow.serve` style: it registers a deployment with the Prefect API and
then runs its scheduled (and manually triggered) flow runs itself until stopped with Ctrl-C.

    DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_API_URL=http://127.0.0.1:4200/api \
        .venv/bin/python deploy/serve.py [--name NAME] [--cron "0 2 * * *"] [--out data/scheduled/pruned]

Runs execute with the repository root as working directory, so a relative `out` lands inside the project. Use
this style or prefect.yaml's, not both at once: they share the default output and work directory and the hour.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[1]
NAME = "bonsai-prune-served"  # prefect.yaml's deployment is bonsai-prune-nightly; different names never collide
CRON = "0 2 * * *"
# The same defaults as prefect.yaml's bonsai-prune-nightly (tests/test_deployment.py keeps them in sync).
# `config` is a JSON object that Prefect validates into a bonsai.config.PruneConfig; knobs left out take the values
# of its `preset`, as the CLI's --preset does (see docs/operations.md).
PARAMETERS: dict[str, Any] = {
    "config": {"model": "smollm2-135m", "sparsity": 0.5, "preset": "fast"},
    "out": "data/scheduled/pruned",
    "overwrite": True,  # nightly runs replace yesterday's output; finished rounds in the work dir are reused
}


def _quiet() -> None:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def deployment_options(name: str = NAME, cron: str = CRON, out: str | None = None) -> dict[str, Any]:
    """Keyword arguments shared by `prune_flow.serve` and `prune_flow.to_deployment`."""
    return {
        "name": name,
        "cron": cron,
        "parameters": {**PARAMETERS, "out": out or PARAMETERS["out"]},
        "description": "Nightly Bonsai prune (served by deploy/serve.py)",
        "tags": ["bonsai", "nightly"],
    }


def _prune_flow():
    _quiet()
    if str(PROJECT_DIR) not in sys.path:
        sys.path.insert(0, str(PROJECT_DIR))
    from flows.prune import prune_flow

    return prune_flow


def build_deployment(name: str = NAME, cron: str = CRON, out: str | None = None):
    """The deployment that `main` serves, built without contacting the Prefect API (used by the tests)."""
    return _prune_flow().to_deployment(**deployment_options(name, cron, out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Serve the Bonsai prune flow on a cron schedule from this process.")
    p.add_argument("--name", default=NAME)
    p.add_argument("--cron", default=CRON)
    p.add_argument("--out", default=PARAMETERS["out"], help="relative paths are inside the project directory")
    args = p.parse_args(argv)
    os.chdir(PROJECT_DIR)
    _prune_flow().serve(**deployment_options(args.name, args.cron, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
