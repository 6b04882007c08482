"""The FedLUAR study's tables from the runs of ``experiments/suites/fedluar.toml`` (reads them; runs nothing).

The bench's own report (``OUT/fedluar/summary.md``) has final/best accuracy and MB per run; this
adds what experiments/results/fedluar.md quotes: the mean of the last five evaluations (steadier
than the final one under Dirichlet 0.1), the uplink ratio to FedAvg's dense replies, how often each
layer was recycled (``luar_layers.csv``, stacked into ``fedluar-layers.csv``), one accuracy plot
of every run — and the δ the sweep's rule picks for the base rules (the lowest uplink whose final
accuracy is within ``--tolerance`` of δ = 0), checked against the δ the suite's base runs use::

    fedsparse bench experiments/suites/fedluar.toml --out runs/fedluar-cnn
    python experiments/report_fedluar.py runs/fedluar-cnn    # → runs/fedluar-cnn/fedluar/fedluar-table.{md,csv}

Only runs the bench counts as finished are read (``fedsparse.bench.collect``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd

from fedsparse.bench.report import study_runs

SUITE = Path(__file__).resolve().parent / "suites" / "fedluar.toml"
COLUMNS = [
    "run",
    "base",
    "delta",
    "rounds",
    "final_acc",
    "acc_last5",
    "best_acc",
    "comm_ratio_up",
    "comm_ratio_total",
    "mb_up",
    "recycled_per_layer",
    "s_per_round",
]


def setting(suite: Any, method: str, key: str, default: Any) -> Any:
    """A method's value of ``key`` in the suite (its own entry, else the suite's base)."""
    return suite.methods[method].get(key, suite.base.get(key, default))


def row_of(r: dict[str, Any], base: str, delta: int, rounds: pd.DataFrame, layers: pd.DataFrame) -> dict[str, Any]:
    """One run's figures: its summary.json (``r``), its rounds table and its per-layer counts."""
    return {
        "run": r["method"],
        "base": base,
        "delta": delta,
        "rounds": r["rounds"],
        "final_acc": r["final_accuracy"],
        "best_acc": r["best_accuracy"],
        # single evaluations are noisy under Dirichlet 0.1: also the mean of the last 5 evaluations
        "acc_last5": float(rounds["test_accuracy"].dropna().tail(5).mean()),
        "comm_ratio_up": r["comm_ratio_up"],
        "comm_ratio_total": r["comm_ratio_total"],
        "mb_up": r["mb_up"],
        "mb_down": r["mb_down"],
        "recycled_per_layer": " ".join(f"{x.layer}:{x.recycled}" for x in layers.itertuples()),
        "s_per_round": float(rounds["round_seconds"].iloc[1:].mean()),
        "wall_s": r["wall_seconds"],
    }


def pick_best_delta(rows: list[dict[str, Any]], tolerance: float) -> int | None:
    """The δ with the lowest uplink ratio whose final accuracy is within ``tolerance`` of δ = 0
    over FedAvg (else the smallest drop); None without the δ = 0 run and one δ > 0."""
    sweep = [r for r in rows if r["base"] == "fedavg"]
    ref = next((r for r in sweep if r["delta"] == 0), None)
    others = [r for r in sweep if r["delta"] > 0]
    if ref is None or not others:
        return None
    ok = [r for r in others if r["final_acc"] >= ref["final_acc"] - tolerance]
    if not ok:
        return min(others, key=lambda r: ref["final_acc"] - r["final_acc"])["delta"]
    return min(ok, key=lambda r: r["comm_ratio_up"])["delta"]


def markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table (floats to 4 decimals)."""

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the bench's --out directory")
    parser.add_argument("--suite", type=Path, default=SUITE, help="the suite file the runs came from")
    parser.add_argument("--tolerance", type=float, default=0.01, help="accuracy drop allowed for the best δ")
    args = parser.parse_args(argv)
    from fedsparse.results import plot_comparison

    found = study_runs(args.out, args.suite)
    if found is None:
        return 1
    suite, all_rounds, runs, target = found
    rows, layers = [], []
    for r in runs.to_dict("records"):
        base = str(setting(suite, r["method"], "luar-base", "fedavg"))
        delta = int(setting(suite, r["method"], "recycled-layers", 2))
        per_layer = pd.read_csv(args.out / r["run"] / "luar_layers.csv")
        rows.append(row_of(r, base, delta, all_rounds[all_rounds["run"] == r["run"]], per_layer))
        layers.append(per_layer.assign(run=r["method"]))
    table = pd.DataFrame(rows)
    table.to_csv(target / "fedluar-table.csv", index=False)
    md = markdown(table[COLUMNS])
    (target / "fedluar-table.md").write_text(md + "\n")
    pd.concat(layers, ignore_index=True).to_csv(target / "fedluar-layers.csv", index=False)
    plot_comparison(all_rounds.assign(run=all_rounds["method"]), target, by="run")
    print(md)
    best = pick_best_delta(rows, args.tolerance)
    used = sorted({r["delta"] for r in rows if r["base"] != "fedavg" and r["delta"] > 0})
    print(f"\nbest δ by the sweep's rule (tolerance {args.tolerance}): {best}; the base rules' runs use δ = {used}")
    if best is not None and used and used != [best]:
        print(f"note: set the base rules' recycled-layers to {best} in {args.suite} to follow the rule")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
