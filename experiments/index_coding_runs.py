"""What golomb index coding moved in whole runs: the same runs with and without it, side by side.

    FEDSPARSE_INDEX_KINDS=bitmap,coords fedsparse bench experiments/suites/fmnist-lenet5.toml \\
        --only feddp,feddip,partial-update,topk-ef,dgc,sbc,smartidx,snip --seeds 0 --jobs 2 \\
        --out runs/bench-fmnist-lenet5-nogolomb
    python -m experiments.index_coding_runs runs/bench-fmnist-lenet5 runs/bench-fmnist-lenet5-nogolomb

Indices are lossless, so a run trained with the codec's older index kinds (bitmap or coordinate
list, ``FEDSPARSE_INDEX_KINDS``) must be the same run: every ``rounds.csv`` cell except bytes and
wall-clock time is checked equal first, and a run that differs elsewhere is reported, not counted.
Then, per method and split: MB up and down with golomb available (the default) and without, and
the ratio. Figures are payload bytes as metered, from each run's ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

if __package__ in (None, ""):  # run as a script: python experiments/index_coding_runs.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.diff_rounds import TIMING, compare  # noqa: E402


def moved_by_coding(columns: list[str]) -> tuple[str, ...]:
    """The columns a change of index coding may move: payload and wire sizes, the ratios built on
    them, and the methods' own byte and index-kind reports (partial-update's ``index_kinds``,
    ``index_bytes_down``...). The dense reference sizes must stay equal, and so must the Shannon
    bounds, which depend on the masks only."""
    return tuple(
        c
        for c in columns
        if ("bytes" in c and "dense" not in c and "shannon" not in c)
        or c.startswith("comm_ratio")
        or c == "index_kinds"
    )


def table(with_golomb: Path, without: Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per run found in both trees; the problems (runs whose training differs) beside it."""
    rows, problems = [], []
    for rounds in sorted(without.glob("*/rounds.csv")):
        name = rounds.parent.name
        other = with_golomb / name / "rounds.csv"
        if not other.exists() or not (other.parent / "summary.json").exists():
            problems.append(f"{name}: no finished run of that name in {with_golomb}")
            continue
        columns = list(pd.read_csv(rounds, nrows=0).columns)
        same, how = compare(other, rounds, TIMING + moved_by_coding(columns))
        if not same:
            problems.append(f"{name}: training differs ({how})")
            continue
        a = json.loads((other.parent / "summary.json").read_text())
        b = json.loads((rounds.parent / "summary.json").read_text())
        method, split, _seed = name.split("--")
        rows.append(
            {
                "method": method,
                "split": split,
                "index_kinds": b["environment"].get("index_kinds", "?"),
                "final_acc": a["final_accuracy"],
                "mb_up": a["mb_up"],
                "mb_up_before": b["mb_up"],
                "x_up": a["mb_up"] / b["mb_up"],
                "mb_down": a["mb_down"],
                "mb_down_before": b["mb_down"],
                "x_down": a["mb_down"] / b["mb_down"],
                "x_total": a["mb_total"] / b["mb_total"],
            }
        )
    return pd.DataFrame(rows), problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("with_golomb", type=Path, help="bench --out of the default runs")
    parser.add_argument(
        "without", type=Path, help="bench --out of the runs made with FEDSPARSE_INDEX_KINDS=bitmap,coords"
    )
    args = parser.parse_args(argv)
    df, problems = table(args.with_golomb, args.without)
    for line in problems:
        print("!", line)
    if df.empty:
        print("no run found in both trees", file=sys.stderr)
        return 1
    if (df["index_kinds"] == "bitmap,coords,golomb").any():
        print("! some 'without' runs recorded golomb among their index kinds: was FEDSPARSE_INDEX_KINDS set?")
    print(f"{len(df)} runs, training identical to the default runs in every non-byte column")
    fmt = {c: "{:.3f}".format for c in ("x_up", "x_down", "x_total")} | {
        c: "{:.2f}".format for c in ("mb_up", "mb_up_before", "mb_down", "mb_down_before")
    }
    print(df.drop(columns=["index_kinds"]).to_string(index=False, formatters=fmt))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
