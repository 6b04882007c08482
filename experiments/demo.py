"""The quick-start demo: FedAvg vs FedProx on Fashion-MNIST (LeNet-5, Dirichlet α=0.5).

Runs both through Flower's simulation engine, then writes a side-by-side table and plots::

    python experiments/demo.py --out runs/demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from fedsparse import simulate
from fedsparse.results import plot_comparison

CONFIG = Path(__file__).parent / "configs" / "demo.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of demo.toml")
    args = parser.parse_args()
    from fedsparse.config import parse_overrides

    out = Path(args.out)
    frames = []
    for strategy in ("fedavg", "fedprox"):
        overrides = {**parse_overrides(args.set), "strategy": strategy}
        frames.append(simulate(CONFIG, overrides, out_dir=out / strategy))
    df = pd.concat(frames, ignore_index=True)
    df.to_csv(out / "rounds_all.csv", index=False)
    plot_comparison(df, out)
    last = df.sort_values("round").groupby("strategy").tail(1)
    table = last[["strategy", "round", "test_accuracy", "cum_bytes_up", "cum_bytes_down", "elapsed_seconds"]]
    print(table.to_string(index=False))
    print(f"\nresults: {out}/<strategy>/rounds.csv, {out}/rounds_all.csv, {out}/compare_accuracy_vs_*.png")


if __name__ == "__main__":
    main()
