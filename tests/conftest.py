"""Shared test setup: real data from ../shared/data (or the user cache) when present, offline Hugging
Face, quiet Flower."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from deploy_harness import data_env  # tests/ is on sys.path: pytest puts a conftest's folder there

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

if not os.environ.get("FEDSPARSE_DATA") and SHARED_DATA.is_dir():
    os.environ["FEDSPARSE_DATA"] = str(SHARED_DATA)
# `make test` fetches into the user cache ($XDG_CACHE_HOME/fedsparse/data), which every test below
# re-points (_partition_cache) and so do the deployed processes: pin that data root first.
os.environ.update(data_env())
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(autouse=True)
def _partition_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the on-disk split cache inside the test session, not in the user's cache (data found
    in the user cache stays visible: FEDSPARSE_DATA was pinned to it above)."""
    cache = tmp_path_factory.getbasetemp() / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
