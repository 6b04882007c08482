"""An engine that cannot run a client stops the run with one message, not a hang.

Flower's engine stops ("ActorPool is empty") when Ray cannot place a single client actor; the round
loop used to wait ``round-timeout`` for every round, recording failed rounds (and checkpointing
them). Now the launcher refuses such resources before Ray starts on a local machine, and when an
engine dies under a running loop (here: a Ray cluster whose node is smaller than a client), the loop
abandons its round and ``fedsparse run`` exits 1 naming the cause. Real Ray, real subprocesses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedsparse.bench.sharedray import SharedRay

TINY = [
    "--set", "num-clients=2", "--set", "clients-per-round=2", "--set", "rounds=2", "--set", "local-steps=2",
    "--set", "eval-batch-size=5000", "--set", "wire-bytes=false", "--set", "checkpoint-every=1",
]  # fmt: skip


def _fedsparse(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fedsparse.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def test_more_cpus_per_client_than_the_machine_has_is_refused_before_ray(tmp_path: Path) -> None:
    cores = os.cpu_count() or 1
    proc = _fedsparse("run", "--out", "run", *TINY, "--set", f"client-cpus={cores + 1}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"client-cpus = {float(cores + 1)} exceeds the {cores} CPUs of this machine" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "rounds.csv").exists()


@pytest.mark.ray
def test_an_engine_that_cannot_place_a_client_ends_the_run_with_one_message(tmp_path: Path) -> None:
    with SharedRay(num_cpus=1) as address:
        proc = _fedsparse(
            "run", "--out", "run", "--ray-address", address, *TINY, "--set", "client-cpus=2", cwd=tmp_path
        )
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedsparse: Flower's simulation engine stopped (ValueError: ActorPool is empty"), last
    assert "the round in flight was abandoned, not recorded; no round had completed" in last
    out = tmp_path / "run"
    assert not (out / "summary.json").exists() and not (out / "checkpoint.npz").exists()
    rounds = out / "rounds.csv"
    assert not rounds.exists() or len(rounds.read_text().splitlines()) <= 1  # no round recorded, failed or not
