"""Shared fixtures: offline hub settings, ../shared assets (skipped when absent), tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def _shared_path(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):  # CI must not go green on skipped tests
            pytest.fail(f"CI: ../shared asset {rel} is absent ({SHARED}); the tests that need it cannot be skipped")
        pytest.skip(f"../shared asset {rel} is absent (only on machines that carry ../shared)")
    return p


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """The real tiny model stories260K (Llama, GQA 8q/4kv, 5 layers)."""
    return _shared_path("assets/models/stories260K")


@pytest.fixture(scope="session")
def wiki_valid() -> Path:
    return _shared_path("assets/corpus/wikitext-2/wiki.valid.tokens")


@pytest.fixture(scope="session")
def wiki_test_raw() -> Path:
    return _shared_path("assets/corpus/wikitext-2/wiki.test.raw")


@pytest.fixture(scope="session")
def zeroshot_dir() -> Path:
    return _shared_path("assets/zeroshot")


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole test session (starting one takes ~15 s)."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
