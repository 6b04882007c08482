"""FedLUAR measurement grid (issue 4): δ sweep over FedAvg, then LUAR over FedAdam and FedProx.

Runs one configuration after another on Flower's simulation engine (never in parallel), skips runs
whose ``summary.json`` already exists and continues an interrupted one from its checkpoint
(``--checkpoint-every``), then prints a markdown table and writes ``table.csv`` / ``table.md`` / ``layers.csv`` and comparison plots under ``--out``::

    python experiments/run_fedluar.py --out runs/fedluar                 # the measured grid
    python experiments/run_fedluar.py --config experiments/configs/fedluar-fmnist-cnn.toml \\
        --out runs/fedluar-cnn                                           # the paper's CNN (slow)

Every figure comes from the runs' own files: accuracy is the central test accuracy at the last
round, ``comm_ratio_up`` is measured uplink bytes / the bytes of the dense model FedAvg would have
sent from the same replies (rounds.csv), the per-layer counts are luar_layers.csv.

Grid: δ ∈ --deltas over ``luar-base = fedavg``; then for each base in --bases, δ = 0 (the base
itself, bit for bit) and δ = the best δ of the sweep (the largest uplink saving whose accuracy is
within --tolerance of δ = 0; --best-delta overrides it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "fedluar-fmnist-lenet5.toml"
# Server-optimiser settings per base (luar-server-lr etc.); FedProx's mu as in the paper (Table 7).
BASE_SETTINGS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedprox": {"proximal-mu": 0.001},
    "fedadam": {"luar-server-lr": 0.01},
    "fedyogi": {"luar-server-lr": 0.01},
    "fedavgm": {"luar-server-momentum": 0.9},
}


def run_one(config: Path, overrides: dict[str, Any], out: Path) -> dict[str, Any]:
    """One simulation (skipped when its summary exists); its summary plus the run directory."""
    from fedsparse import simulate

    from fedsparse.checkpoint import CHECKPOINT_FILE

    summary_path = out / "summary.json"
    if not summary_path.is_file():
        if (out / CHECKPOINT_FILE).is_file():  # interrupted: continue from its last checkpoint
            simulate(resume=out, progress=True)
        else:
            simulate(config, overrides, out_dir=out, progress=True)
    summary = json.loads(summary_path.read_text())
    summary["out_dir"] = str(out)
    return summary


def row_of(label: str, base: str, delta: int, summary: dict[str, Any]) -> dict[str, Any]:
    rounds = pd.read_csv(Path(summary["out_dir"]) / "rounds.csv")
    layers = pd.read_csv(Path(summary["out_dir"]) / "luar_layers.csv")
    return {
        "run": label,
        "base": base,
        "delta": delta,
        "rounds": summary["rounds"],
        "final_acc": summary["final_accuracy"],
        "best_acc": summary["best_accuracy"],
        # single evaluations are noisy under Dirichlet 0.1: also the mean of the last 5 evaluations
        "acc_last5": float(rounds["test_accuracy"].dropna().tail(5).mean()),
        "comm_ratio_up": summary["comm_ratio_up"],
        "comm_ratio_total": summary["comm_ratio_total"],
        "mb_up": summary["mb_up"],
        "mb_down": summary["mb_down"],
        "recycled_per_layer": " ".join(f"{r.layer}:{r.recycled}" for r in layers.itertuples()),
        "s_per_round": float(rounds["round_seconds"].iloc[1:].mean()),
        "wall_s": summary["wall_seconds"],
    }


def markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table (floats to 4 decimals) without extra dependencies."""
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def pick_best_delta(rows: list[dict[str, Any]], tolerance: float) -> int:
    """The δ with the lowest uplink ratio whose final accuracy is within ``tolerance`` of δ = 0."""
    ref = next(r for r in rows if r["delta"] == 0)["final_acc"]
    ok = [r for r in rows if r["delta"] > 0 and r["final_acc"] >= ref - tolerance]
    if not ok:
        return min((r for r in rows if r["delta"] > 0), key=lambda r: ref - r["final_acc"])["delta"]
    return min(ok, key=lambda r: r["comm_ratio_up"])["delta"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, default=Path("runs/fedluar"))
    parser.add_argument("--deltas", default="0,1,2,3")
    parser.add_argument("--bases", default="fedadam,fedprox", help="bases run at δ = 0 and the best δ")
    parser.add_argument("--best-delta", type=int, default=None)
    parser.add_argument("--tolerance", type=float, default=0.01, help="accuracy drop allowed for the best δ")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of --config")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="checkpoint every N rounds; an interrupted run resumes")
    args = parser.parse_args()
    from fedsparse.config import parse_overrides
    from fedsparse.results import plot_comparison

    common = {"checkpoint-every": args.checkpoint_every, **parse_overrides(args.set)}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for delta in [int(d) for d in args.deltas.split(",") if d.strip()]:
        label = f"fedavg-d{delta}"
        s = run_one(args.config, {**common, "luar-base": "fedavg", "recycled-layers": delta}, args.out / label)
        rows.append(row_of(label, "fedavg", delta, s))
    best = args.best_delta if args.best_delta is not None else pick_best_delta(rows, args.tolerance)
    for base in [b for b in args.bases.split(",") if b.strip()]:
        for delta in (0, best):
            label = f"{base}-d{delta}"
            over = {**common, **BASE_SETTINGS[base], "luar-base": base, "recycled-layers": delta}
            rows.append(row_of(label, base, delta, run_one(args.config, over, args.out / label)))

    table = pd.DataFrame(rows)
    table.to_csv(args.out / "table.csv", index=False)
    cols = ["run", "base", "delta", "rounds", "final_acc", "acc_last5", "best_acc", "comm_ratio_up", "comm_ratio_total", "mb_up", "recycled_per_layer", "s_per_round"]
    md = markdown(table[cols])
    (args.out / "table.md").write_text(md + "\n")
    layers = pd.concat(
        [pd.read_csv(args.out / r["run"] / "luar_layers.csv").assign(run=r["run"]) for r in rows], ignore_index=True
    )
    layers.to_csv(args.out / "layers.csv", index=False)
    frames = [pd.read_csv(args.out / r["run"] / "rounds.csv").assign(run=r["run"]) for r in rows]
    plot_comparison(pd.concat(frames, ignore_index=True), args.out, by="run")
    print(md)
    print(f"\nbest δ = {best}; results in {args.out}/<run>/, table in {args.out}/table.md")


if __name__ == "__main__":
    main()
