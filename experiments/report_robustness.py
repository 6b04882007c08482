"""The robustness study's tables from the runs of ``experiments/suites/robustness.toml`` (reads them;
runs nothing but an optional in-process timing of the rules).

Per finished run: the method, the aggregation rule, attacked or clean, the final accuracy, the mean
of the last three evaluations, the gap to the clean run of the same method with the mean, how many
attackers were sampled a round (measured from ``messages.csv``: train messages to the (round, partition) pairs named
by ``fail-clients``), and what the run cost (median seconds a round after round 1, CPU seconds of
the run's process tree) next to the clean mean run's. ``--timing`` adds the cost of each rule
alone: ``AggregationRule.combine_updates`` on 10 updates the size of LeNet-5, timed in process::

    PYTHONPATH=. fedsparse bench experiments/suites/robustness.toml --out runs/robustness --jobs 1
    python -m experiments.report_robustness runs/robustness --timing   # → runs/robustness/robustness/

Only runs the bench counts as finished are read (``fedsparse.bench.collect``).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedsparse.bench.report import study_runs
from fedsparse.failures import parse_fail_clients

SUITE = Path(__file__).resolve().parent / "suites" / "robustness.toml"


def attackers_per_round(run_dir: Path, fail_clients: str) -> str:
    """ "mean (min-max)" attackers among a round's sampled clients, from the run's messages.csv
    ("unknown" when the run could not learn its nodes' partitions: they did not answer the
    partition query in time, and messages.csv has partition -1)."""
    rules = [r for r in parse_fail_clients(fail_clients) if r.mode == "scale"]
    if not rules:
        return "0"
    msgs = pd.read_csv(run_dir / "messages.csv")
    down = msgs[(msgs["direction"] == "down") & (msgs["message_type"].astype(str).str.contains("train"))]
    if (down["partition_id"] < 0).any():
        return f"unknown ({int((down['partition_id'] < 0).sum())} of {len(down)} messages without a partition)"
    attacking = [any(r.matches(int(rnd), int(p)) for r in rules) for rnd, p in zip(down["round"], down["partition_id"])]
    per_round = down.assign(attacking=attacking).groupby("round")["attacking"].sum().astype(int)
    return f"{per_round.mean():.1f} ({per_round.min()}-{per_round.max()})"


def table(out: Path) -> pd.DataFrame | None:
    found = study_runs(out, SUITE)
    if found is None:
        return None
    suite, rounds, runs, _ = found
    rows = []
    for _, r in runs.iterrows():
        method, rule, state = str(r["method"]).split("-", 2)
        over = suite.methods[r["method"]]
        evals = rounds[rounds["run"] == r["run"]]["test_accuracy"].dropna()
        rows.append(
            {
                "method": method,
                "rule": rule,
                "run": state,
                "final_acc": float(r["final_accuracy"]),
                "acc_last3": float(evals.tail(3).mean()),
                "attackers_per_round": attackers_per_round(out / r["run"], str(over.get("fail-clients", ""))),
                "s_per_round": float(r["round_seconds_median"]),
                "cpu_s": float(r["run_cpu_seconds"]),
            }
        )
    df = pd.DataFrame(rows)
    for method in df["method"].unique():
        clean = df[(df["method"] == method) & (df["rule"] == "mean") & (df["run"] == "clean")]
        mine = df["method"] == method
        if clean.empty:
            df.loc[mine, ["gap_pts", "cpu_vs_clean_mean"]] = math.nan
            continue
        ref = clean.iloc[0]
        df.loc[mine, "gap_pts"] = 100 * (df.loc[mine, "acc_last3"] - ref["acc_last3"])
        df.loc[mine, "cpu_vs_clean_mean"] = df.loc[mine, "cpu_s"] / ref["cpu_s"]
    return df


def timing(repeats: int = 20) -> pd.DataFrame:
    """Seconds per combination of 10 LeNet-5-sized updates, per rule, and the ratio to the mean."""
    import torch

    from fedsparse.models import build_model
    from fedsparse.robust import AggregationRule

    model = build_model("lenet5", 10, 1, 28)
    rng = np.random.default_rng(0)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    updates = [{k: rng.normal(size=s) * 1e-2 for k, s in shapes.items()} for _ in range(10)]
    weights = [6000.0] * 10
    rules = {
        "mean": AggregationRule("mean"),  # Flower's weighted mean (a run with the plain mean uses its own)
        "median": AggregationRule("median"),
        "trimmed": AggregationRule("trimmed-mean", trim_beta=0.2),
        "krum": AggregationRule("krum", num_malicious=2),
        "multikrum": AggregationRule("multikrum", num_malicious=2),
        "bulyan": AggregationRule("bulyan", num_malicious=1),
        "clipauto": AggregationRule("mean", clip_norm="auto"),
    }
    torch.set_num_threads(1)
    out = []
    for name, rule in rules.items():
        rule.combine_updates(updates, weights)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            rule.combine_updates(updates, weights)
        out.append({"rule": name, "ms_per_round": 1000 * (time.perf_counter() - t0) / repeats})
    df = pd.DataFrame(out)
    df["vs_mean"] = df["ms_per_round"] / float(df.loc[df["rule"] == "mean", "ms_per_round"].iloc[0])
    return df


def markdown(df: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub table of ``df`` (floats to ``digits`` places)."""

    def cell(v: Any) -> str:
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the bench's --out directory")
    parser.add_argument("--timing", action="store_true", help="also time each rule alone, in process")
    args = parser.parse_args(argv)
    df = table(args.out)
    target = args.out / "robustness"
    target.mkdir(parents=True, exist_ok=True)
    if df is not None:
        df.to_csv(target / "robustness-table.csv", index=False)
        text = markdown(df)
        (target / "robustness-table.md").write_text(text + "\n")
        print(text)
    if args.timing:
        t = timing()
        t.to_csv(target / "rule-timing.csv", index=False)
        print(markdown(t, 3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
