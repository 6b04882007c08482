"""The FedDIP study's tables from the runs of ``experiments/suites/feddip.toml`` (reads them; runs nothing).

The bench's own report (``OUT/feddip/summary.md``) has final/best accuracy and MB per method; this
adds what the FedDIP paper reports and experiments/results/feddip.md quotes: the best round, the
mean of the five highest accuracies (the paper's Table V), the best accuracy within a
communication budget (its Table IV view), the final sparsity, the per-layer sparsity of every
pruning run (its Figure 5) and one accuracy plot per split::

    fedsparse bench experiments/suites/feddip.toml --out runs/feddip
    python experiments/report_feddip.py runs/feddip            # → runs/feddip/feddip/feddip-table.{md,csv}, *_compare/

Only runs the bench counts as finished are read (``fedsparse.bench.collect``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from fedsparse.bench.report import study_runs

SUITE = Path(__file__).resolve().parent / "suites" / "feddip.toml"
#: How the results document names each method of the suite.
LABELS = {"fedavg": "FedAvg", "feddp": "FedDP", "feddip": "FedDIP", "fedprox": "FedProx", "feddip-prox": "FedDIP+Prox"}


def mean_top5(df: pd.DataFrame) -> float:
    """The paper's Table V metric: mean of the five highest test accuracies during the run."""
    return float(df["test_accuracy"].dropna().nlargest(5).mean())


def best_within_budget(df: pd.DataFrame, budget_mb: float) -> float:
    """The paper's Table IV view: best test accuracy reached before moving ``budget_mb`` MB (up + down)."""
    moved = (df["cum_bytes_up"] + df["cum_bytes_down"]) / 1e6
    within = df.loc[moved <= budget_mb, "test_accuracy"].dropna()
    return float(within.max()) if len(within) else float("nan")


def table(all_rounds: pd.DataFrame, runs: pd.DataFrame, budget_mb: float = 250.0) -> pd.DataFrame:
    """One row per finished run, in suite order."""
    rows = []
    for r in runs.to_dict("records"):
        df = all_rounds[all_rounds["run"] == r["run"]]
        rows.append(
            {
                "setting": r["split"],
                "method": LABELS.get(r["method"], r["method"]),
                "rounds": r["rounds"],
                "final acc": 100 * r["final_accuracy"],
                "best acc": 100 * r["best_accuracy"],
                "best round": r["best_round"],
                "top-5 mean acc": 100 * mean_top5(df),
                f"best acc ≤ {budget_mb:g} MB": 100 * best_within_budget(df, budget_mb),
                "final sparsity": float(r.get("final_sparsity", math.nan)),  # NaN: a dense method
                "MB down": r["mb_down"],
                "MB up": r["mb_up"],
                "down / FedAvg": r["comm_ratio_down"],
                "up / FedAvg": r["comm_ratio_up"],
                "wall min": r["wall_seconds"] / 60,
            }
        )
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame) -> str:
    fmt = {
        **{c: "{:.2f}" for c in df.columns if c.startswith("best acc ≤")},
        "final acc": "{:.2f}",
        "best acc": "{:.2f}",
        "top-5 mean acc": "{:.2f}",
        "final sparsity": "{:.4f}",
        "MB down": "{:.1f}",
        "MB up": "{:.1f}",
        "down / FedAvg": "{:.3f}",
        "up / FedAvg": "{:.3f}",
        "wall min": "{:.0f}",
    }
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = ["dense" if c == "final sparsity" and pd.isna(r[c]) else fmt.get(c, "{}").format(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_tables(out: Path, runs: pd.DataFrame) -> str:
    """Per-layer final sparsity (the paper's Figure 5) of every pruning run, as Markdown."""
    parts = []
    for r in runs.to_dict("records"):
        path = out / r["run"] / "feddip_layer_sparsity.csv"
        if not path.is_file():
            continue
        layers = pd.read_csv(path)
        lines = [
            f"{r['split']} / {LABELS.get(r['method'], r['method'])}:",
            "",
            "| layer | weights | kept | initial (ERK) sparsity | final sparsity |",
            "|---|---|---|---|---|",
        ]
        for _, row in layers.iterrows():
            lines.append(
                f"| {row['layer']} | {row['numel']} | {row['kept']} | {row['initial_sparsity']:.3f} | {row['sparsity']:.3f} |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plots(all_rounds: pd.DataFrame, target: Path) -> list[Path]:
    """``<split>_compare/compare_accuracy_vs_{round,mb}.png``: every method of a split in one plot."""
    from fedsparse.results import plot_comparison

    paths: list[Path] = []
    for split, part in all_rounds.groupby("split", sort=False):
        folder = target / f"{split}_compare"
        folder.mkdir(parents=True, exist_ok=True)
        paths += plot_comparison(part.assign(strategy=part["method"].map(lambda m: LABELS.get(m, m))), folder)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the bench's --out directory")
    parser.add_argument("--suite", type=Path, default=SUITE, help="the suite file the runs came from")
    parser.add_argument(
        "--budget-mb", type=float, default=250.0, help="communication budget (MB up + down) of the budget column"
    )
    args = parser.parse_args(argv)
    found = study_runs(args.out, args.suite)
    if found is None:
        return 1
    suite, all_rounds, runs, target = found
    df = table(all_rounds, runs, args.budget_mb)
    md = to_markdown(df)
    layers = layer_tables(args.out, runs)
    if layers:
        md += "\n\n" + layers
    (target / "feddip-table.md").write_text(md + "\n")
    df.to_csv(target / "feddip-table.csv", index=False)
    plots(all_rounds, target)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
