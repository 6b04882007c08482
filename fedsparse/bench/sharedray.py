"""One local Ray head for all the runs of a suite (``fedsparse bench --shared-ray``).

Why: every ``fedsparse run`` otherwise starts and stops its own Ray instance (GCS, raylet, agents:
several seconds of a run's start-up, each time). Flower allows a run to use an existing Ray
instance: its Ray backend calls ``ray.init`` only when Ray is not initialised, with the backend
config's ``init_args`` — which is how ``fedsparse run --ray-address`` already joins a cluster.
Flower's backend also calls ``ray.shutdown()`` at the end of every run, so an instance cannot
outlive a run inside one driver process; a head started *outside* the runs does: ``shutdown()``
only disconnects a driver from it.

Isolation is kept: each run is still its own ``fedsparse run`` process (its own driver and Ray
job), and Flower creates the run's client actors afresh and kills them at its end, so no actor, and
no per-process cache, carries from one run to the next. Results do not depend on it (same seed ⇒
same ``rounds.csv``; tests/test_bench.py checks two runs on one head against separate starts).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from fedsparse.config import ConfigError

#: How long ``ray start --head`` may take before the suite gives up on it.
START_TIMEOUT = 180.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ray_binary() -> str:
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.is_file() else shutil.which("ray")
    if not found:
        raise ConfigError("--shared-ray: no `ray` command next to this Python or on PATH; install flwr[simulation]")
    return found


class SharedRay:
    """``with SharedRay(cpus) as address:`` a private Ray head (``ray start --head --block`` on free
    ports, its own temp dir) for the block's duration; stopped with everything it started at exit.

    The head's environment is the one its workers get, so it is started with this process's (the
    suite's ``FEDSPARSE_DATA``, ``HF_DATASETS_OFFLINE`` ...).
    """

    def __init__(self, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
        self.num_cpus = num_cpus if num_cpus is not None else (os.cpu_count() or 1)
        self.num_gpus = num_gpus
        self.address = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._temp: Path | None = None

    def __enter__(self) -> str:
        # short: Ray's unix sockets live under the temp dir (107-byte path limit)
        self._temp = Path(tempfile.mkdtemp(prefix="fsray-", dir="/tmp"))
        port = _free_port()
        cmd = [
            _ray_binary(),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--num-cpus={self.num_cpus}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={self._temp}",
            # fixed defaults (10001, 8265) would clash with another Ray head on the machine
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-port={_free_port()}",
        ]
        if self.num_gpus is not None:
            cmd.append(f"--num-gpus={self.num_gpus}")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        log = self._temp / "head.log"
        with log.open("wb") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                self.__exit__(None, None, None)
                raise RuntimeError(f"ray start --head did not start (log {log}):\n{tail}")
            time.sleep(0.5)
        self.address = f"127.0.0.1:{port}"
        return self.address

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            # `ray start --block` stops the processes it started on SIGTERM; the process group
            # (its own session) catches any that linger.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(timeout=30)
        if self._temp is not None:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None


__all__ = ["SharedRay"]
