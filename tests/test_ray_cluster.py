"""Large simulations on an existing Ray cluster: ``fedsparse run --ray-address HOST:PORT``.

The address must reach ``ray.init`` through Flower's backend config (``init_args``), and the run
must then use that cluster rather than start its own: a real Ray head is started here
(``ray start --head --block`` on a free port, stopped — with every process below it — at the end),
a small simulation connects to it, and the cluster's own session logs must show that run's driver.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from deploy_harness import free_port  # tests/ is on sys.path under pytest
from proctree import descendants, process_alive, signal_pid, spawn, stop_tree

from fedsparse.cli import build_parser
from fedsparse.config import resolve_config
from fedsparse.simulation import backend_config

BIN = Path(sys.executable).parent


def test_backend_config_passes_the_address() -> None:
    cfg = resolve_config({"client-cpus": 2.0, "client-gpus": 0.5})
    local = backend_config(cfg)
    cluster = backend_config(cfg, "10.1.2.3:6379")
    assert "address" not in local["init_args"]
    assert cluster["init_args"]["address"] == "10.1.2.3:6379"
    # per-client resources still apply on the cluster; Ray refuses node resources when connecting
    assert cluster["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert not {"num_cpus", "num_gpus", "resources", "object_store_memory"} & set(cluster["init_args"])


def test_cli_takes_the_address() -> None:
    args = build_parser().parse_args(["run", "--ray-address", "head.example:6379", "--set", "rounds=1"])
    assert args.ray_address == "head.example:6379"
    assert build_parser().parse_args(["run"]).ray_address is None


@pytest.fixture()
def ray_head() -> Iterator[tuple[str, Path]]:
    """A one-node Ray cluster (2 CPUs) started like a user's head node; (address, its temp dir)."""
    temp = Path(tempfile.mkdtemp(prefix="fsray-", dir="/tmp"))  # short: Ray's unix sockets live here
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}  # FEDSPARSE_DATA etc. reach the workers from here
    # spawn(): stopped by the kernel too if this test process is killed before its cleanup
    head = spawn(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
            # fixed defaults (10001, 8265) would clash with another Ray head on the machine
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-port={free_port()}",
        ],
        temp / "head.log",
        env,
    )
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (temp / "head.log").read_text(errors="replace"):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head failed:\n{(temp / 'head.log').read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", temp
    finally:
        tree = [head.pid, *descendants(head.pid)]
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for pid in tree:
            if process_alive(pid):
                signal_pid(pid, signal.SIGKILL)  # it may exit between the check and the kill
        head.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
def test_simulation_runs_on_an_existing_cluster(ray_head: tuple[str, Path], tmp_path: Path) -> None:
    address, temp = ray_head
    out = tmp_path / "out"
    sets = {
        "num-clients": 2,
        "clients-per-round": 2,
        "rounds": 1,
        "local-steps": 3,
        "batch-size": 32,
        "eval-batch-size": 2500,
        "client-cpus": 1,
    }
    argv = [str(BIN / "fedsparse"), "run", "--ray-address", address, "--out", str(out), "--quiet"]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    log = tmp_path / "run.log"
    run = spawn(argv, log)  # stopped with whatever it started in `finally`, even after a timeout
    try:
        run.wait(timeout=400)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fedsparse run still running after 400 s:\n{log.read_text(errors='replace')[-4000:]}")
    finally:
        stop_tree([run], grace=10)
    assert run.returncode == 0, log.read_text(errors="replace")[-4000:]

    rounds = pd.read_csv(out / "rounds.csv")
    assert rounds["replies"].tolist() == [2] and rounds["failures"].tolist() == [0]
    # The cluster, not a private Ray instance, ran it: its session logs hold this run's driver
    # (the `fedsparse run` process) and the client actors it created.
    logs = temp / "session_latest" / "logs"
    assert list(logs.glob(f"python-core-driver-*_{run.pid}.log")), sorted(p.name for p in logs.iterdir())
    assert list(logs.glob("worker-*-01000000-*.out")), "no worker of the run's job on the cluster"
