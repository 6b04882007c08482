"""The partial-update study's tables from the runs of ``experiments/suites/partial-update.toml``
(reads them; runs nothing).

The bench's own report (``OUT/partial-update/summary.md``) has accuracy and MB per method; this adds
what experiments/results/partial-update.md quotes: the accuracy gap to FedAvg in points, the
downlink ratio of the whole run and of the per-round broadcast alone (*fresh ratio*), how close the
encoding comes to its Shannon bound, dense resyncs and the clients' mean version lag, and accuracy
plots per split::

    fedsparse bench experiments/suites/partial-update.toml --out runs/partial-update
    python experiments/report_partial_update.py runs/partial-update
        # → runs/partial-update/partial-update/partial-update-table.{md,csv}, compare_<split>.png

Only runs the bench counts as finished are read (``fedsparse.bench.collect``).
"""

from __future__ import annotations

import argparse
import math
import tomllib
from pathlib import Path
from typing import Any

import pandas as pd

from fedsparse.bench.report import study_runs

SUITE = Path(__file__).resolve().parent / "suites" / "partial-update.toml"
#: Methods drawn in a split's plot (a split not named here: all of its runs).
PLOTTED = {
    "mnist-mlp": ["fedavg", "combined-k0.05", "global-k0.05", "random-k0.05", "combined-k0.01", "combined-k0.05-8bit"],
}
METHOD_NAMES = {"combined": "DPU (combined)", "global": "GCPU (global)", "random": "RPU (random)", "local": "local"}


def fresh_ratio(run_dir: Path, df: pd.DataFrame) -> float:
    """The per-round DPU broadcast alone: mean measured payload of a `fresh` message (a client that
    took part in the previous round gets exactly that round's k·I change) / the dense message.

    In a round with fresh patches the smallest downlink message is a fresh one (a catch-up patch
    holds a superset of its positions, a dense one the whole model), so it is read from
    messages.csv as each such round's minimum.
    """
    msgs = pd.read_csv(run_dir / "messages.csv")
    down = msgs[msgs["direction"] == "down"].groupby("round")["payload_bytes"].min()
    rounds = df.loc[df["patch_kinds"].fillna("").str.contains("fresh:"), "round"]
    dense = float(df["cum_dense_bytes_down"].iloc[0]) / float(df["clients"].iloc[0])
    values = down.reindex(rounds).dropna()
    return float(values.mean()) / dense if len(values) else math.nan


def row_of(r: dict[str, Any], run_dir: Path, df: pd.DataFrame) -> dict[str, Any]:
    """One run's figures from its summary (``r``), config.toml, rounds table and messages."""
    cfg = tomllib.loads((run_dir / "config.toml").read_text())
    last = df.iloc[-1]
    partial = cfg["strategy"] == "partial-update"
    row: dict[str, Any] = {
        "run": f"{r['split']}/{r['method']}",
        "data / model": f"{cfg['dataset']} / {cfg['model']}",
        "method": METHOD_NAMES[cfg["contribution"]] if partial else "FedAvg",
        "k": cfg["update-ratio"] if partial else 1.0,
        "bits": cfg["value-bits"] if partial else 32,
        "optimizer": cfg.get("optimizer", "sgd"),
        "lr": cfg["lr"],
        "final acc %": 100 * float(last["test_accuracy"]),
        "best acc %": 100 * float(r["best_accuracy"]),
        "down ratio": float(last["comm_ratio_down"]),
        "down MB": float(last["cum_bytes_down"]) / 1e6,
        "up ratio": float(last["comm_ratio_up"]),
        "wall min": float(last["elapsed_seconds"]) / 60,
    }
    if partial:
        row["fresh ratio"] = fresh_ratio(run_dir, df)
        patch = float(df["patch_bytes_down"].sum())
        row["Shannon / measured"] = float(df["shannon_bound_bytes"].sum()) / patch if patch else math.nan
        idx = float(df["index_bytes_down"].sum())
        row["index / H(k) bound"] = idx / float(df["shannon_index_bytes"].sum()) if idx else math.nan
        row["dense resyncs"] = int(df["clients_dense"].sum())
        row["mean lag"] = float(df["mean_version_lag"].iloc[len(df) // 2 :].mean())
        row["init"] = cfg["initial-sync"]
        row["after"] = cfg["after-broadcast"]
        # issue 15: how the local term was obtained, and when RPU's subset was drawn (runs from
        # before these keys existed sent the exact metric dense and drew RPU after training)
        row["local metric"] = cfg.get("local-metric", "client") if cfg["contribution"] in ("combined", "local") else ""
        row["RPU mask"] = cfg.get("random-mask", "after-training") if cfg["contribution"] == "random" else ""
    return row


def table(out: Path, all_rounds: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per finished run, with the accuracy gap to FedAvg on the same split."""
    rows = [row_of(r, out / r["run"], all_rounds[all_rounds["run"] == r["run"]]) for r in runs.to_dict("records")]
    splits = list(runs["split"])
    df = pd.DataFrame(rows)
    base = {s: row["final acc %"] for s, row in zip(splits, rows) if row["method"] == "FedAvg"}
    df.insert(
        df.columns.get_loc("best acc %"),
        "Δ vs FedAvg (pt)",
        [row["final acc %"] - base.get(s, math.nan) for s, row in zip(splits, rows)],
    )
    return df


def to_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    fmt = {
        "k": "{:g}",
        "bits": "{:d}",
        "lr": "{:g}",
        "final acc %": "{:.2f}",
        "Δ vs FedAvg (pt)": "{:+.2f}",
        "best acc %": "{:.2f}",
        "down ratio": "{:.4f}",
        "fresh ratio": "{:.4f}",
        "down MB": "{:.1f}",
        "up ratio": "{:.3f}",
        "wall min": "{:.1f}",
        "Shannon / measured": "{:.3f}",
        "index / H(k) bound": "{:.2f}",
        "dense resyncs": "{:.0f}",
        "mean lag": "{:.2f}",
    }
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float) and math.isnan(v):
                cells.append("")
            elif c in fmt and not isinstance(v, str):
                cells.append(fmt[c].format(int(v) if fmt[c] in ("{:d}", "{:.0f}") else v))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(all_rounds: pd.DataFrame, target: Path) -> list[Path]:
    """compare_<split>.png: accuracy against rounds and against cumulative measured downlink MB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for split, part in all_rounds.groupby("split", sort=False):
        names = PLOTTED.get(str(split), list(dict.fromkeys(part["method"])))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name in names:
            df = part[part["method"] == name].dropna(subset=["test_accuracy"])
            if df.empty:
                continue
            axes[0].plot(df["round"], df["test_accuracy"], marker=".", label=name)
            axes[1].plot(df["cum_bytes_down"] / 1e6, df["test_accuracy"], marker=".", label=name)
        axes[0].set_xlabel("round")
        axes[1].set_xlabel("cumulative downlink MB (payload, measured)")
        axes[1].set_xscale("log")
        for ax in axes:
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = target / f"compare_{split}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the bench's --out directory")
    parser.add_argument("--suite", type=Path, default=SUITE, help="the suite file the runs came from")
    parser.add_argument(
        "--table", type=Path, help="markdown table output (default OUT/<suite name>/partial-update-table.md)"
    )
    args = parser.parse_args(argv)
    found = study_runs(args.out, args.suite)
    if found is None:
        return 1
    suite, all_rounds, runs, target = found
    df = table(args.out, all_rounds, runs)
    df.to_csv(target / "partial-update-table.csv", index=False)
    md = to_markdown(df)
    (args.table or target / "partial-update-table.md").write_text(md + "\n")
    plots(all_rounds, target)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
