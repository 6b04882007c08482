"""A run directory is never replaced by accident, and a bad ``--out`` is one line, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fedsparse.config import ConfigError
from fedsparse.rundir import RunExistsError, prepare_out_dir, run_files

TINY = [
    "--set", "num-clients=2", "--set", "clients-per-round=2", "--set", "rounds=1", "--set", "local-steps=2",
    "--set", "eval-batch-size=5000", "--set", "wire-bytes=false",
]  # fmt: skip


def _fedsparse(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedsparse.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _finished_run(path: Path) -> dict[str, bytes]:
    """A directory as a finished run leaves it (content that must survive a refused start)."""
    path.mkdir(parents=True)
    files = {"config.toml": b"seed = 7\n", "rounds.csv": b"round,test_accuracy\n1,0.5\n", "summary.json": b"{}\n"}
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


def test_an_empty_or_new_directory_is_ready(tmp_path: Path) -> None:
    assert prepare_out_dir(tmp_path / "new" / "run") == []
    assert (tmp_path / "new" / "run").is_dir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert prepare_out_dir(tmp_path / "other") == []


def test_a_directory_holding_a_run_is_refused_unless_overwrite(tmp_path: Path) -> None:
    files = _finished_run(tmp_path / "run")
    with pytest.raises(
        RunExistsError, match=r"holds a run \(config.toml, rounds.csv, summary.json\).*--resume.*--overwrite"
    ):
        prepare_out_dir(tmp_path / "run")
    assert {n: (tmp_path / "run" / n).read_bytes() for n in files} == files  # nothing touched
    assert prepare_out_dir(tmp_path / "run", overwrite=True) == ["config.toml", "rounds.csv", "summary.json"]
    assert run_files(tmp_path / "missing") == []


def test_a_file_as_out_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        prepare_out_dir(tmp_path / "f")
    with pytest.raises(ConfigError, match="cannot be created"):
        prepare_out_dir(tmp_path / "f" / "below")


def test_cli_refuses_a_finished_run_with_exit_2_and_touches_nothing(tmp_path: Path) -> None:
    files = _finished_run(tmp_path / "run")
    proc = _fedsparse("run", "--out", "run", *TINY, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--resume" in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2
    assert {n: (tmp_path / "run" / n).read_bytes() for n in files} == files
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(files)


@pytest.mark.parametrize(
    ("out", "fragment"), [("afile", "is a file, not a directory"), ("afile/below", "cannot be created")]
)
def test_cli_bad_out_is_one_line_and_debug_shows_the_traceback(tmp_path: Path, out: str, fragment: str) -> None:
    (tmp_path / "afile").write_text("x")
    proc = _fedsparse("run", "--out", out, *TINY, cwd=tmp_path)
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr
    debug = _fedsparse("run", "--out", out, "--debug", *TINY, cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and fragment in debug.stderr


def test_cli_corrupt_dataset_is_one_message(tmp_path: Path) -> None:
    shared = Path(os.environ["FEDSPARSE_DATA"]) / "fashion-mnist"
    bad = tmp_path / "data" / "fashion-mnist"
    bad.mkdir(parents=True)
    for f in shared.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.name.startswith("train-labels") else data)
    proc = _fedsparse("run", "--data-dir", str(tmp_path / "data"), "--out", "run", *TINY, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train-labels" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3


@pytest.mark.ray
def test_overwrite_says_what_it_replaces_and_replaces_it(tmp_path: Path) -> None:
    _finished_run(tmp_path / "run")
    proc = _fedsparse("run", "--out", "run", "--overwrite", "--quiet", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "replacing the run in run (config.toml, rounds.csv, summary.json)" in proc.stderr
    assert len(pd.read_csv(tmp_path / "run" / "rounds.csv")) == 1
    assert "seed = 0" in (tmp_path / "run" / "config.toml").read_text()


def test_cli_damaged_cifar_batch_is_one_message(tmp_path: Path) -> None:
    """A garbled CIFAR batch is a DatasetFormatError: one message naming the file and what to do."""
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"\x00garbled")
    proc = _fedsparse(
        "run", "--data-dir", str(tmp_path / "data"), "--out", "run", "--set", "dataset=cifar10",
        "--set", "model=resnet18", *TINY, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "data_batch_1: not a readable cifar10 pickle batch" in proc.stderr and "Traceback" not in proc.stderr
    assert "unpack cifar10's python-pickle archive again" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3
