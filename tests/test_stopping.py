"""Ctrl-C / SIGTERM stop a run cleanly: exit 130 / 143 within seconds, no failed round recorded, the
last complete round checkpointed, and a resume ends with the weights of a straight run, bit for bit.

Real signals to a real ``fedsparse run`` subprocess on Flower's simulation engine (Ray).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsparse import checkpoint as ckpt

pytestmark = pytest.mark.ray

SETTINGS = [
    "--set", "rounds=5", "--set", "checkpoint-every=1", "--set", "num-clients=4", "--set", "clients-per-round=2",
    "--set", "local-steps=3", "--set", "eval-batch-size=5000", "--set", "wire-bytes=false", "--set", "strategy=topk",
]  # fmt: skip


def _run(out: Path, *extra: str, stop_after_round: int | None = None, sig: int = signal.SIGINT) -> tuple[int, str]:
    """``fedsparse run`` into ``out``; with ``stop_after_round``, send ``sig`` once that many rounds are recorded."""
    cmd = [sys.executable, "-m", "fedsparse.cli", "run", "--quiet", *extra]
    log = out.parent / f"{out.name}-{len(list(out.parent.glob(out.name + '-*.log')))}.log"
    with log.open("w") as sink:  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        code = _drive(proc, out, stop_after_round, sig)
    return code, log.read_text()


def _drive(proc: subprocess.Popen[bytes], out: Path, stop_after_round: int | None, sig: int) -> int:
    if stop_after_round is not None:
        deadline = time.monotonic() + 300
        rows = out / "rounds.csv"
        while time.monotonic() < deadline and proc.poll() is None:
            if rows.is_file() and len(rows.read_text().splitlines()) > stop_after_round:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(sig)
        started = time.monotonic()
        proc.wait(timeout=180)
        assert time.monotonic() - started < 60, "stopping took more than a minute"
        return proc.returncode
    return proc.wait(timeout=900)


def _final_arrays(out: Path) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in ckpt.load_checkpoint(out).arrays.items()}


def test_sigint_stops_cleanly_and_resume_matches_a_straight_run(tmp_path: Path) -> None:
    stopped = tmp_path / "stopped"
    rc, err = _run(stopped, "--out", str(stopped), *SETTINGS, stop_after_round=2)
    assert rc == 130, err[-3000:]
    assert "stopped by SIGINT" in err and f"--resume {stopped}" in err
    rows = pd.read_csv(stopped / "rounds.csv")
    assert (rows["failures"] == 0).all() and rows["aggregated"].all()  # no abandoned round written
    saved = ckpt.load_checkpoint(stopped)
    assert saved.server_round == int(rows["round"].max()) >= 2
    assert not (stopped / "summary.json").exists()  # not a finished run

    rc, err = _run(stopped, "--resume", str(stopped))
    assert rc == 0, err[-3000:]
    straight = tmp_path / "straight"
    rc, err = _run(straight, "--out", str(straight), *SETTINGS)
    assert rc == 0, err[-3000:]

    a, b = _final_arrays(stopped), _final_arrays(straight)
    assert ckpt.load_checkpoint(stopped).server_round == 5
    assert list(a) == list(b)
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k
    cols = ["round", "test_accuracy", "bytes_up", "bytes_down", "failures"]
    pd.testing.assert_frame_equal(pd.read_csv(stopped / "rounds.csv")[cols], pd.read_csv(straight / "rounds.csv")[cols])


def test_sigterm_exits_143_with_the_last_round_checkpointed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc, err = _run(out, "--out", str(out), *SETTINGS, stop_after_round=1, sig=signal.SIGTERM)
    assert rc == 143, err[-3000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    rows = pd.read_csv(out / "rounds.csv")
    assert (rows["failures"] == 0).all()
    assert ckpt.load_checkpoint(out).server_round == int(rows["round"].max())
