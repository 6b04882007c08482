"""The FedLUAR study's tables from the runs of ``experiments/suites/fedluar.toml`` (reads them; runs nothing).

The bench's own report (``OUT/fedluar/summary.md``) has final/best accuracy and MB per run; this
adds what experiments/results/fedluar.md quotes: the mean of the last five evaluations (steadier
than the final one under Dirichlet 0.1), the uplink ratio to FedAvg's dense replies, how often each
layer was recycled (``luar_layers.csv``, stacked into ``fedluar-layers.csv``), one accuracy plot
of every run — and the δ the sweep's rule picks for the base rules (the lowest uplink whose final
accuracy is within ``--tolerance`` of δ = 0), checked against the δ the suite's base runs use::

    fedsparse bench experiments/suites/fedluar.toml --out runs/fedluar-cnn
    python experiments/report_fedluar.py runs/fedluar-cnn    # → runs/fedluar-cnn/fedluar/fedluar-table.{md,csv}

The authors'-setting suites (issue 15) go through the same script with ``--suite``; several seeds
per δ give a per-δ table (mean and sample std over seeds, difference to δ = 0), and under
``client-momentum = slot`` the uplink ratio of the model alone (``model_ratio_up``: the slot
momentum records' bytes, which the runs count, taken out — what the paper's "Comm" measures)::

    fedsparse bench experiments/suites/fedluar-paper-regime.toml --out runs/fedluar-paper
    python experiments/report_fedluar.py runs/fedluar-paper --suite experiments/suites/fedluar-paper-regime.toml

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
    "split",
    "seed",
    "base",
    "delta",
    "rounds",
    "final_acc",
    "acc_last5",
    "best_acc",
    "comm_ratio_up",
    "model_ratio_up",
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
    dense_up = float(rounds["cum_dense_bytes_up"].iloc[-1])
    slot_up = float(rounds["slot_momentum_bytes_up"].sum()) if "slot_momentum_bytes_up" in rounds else 0.0
    return {
        "run": r["method"],
        "split": r["split"],
        "seed": r["seed"],
        "base": base,
        "delta": delta,
        "rounds": r["rounds"],
        "final_acc": r["final_accuracy"],
        "best_acc": r["best_accuracy"],
        # single evaluations are noisy under Dirichlet 0.1: also the mean of the last 5 evaluations
        "acc_last5": float(rounds["test_accuracy"].dropna().tail(5).mean()),
        "comm_ratio_up": r["comm_ratio_up"],
        # the model's uplink alone: without the slot-momentum records (0 bytes unless client-momentum = slot)
        "model_ratio_up": (float(rounds["cum_bytes_up"].iloc[-1]) - slot_up) / dense_up if dense_up else float("nan"),
        "comm_ratio_total": r["comm_ratio_total"],
        "mb_up": r["mb_up"],
        "mb_down": r["mb_down"],
        "recycled_per_layer": " ".join(f"{x.layer}:{x.recycled}" for x in layers.itertuples()),
        "s_per_round": float(rounds["round_seconds"].iloc[1:].mean()),
        "wall_s": r["wall_seconds"],
    }


def per_delta(table: pd.DataFrame) -> pd.DataFrame:
    """Per (split, base, δ): runs, mean and sample std over seeds of the final and last-5
    accuracies, their difference to δ = 0 of the same split and base, and the model uplink ratio."""
    rows = []
    for (split, base, delta), g in table.groupby(["split", "base", "delta"], sort=True):
        ref = table[(table["split"] == split) & (table["base"] == base) & (table["delta"] == 0)]
        rows.append(
            {
                "split": split,
                "base": base,
                "delta": delta,
                "seeds": len(g),
                "final_mean": float(g["final_acc"].mean()),
                "final_std": float(g["final_acc"].std(ddof=1)) if len(g) > 1 else float("nan"),
                "last5_mean": float(g["acc_last5"].mean()),
                "last5_std": float(g["acc_last5"].std(ddof=1)) if len(g) > 1 else float("nan"),
                "final_vs_d0": float(g["final_acc"].mean() - ref["final_acc"].mean()) if len(ref) else float("nan"),
                "last5_vs_d0": float(g["acc_last5"].mean() - ref["acc_last5"].mean()) if len(ref) else float("nan"),
                "model_ratio_up": float(g["model_ratio_up"].mean()),
            }
        )
    return pd.DataFrame(rows)


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
    deltas = per_delta(table)
    deltas.to_csv(target / "fedluar-deltas.csv", index=False)
    md = markdown(table[COLUMNS]) + "\n\n" + markdown(deltas)
    (target / "fedluar-table.md").write_text(md + "\n")
    pd.concat(layers, ignore_index=True).to_csv(target / "fedluar-layers.csv", index=False)
    plot_comparison(all_rounds, target, by="run")
    print(md)
    best = pick_best_delta(rows, args.tolerance)
    used = sorted({r["delta"] for r in rows if r["base"] != "fedavg" and r["delta"] > 0})
    print(f"\nbest δ by the sweep's rule (tolerance {args.tolerance}): {best}; the base rules' runs use δ = {used}")
    if best is not None and used and used != [best]:
        print(f"note: set the base rules' recycled-layers to {best} in {args.suite} to follow the rule")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
