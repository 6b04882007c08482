"""Split report (table, statistics, picture) and the ``fedsparse data`` subcommands."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest

from fedsparse.data import format_split_report, label_histogram, plot_split
from fedsparse.data.cli import add_data_commands
from fedsparse.data.paths import IDX_FILES

SHARED = Path(os.environ.get("FEDSPARSE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not (SHARED / "fashion-mnist").is_dir(), reason=f"no datasets at {SHARED}")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("FEDSPARSE_DATA", str(SHARED))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsparse")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def test_histogram_counts_and_report() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2, 1, 0])
    parts = [np.array([0, 1, 2]), np.array([3, 4]), np.array([5, 6, 7])]
    df = label_histogram(labels, parts, num_classes=4)
    assert list(df.columns) == ["client", "size", 0, 1, 2, 3]
    assert df["size"].tolist() == [3, 2, 3]
    assert df[[0, 1, 2, 3]].values.tolist() == [[2, 1, 0, 0], [0, 0, 2, 0], [1, 1, 1, 0]]
    text = format_split_report(df, max_rows=2)
    assert "... 1 more clients" in text
    assert "size min/median/max 2/3/3" in text
    assert "classes per client mean 2.00 (min 1, max 3)" in text
    with pytest.raises(ValueError, match="outside 0..1"):
        label_histogram(labels, parts, num_classes=2)


def test_report_with_many_classes_stays_compact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 100, 3000)
    parts = np.array_split(np.arange(3000), 5)
    text = format_split_report(label_histogram(labels, parts, 100))
    assert "top classes" in text and max(len(line) for line in text.splitlines()) < 160
    out = plot_split(label_histogram(labels, parts, 100), tmp_path / "c100.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_written_as_png(tmp_path: Path) -> None:
    labels = np.repeat(np.arange(10), 20)
    parts = np.array_split(np.arange(200), 8)
    out = plot_split(label_histogram(labels, parts, 10), tmp_path / "sub" / "split.png", title="t")
    assert out == tmp_path / "sub" / "split.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


@needs_data
def test_cli_split_prints_report_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "split.png"
    rc = _run(
        [
            "data",
            "split",
            "--dataset",
            "mnist",
            "--partition",
            "pathological",
            "--num-clients",
            "12",
            "--classes-per-client",
            "3",
            "--seed",
            "1",
            "--max-rows",
            "4",
            "--plot",
            str(png),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "mnist: pathological, 3 classes/client, 12 clients, seed 1" in out
    assert "clients 12, samples 60000" in out and "classes per client mean 3.00 (min 3, max 3)" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


@needs_data
def test_cli_split_errors_are_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["data", "split", "--partition", "dirichlet", "--alpha", "0"]) == 2
    assert "alpha=0.0 is out of range" in capsys.readouterr().err
    assert _run(["data", "split", "--dataset", "cifar10", "--data-dir", str(tmp_path)]) == 1
    assert "cifar-10-batches-py" in capsys.readouterr().err


@needs_data
def test_cli_fetch_local(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = _run(["data", "fetch", "mnist", "--route", "local", "--from", str(SHARED), "--dest", str(tmp_path)])
    assert rc == 0
    assert f"mnist: 4 IDX files verified in {tmp_path / 'mnist'}" in capsys.readouterr().out
    assert all((tmp_path / "mnist" / f"{s}.gz").is_file() for s in IDX_FILES)
    assert (
        _run(
            [
                "data",
                "fetch",
                "mnist",
                "--route",
                "local",
                "--from",
                str(SHARED / "fashion-mnist"),
                "--dest",
                str(tmp_path),
            ]
        )
        == 1
    )
    assert "failed verification" in capsys.readouterr().err


def test_cli_rejects_unknown_choices() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["data", "fetch", "cifar10"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["data"])
    args = _parser().parse_args(["data", "split"])
    assert (
        args.dataset,
        args.partition,
        args.num_clients,
        args.alpha,
        args.classes_per_client,
        args.min_partition_size,
        args.seed,
    ) == ("fashion-mnist", "dirichlet", 50, 0.5, 2, 10, 0)
