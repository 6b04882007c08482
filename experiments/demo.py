"""The quick-start demo: what fedsparse is for — fewer bytes for the same accuracy.

FedAvg against FedDIP (dynamic pruning, sparse both ways), FedLUAR (layer-wise update recycling),
partial-update broadcast (the server sends only the weights that changed most) and Top-k with error
feedback (clients send the largest 10 % of their update), on one non-IID split (Fashion-MNIST,
LeNet-5, Dirichlet α = 0.5; experiments/configs/demo.toml). Every method runs through Flower's
simulation engine, each byte counted from the messages actually sent. Writes a side-by-side table,
accuracy against cumulative MB (and against rounds), and prints a short table::

    python experiments/demo.py --out runs/demo [--only fedavg,topk] [--set rounds=10]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from fedsparse import simulate
from fedsparse.results import MB, plot_comparison

CONFIG = Path(__file__).parent / "configs" / "demo.toml"
#: (label, strategy): FedAvg first, the baseline of the "× FedAvg" column.
METHODS = (
    ("FedAvg", "fedavg"),
    ("FedDIP", "feddip"),
    ("FedLUAR", "fedluar"),
    ("partial-update", "partial-update"),
    ("Top-k+EF", "topk"),
)


def summary_table(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per method: final accuracy, MB up, MB down, total MB as a multiple of FedAvg's."""
    rows = []
    for label, df in frames.items():
        last = df.iloc[-1]
        evald = df.dropna(subset=["test_accuracy"])
        rows.append(
            {
                "method": label,
                "final acc": float(evald["test_accuracy"].iloc[-1]),
                "MB up": float(last["cum_bytes_up"]) / MB,
                "MB down": float(last["cum_bytes_down"]) / MB,
            }
        )
    table = pd.DataFrame(rows)
    total = table["MB up"] + table["MB down"]
    base = total[table["method"] == METHODS[0][0]]
    table["x FedAvg"] = total / float(base.iloc[0]) if len(base) else float("nan")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of demo.toml")
    parser.add_argument("--only", help="comma-separated strategies (default: all five)")
    args = parser.parse_args()
    from fedsparse.config import ConfigError, parse_overrides

    chosen = METHODS
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in {s for _, s in METHODS}]
        if unknown:
            raise SystemExit(
                str(ConfigError(f"--only {','.join(unknown)}: allowed: {', '.join(s for _, s in METHODS)}"))
            )
        chosen = tuple(m for m in METHODS if m[1] in wanted)
    out = Path(args.out)
    frames: dict[str, pd.DataFrame] = {}
    for label, strategy in chosen:
        overrides = {**parse_overrides(args.set), "strategy": strategy}
        df = simulate(CONFIG, overrides, out_dir=out / strategy, overwrite=True)
        frames[label] = df.assign(method=label)
    both = pd.concat(frames.values(), ignore_index=True)
    both.to_csv(out / "rounds_all.csv", index=False)
    plot_comparison(both, out, by="method")
    table = summary_table(frames)
    print()
    print(
        table.to_string(
            index=False,
            formatters={
                "final acc": "{:.4f}".format,
                "MB up": "{:.2f}".format,
                "MB down": "{:.2f}".format,
                "x FedAvg": "{:.2f}x".format,
            },
        )
    )
    print(f"\nresults: {out}/<strategy>/rounds.csv, {out}/rounds_all.csv, {out}/compare_accuracy_vs_mb.png")


if __name__ == "__main__":
    main()
