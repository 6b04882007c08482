"""``fedsparse bench --shared-ray``: the runs of a suite on one Ray head, with the same results.

Same seed ⇒ same table: two runs of the smoke suite on one shared head must write the very
``rounds.csv`` (timing columns aside, compared as text) that the same runs write with a Ray start
each (the session's ``smoke_suite_runs``, which the bench's end-to-end test reads too). The head
must be gone afterwards.
"""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import smoke_bench_command

from fedsparse.bench.runner import run_suite
from fedsparse.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "experiments" / "suites" / "smoke.toml"
TIMING = ("round_seconds", "elapsed_seconds")


def _bench(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = smoke_bench_command(out, "--only", "fedavg,topk", *extra)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200, check=False)


def _table(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, name in enumerate(header) if name not in TIMING]
    return [[row.split(",")[i] for i in keep] for row in lines]


def test_shared_ray_needs_one_job(tmp_path: Path) -> None:
    from fedsparse import bench

    suite = bench.load_suite(SUITE)
    with pytest.raises(ConfigError, match="--shared-ray with --jobs 2: allowed: --jobs 1"):
        run_suite(suite, tmp_path, jobs=2, shared_ray=True, report=lambda line: None)


@pytest.mark.ray
def test_runs_on_a_shared_head_match_separate_starts(smoke_suite_runs: Path, tmp_path: Path) -> None:
    shared = _bench(tmp_path / "shared", "--shared-ray")
    assert shared.returncode == 0, shared.stdout + shared.stderr
    found = re.search(r"shared Ray head at 127\.0\.0\.1:(\d+)", shared.stdout)
    assert found, shared.stdout
    with socket.socket() as sock:  # the head (its GCS port) is stopped with the suite
        assert sock.connect_ex(("127.0.0.1", int(found.group(1)))) != 0
    for name in ("fedavg--iid--s0", "topk--iid--s0"):
        a = _table(tmp_path / "shared" / name / "rounds.csv")
        b = _table(smoke_suite_runs / name / "rounds.csv")
        assert len(a) == 3 and a == b, name
