"""The SmartIdx study's tables from the runs of ``experiments/suites/smartidx.toml`` (reads them; runs nothing).

The appendix's Table 2/3 comparison at reduced scale, per dataset (the suite's splits) and model:
sparse ratio SR (the fraction of entries sent, measured on the decoded updates: ``uplink_nonzero_fraction``
averaged over rounds), final accuracy, uplink compression ratio CR (dense float32 uplink bytes of the
replies received over the bytes actually sent, over the whole run), uplink bits per sent entry, the
replies received and failed (clients lost to the machine), and rounds to the target accuracy — by default, per dataset
and model, the highest accuracy that every method of that group reaches at some evaluation (so each
method has a round count; ``--target`` fixes one instead). And SmartIdx's bytes by package and part
(index, value, sign of IP / KP / PP, the appendix's Figure 4), summed over the run::

    fedsparse bench experiments/suites/smartidx.toml --out runs/bench-smartidx --jobs 2
    python -m experiments.report_smartidx runs/bench-smartidx   # → runs/bench-smartidx/smartidx/*.md|csv

Only finished runs are read (``fedsparse.bench.collect``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pandas as pd

from fedsparse.bench.report import study_runs

SUITE = Path(__file__).resolve().parent / "suites" / "smartidx.toml"
PACKAGES = ("ip", "kp", "pp")
PARTS = ("index", "value", "sign")


def _model_and_method(name: str) -> tuple[str, str]:
    method, _, model = name.partition("-")
    return model, method


def _rounds_to(df: pd.DataFrame, target: float) -> float:
    evals = df.dropna(subset=["test_accuracy"])
    hit = evals[evals["test_accuracy"] >= target - 1e-12]
    return float(hit["round"].iloc[0]) if len(hit) else math.nan


def comparison(all_rounds: pd.DataFrame, target: float | None) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    for (split, name), df in all_rounds.groupby(["split", "method"], sort=False):
        df = df.sort_values("round")
        model, method = _model_and_method(str(name))
        last = df.iloc[-1]
        rows.append(
            {
                "dataset": split,
                "model": model,
                "method": method,
                "rounds": int(last["round"]),
                "SR": float(df["uplink_nonzero_fraction"].mean()),
                "final_acc": float(df["test_accuracy"].dropna().iloc[-1]),
                "best_acc": float(df["test_accuracy"].max()),
                "CR": float(last["cum_dense_bytes_up"] / last["cum_bytes_up"]),
                # uplink bits per entry sent: bytes over Σ_t SR_t · (entries of the round's replies),
                # the entries taken as the dense float32 bytes / 4 (npy headers make it ~0.1 % high)
                "bits_per_sent": float(
                    8
                    * last["cum_bytes_up"]
                    / (
                        df["uplink_nonzero_fraction"]
                        * df["cum_dense_bytes_up"].diff().fillna(df["cum_dense_bytes_up"])
                        / 4
                    ).sum()
                ),
                "replies": int(df["replies"].sum()),
                "failures": int(df["failures"].sum()),
                "MB_up": float(last["cum_bytes_up"] / 1e6),
                "_df": df,
            }
        )
    out = pd.DataFrame(rows)
    out["target_acc"] = math.nan
    out["rounds_to_target"] = math.nan
    targets = []
    for _, group in out.groupby(["dataset", "model"], sort=False):
        t = target if target is not None else float(group["best_acc"].min())
        for i in group.index:
            targets.append((i, t, _rounds_to(out.at[i, "_df"], t)))
    for i, t, r in targets:
        out.at[i, "target_acc"] = t
        out.at[i, "rounds_to_target"] = r
    return out.drop(columns="_df")


def packages(all_rounds: pd.DataFrame) -> pd.DataFrame:
    rows = []
    smart = all_rounds[all_rounds["compressor"] == "smartidx"]
    for (split, name), df in smart.groupby(["split", "method"], sort=False):
        model, method = _model_and_method(str(name))
        row: dict[str, Any] = {"dataset": split, "model": model, "method": method}
        for p in PACKAGES:
            for q in PARTS:
                row[f"{p}_{q}_kB"] = float(df[f"smartidx_{p}_{q}"].sum() / 1e3)
        row["header_kB"] = float(df["smartidx_header"].sum() / 1e3)
        total = sum(v for k, v in row.items() if k.endswith("_kB"))
        row["index_share"] = sum(row[f"{p}_index_kB"] for p in PACKAGES) / total
        for p in PACKAGES:
            row[f"{p}_entries_per_round"] = float(df[f"smartidx_{p}_entries"].mean())
        row["kp_kernels_per_round"] = float(df["smartidx_kp_kernels"].mean())
        row["pp_kernels_per_round"] = float(df["smartidx_pp_kernels"].mean())
        row["pp_patterns_per_round"] = float(df["smartidx_pp_patterns"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table (floats to 4 significant digits; pandas' own needs tabulate)."""

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="the bench's --out directory")
    parser.add_argument("--suite", type=Path, default=SUITE)
    parser.add_argument("--target", type=float, default=None, help="one target accuracy for every group")
    args = parser.parse_args(argv)
    found = study_runs(args.out_dir, args.suite)
    if found is None:
        return 1
    _, all_rounds, _, target_dir = found
    table = comparison(all_rounds, args.target)
    pkg = packages(all_rounds)
    table.to_csv(target_dir / "smartidx-table.csv", index=False)
    pkg.to_csv(target_dir / "smartidx-packages.csv", index=False)
    text = (
        "## SmartIdx vs SBC vs DGC\n\n"
        + markdown(table)
        + "\n\n## SmartIdx bytes by package (whole run, all clients)\n\n"
        + markdown(pkg)
        + "\n"
    )
    (target_dir / "smartidx-table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
