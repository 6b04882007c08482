"""Shared test setup: real data from ../shared/data (or the user cache) when present, offline Hugging
Face, quiet Flower."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_harness import data_env  # tests/ is on sys.path: pytest puts a conftest's folder there

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SMOKE_SUITE = ROOT / "experiments" / "suites" / "smoke.toml"

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


def smoke_bench_command(out: Path, *extra: str) -> list[str]:
    """``fedsparse bench`` of the smoke suite into ``out`` (three methods, one seed, two rounds)."""
    return [sys.executable, "-m", "fedsparse.cli", "bench", str(SMOKE_SUITE), "--out", str(out), *extra]


SMOKE_BENCH_EXTRA = ("--jobs", "2", "--set", "checkpoint-every=1")


@pytest.fixture(scope="session")
def smoke_suite_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke suite run once by ``fedsparse bench`` on Ray (a subprocess per run, two at once, a
    checkpoint every round), for the tests that read its runs: the bench's end-to-end test (on a
    copy, since it changes them) and the shared-Ray test (its baseline of one Ray start per run).
    Running it once saves the default suite about a minute."""
    out = tmp_path_factory.mktemp("smoke-bench")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path_factory.getbasetemp() / "xdg-cache"))
    done = subprocess.run(
        smoke_bench_command(out, *SMOKE_BENCH_EXTRA),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out
