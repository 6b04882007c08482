"""Results of a run: the rounds table (written after every round), a summary, and plots.

``rounds.csv`` is tidy (one row per round) so that runs concatenate into one pandas frame;
it is rewritten after each round, so an interrupted run keeps everything up to its last round.

Every file is written atomically (:func:`fedsparse.checkpoint.atomic_write`: temporary file, fsync,
``os.replace``), and ``summary.json`` is written last: its presence means the run finished and
everything else of it is on disk (``fedsparse bench`` adds its own marker, ``bench.json``, once the
run's process has also exited cleanly).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from fedsparse.checkpoint import atomic_write
from fedsparse.config import to_toml
from fedsparse.environment import describe, toml_header

BASE_COLUMNS = [
    "run_id",
    "strategy",
    "seed",
    "round",
    "clients",
    "replies",
    "failures",
    "rejected",
    "aggregated",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "lr",
    "bytes_up",
    "bytes_down",
    "wire_bytes_up",
    "wire_bytes_down",
    "cum_bytes_up",
    "cum_bytes_down",
    "cum_wire_bytes_up",
    "cum_wire_bytes_down",
    "cum_dense_bytes_up",
    "cum_dense_bytes_down",
    "comm_ratio_up",
    "comm_ratio_down",
    "comm_ratio_total",
    "round_seconds",
    "elapsed_seconds",
]

MB = 1e6


class RoundsTable:
    """Accumulates one dict per round and keeps ``rounds.csv`` on disk up to date."""

    def __init__(self, out_dir: Path | None, rows: list[dict[str, Any]] | None = None) -> None:
        self.out_dir = out_dir
        self.rows: list[dict[str, Any]] = list(rows or [])

    def add(self, row: Mapping[str, Any]) -> None:
        prev = self.rows[-1] if self.rows else {}
        row = dict(row)
        for key in ("bytes_up", "bytes_down", "wire_bytes_up", "wire_bytes_down", "dense_bytes_up", "dense_bytes_down"):
            row[f"cum_{key}"] = prev.get(f"cum_{key}", 0) + row.get(key, 0)
        up, down = row["cum_bytes_up"], row["cum_bytes_down"]
        dup, ddown = row["cum_dense_bytes_up"], row["cum_dense_bytes_down"]
        row["comm_ratio_up"] = up / dup if dup else math.nan
        row["comm_ratio_down"] = down / ddown if ddown else math.nan
        row["comm_ratio_total"] = (up + down) / (dup + ddown) if dup + ddown else math.nan
        self.rows.append(row)
        if self.out_dir is not None:
            self.write()

    def write(self) -> None:
        """(Re)write ``rounds.csv`` atomically with the rows so far."""
        if self.out_dir is not None:
            atomic_write(self.out_dir / "rounds.csv", self.frame().to_csv(index=False))

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows)
        first = [c for c in BASE_COLUMNS if c in df.columns]
        rest = [c for c in df.columns if c not in first and not c.startswith("dense_bytes")]
        return df[first + rest]


def summarize(df: pd.DataFrame, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Headline figures of a run (final/best accuracy, bytes moved, ratios to dense FedAvg)."""
    evald = df.dropna(subset=["test_accuracy"])
    last = df.iloc[-1]
    return {
        "strategy": cfg["strategy"],
        "dataset": cfg["dataset"],
        "model": cfg["model"],
        "partition": cfg["partition"],
        "seed": cfg["seed"],
        "rounds": int(last["round"]),
        "final_accuracy": float(evald["test_accuracy"].iloc[-1]) if len(evald) else None,
        "best_accuracy": float(evald["test_accuracy"].max()) if len(evald) else None,
        "best_round": int(evald.loc[evald["test_accuracy"].idxmax(), "round"]) if len(evald) else None,
        "mb_up": float(last["cum_bytes_up"]) / MB,
        "mb_down": float(last["cum_bytes_down"]) / MB,
        "mb_total": float(last["cum_bytes_up"] + last["cum_bytes_down"]) / MB,
        "wire_mb_total": float(last["cum_wire_bytes_up"] + last["cum_wire_bytes_down"]) / MB,
        "comm_ratio_up": float(last["comm_ratio_up"]),
        "comm_ratio_down": float(last["comm_ratio_down"]),
        "comm_ratio_total": float(last["comm_ratio_total"]),
        "failures": int(df["failures"].sum()),
        "rejected": int(df["rejected"].sum()) if "rejected" in df else 0,
        "wall_seconds": float(last["elapsed_seconds"]),
    }


def _accuracy_plots(groups: list[tuple[str, pd.DataFrame]], out_dir: Path, prefix: str = "") -> list[Path]:
    """Accuracy vs round and vs cumulative MB (up + down), one line per (label, rounds frame)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x, xlabel, name in (
        ("round", "round", "accuracy_vs_round.png"),
        ("cum_mb_total", "cumulative MB moved (up + down, payload)", "accuracy_vs_mb.png"),
    ):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for label, frame in groups:
            evald = frame.dropna(subset=["test_accuracy"])
            xs = evald["round"] if x == "round" else (evald["cum_bytes_up"] + evald["cum_bytes_down"]) / MB
            ax.plot(xs, evald["test_accuracy"], marker=".", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{prefix}{name}"
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=120, format="png")
        plt.close(fig)
        atomic_write(path, buffer.getvalue())
        paths.append(path)
    return paths


def plot_run(df: pd.DataFrame, out_dir: Path, title: str) -> list[Path]:
    """accuracy_vs_round.png and accuracy_vs_mb.png of one run."""
    return _accuracy_plots([(title, df)], out_dir)


def config_text(cfg: Mapping[str, Any]) -> str:
    """``config.toml``: what the run ran on (comments), then the resolved configuration."""
    return "# written by fedsparse; what this run ran on:\n" + toml_header(cfg) + to_toml(cfg)


def write_outputs(
    out_dir: Path, cfg: Mapping[str, Any], df: pd.DataFrame, extra: Mapping[str, Any] | None = None
) -> dict:
    """config.toml, the plots, then summary.json — last, so that it marks a finished run (rounds.csv
    is already there). Each file is written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "config.toml", config_text(cfg))
    summary = summarize(df, cfg) | dict(extra or {}) | {"environment": describe(cfg)}
    text = json.dumps(summary, indent=2, default=str) + "\n"  # before the plots: a bad value fails early
    plot_run(df, out_dir, f"{cfg['strategy']} / {cfg['model']} / {cfg['dataset']}")
    atomic_write(out_dir / "summary.json", text)
    return summary


def plot_comparison(df: pd.DataFrame, out_dir: Path, by: str = "strategy") -> list[Path]:
    """compare_accuracy_vs_{round,mb}.png: one line per value of ``by`` in a tidy frame of runs."""
    return _accuracy_plots([(str(k), g) for k, g in df.groupby(by, sort=False)], out_dir, prefix="compare_")
