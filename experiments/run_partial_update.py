"""Issue 5's measurement grid for the partial-update broadcast (deep partial updating, DPU, in FL).

MNIST / MLP 2×512, 50 clients, 10 per round, IID, 100 rounds: FedAvg (dense broadcast) vs the
partial broadcast with k ∈ {0.005, 0.01, 0.05, 0.1} × contribution ∈ {combined, global, random};
then k = 0.05 on Fashion-MNIST / LeNet-5, and 8-bit values; plus two ablations (dense first
contact instead of the seed rebuild, residual instead of rewind). Every run uses the same
federation and local training (lr 0.05, 1 local epoch, batch 64, seed 0); runs go one after
another (each starts its own Ray), and a run whose ``summary.json`` exists is not repeated.

    FEDSPARSE_DATA=/work/shared/data .venv/bin/python experiments/run_partial_update.py \
        [--grid main|adam] [--lr LR] [--out runs/partial-update] [--only mnist-fedavg ...] \
        [--rounds N] [--table PATH.md] [--list]

Prints the results table (markdown) at the end and writes it to ``--table`` (default
``OUT/table.md``), with ``OUT/table.csv`` and the comparison plots next to it.

``--grid adam`` is the **Adam ablation**: with plain-SGD clients the local contribution
−Σ g⊙Δw is lr·Σg², a noisier copy of the δ² ranking, so GCPU (global) can match or beat DPU
(combined); the paper trains with Adam. The ablation reruns MNIST / MLP FedAvg, combined and
global at k ∈ {0.01, 0.05} with ``optimizer = "adam"`` clients (``--lr``, default 1e-3, torch's
Adam default; the main grid's SGD lr 0.05 is far above Adam's usual range), otherwise the same
federation and local training, into ``runs/partial-update/adam/`` unless ``--out`` says otherwise
(its own runs, ``table.md``, ``table.csv`` and plot)::

    FEDSPARSE_DATA=/work/shared/data .venv/bin/python experiments/run_partial_update.py --grid adam
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "experiments" / "configs"
MNIST = CONFIGS / "partial-mnist-mlp.toml"
FMNIST = CONFIGS / "partial-fmnist-lenet5.toml"


GRIDS = ("main", "adam")
ADAM_LR = 1e-3


def grid(name: str = "main", lr: float | None = None) -> list[tuple[str, Path, dict[str, Any]]]:
    """(run name, config file, overrides) in the order they run; ``name`` picks the grid (``main``:
    issue 5's grid, ``adam``: the Adam ablation, with client learning rate ``lr``)."""
    if name == "adam":
        return adam_grid(ADAM_LR if lr is None else lr)
    if name != "main":
        raise ValueError(f"unknown grid {name!r}; choose one of: {', '.join(GRIDS)}")
    if lr is not None:
        raise ValueError("--lr applies to --grid adam only (the main grid keeps the configs' lr 0.05)")
    runs: list[tuple[str, Path, dict[str, Any]]] = [("mnist-fedavg", MNIST, {"strategy": "fedavg"})]
    for k in (0.005, 0.01, 0.05, 0.1):
        for contribution in ("combined", "global", "random"):
            runs.append((f"mnist-{contribution}-k{k}", MNIST, {"update-ratio": k, "contribution": contribution}))
    runs.append(("mnist-combined-k0.05-8bit", MNIST, {"update-ratio": 0.05, "value-bits": 8}))
    runs.append(("fmnist-fedavg", FMNIST, {"strategy": "fedavg"}))
    for contribution in ("combined", "global", "random"):
        runs.append((f"fmnist-{contribution}-k0.05", FMNIST, {"update-ratio": 0.05, "contribution": contribution}))
    runs.append(("fmnist-combined-k0.05-8bit", FMNIST, {"update-ratio": 0.05, "value-bits": 8}))
    # ablations
    runs.append(("mnist-combined-k0.05-denseinit", MNIST, {"update-ratio": 0.05, "initial-sync": "dense"}))
    runs.append(("mnist-combined-k0.05-residual", MNIST, {"update-ratio": 0.05, "after-broadcast": "residual"}))
    return runs


def adam_grid(lr: float) -> list[tuple[str, Path, dict[str, Any]]]:
    """The Adam ablation: MNIST / MLP FedAvg, combined (DPU) and global (GCPU) at k ∈ {0.01, 0.05},
    Adam clients with learning rate ``lr``; everything else as the main grid's MNIST runs."""
    adam = {"optimizer": "adam", "lr": lr}
    runs: list[tuple[str, Path, dict[str, Any]]] = [("mnist-adam-fedavg", MNIST, {"strategy": "fedavg", **adam})]
    for k in (0.01, 0.05):
        for contribution in ("combined", "global"):
            runs.append((f"mnist-adam-{contribution}-k{k}", MNIST, {"update-ratio": k, "contribution": contribution, **adam}))
    return runs


def run_all(out: Path, only: set[str] | None, rounds: int | None, runs: list[tuple[str, Path, dict[str, Any]]]) -> None:
    from fedsparse import simulate

    for name, config, overrides in runs:
        if only and name not in only:
            continue
        target = out / name
        if (target / "summary.json").is_file():
            print(f"[skip] {name}: {target}/summary.json exists", flush=True)
            continue
        extra = dict(overrides)
        if rounds is not None:
            extra["rounds"] = rounds
        started = time.time()
        print(f"[run ] {name}: {config.name} {extra}", flush=True)
        df = simulate(config, extra, out_dir=target, progress=False)
        last = df.iloc[-1]
        print(
            f"[done] {name}: accuracy {last['test_accuracy']:.4f}, downlink ratio {last['comm_ratio_down']:.4f}, "
            f"{(time.time() - started) / 60:.1f} min",
            flush=True,
        )


def _row(name: str, run_dir: Path) -> dict[str, Any] | None:
    import pandas as pd

    if not (run_dir / "summary.json").is_file():
        return None
    summary = json.loads((run_dir / "summary.json").read_text())
    df = pd.read_csv(run_dir / "rounds.csv")
    cfg_text = (run_dir / "config.toml").read_text()
    import tomllib

    cfg = tomllib.loads(cfg_text)
    last = df.iloc[-1]
    partial = cfg["strategy"] == "partial-update"
    row: dict[str, Any] = {
        "run": name,
        "data / model": f"{cfg['dataset']} / {cfg['model']}",
        "method": (
            "FedAvg"
            if not partial
            else {"combined": "DPU (combined)", "global": "GCPU (global)", "random": "RPU (random)", "local": "local"}[
                cfg["contribution"]
            ]
        ),
        "k": cfg["update-ratio"] if partial else 1.0,
        "bits": cfg["value-bits"] if partial else 32,
        "optimizer": cfg.get("optimizer", "sgd"),
        "lr": cfg["lr"],
        "final acc %": 100 * float(last["test_accuracy"]),
        "best acc %": 100 * float(summary["best_accuracy"]),
        "down ratio": float(last["comm_ratio_down"]),
        "down MB": float(last["cum_bytes_down"]) / 1e6,
        "up ratio": float(last["comm_ratio_up"]),
        "wall min": float(last["elapsed_seconds"]) / 60,
    }
    if partial:
        row["fresh ratio"] = _fresh_ratio(run_dir, df)
        patch = float(df["patch_bytes_down"].sum())
        row["Shannon / measured"] = float(df["shannon_bound_bytes"].sum()) / patch if patch else math.nan
        idx = float(df["index_bytes_down"].sum())
        row["index / H(k) bound"] = idx / float(df["shannon_index_bytes"].sum()) if idx else math.nan
        row["dense resyncs"] = int(df["clients_dense"].sum())
        row["mean lag"] = float(df["mean_version_lag"].iloc[len(df) // 2 :].mean())
        row["init"] = cfg["initial-sync"]
        row["after"] = cfg["after-broadcast"]
    return row


def _fresh_ratio(run_dir: Path, df: "Any") -> float:
    """The per-round DPU broadcast alone: mean measured payload of a `fresh` message (a client that
    took part in the previous round gets exactly that round's k·I change) / the dense message.

    In a round with fresh patches the smallest downlink message is a fresh one (a catch-up patch
    holds a superset of its positions, a dense one the whole model), so it is read from
    messages.csv as each such round's minimum.
    """
    import pandas as pd

    msgs = pd.read_csv(run_dir / "messages.csv")
    down = msgs[msgs["direction"] == "down"].groupby("round")["payload_bytes"].min()
    rounds = df.loc[df["patch_kinds"].fillna("").str.contains("fresh:"), "round"]
    dense = float(df["cum_dense_bytes_down"].iloc[0]) / float(df["clients"].iloc[0])
    values = down.reindex(rounds).dropna()
    return float(values.mean()) / dense if len(values) else math.nan


def table(out: Path, runs: list[tuple[str, Path, dict[str, Any]]]) -> "Any":
    import pandas as pd

    rows = [r for name, _, _ in runs if (r := _row(name, out / name)) is not None]
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    base = {r["data / model"]: r["final acc %"] for r in rows if r["method"] == "FedAvg"}
    df.insert(df.columns.get_loc("best acc %"), "Δ vs FedAvg (pt)", [r["final acc %"] - base.get(r["data / model"], math.nan) for r in rows])
    return df


def to_markdown(df: "Any") -> str:
    cols = list(df.columns)
    fmt = {
        "k": "{:g}", "bits": "{:d}", "lr": "{:g}", "final acc %": "{:.2f}", "Δ vs FedAvg (pt)": "{:+.2f}", "best acc %": "{:.2f}",
        "down ratio": "{:.4f}", "fresh ratio": "{:.4f}", "down MB": "{:.1f}", "up ratio": "{:.3f}", "wall min": "{:.1f}",
        "Shannon / measured": "{:.3f}", "index / H(k) bound": "{:.2f}", "dense resyncs": "{:.0f}", "mean lag": "{:.2f}",
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


def plots(out: Path, grid_name: str = "main") -> list[Path]:
    """Accuracy vs round and vs cumulative downlink MB for the k = 0.05 MNIST runs and FedAvg
    (``adam``: every run of the Adam ablation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    paths = []
    groups = {
        "mnist-adam": [name for name, _, _ in adam_grid(ADAM_LR)],
    } if grid_name == "adam" else {
        "mnist": ["mnist-fedavg", "mnist-combined-k0.05", "mnist-global-k0.05", "mnist-random-k0.05",
                  "mnist-combined-k0.01", "mnist-combined-k0.05-8bit"],
        "fmnist": ["fmnist-fedavg", "fmnist-combined-k0.05", "fmnist-global-k0.05", "fmnist-random-k0.05",
                   "fmnist-combined-k0.05-8bit"],
    }
    for group, names in groups.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name in names:
            path = out / name / "rounds.csv"
            if not path.is_file():
                continue
            df = pd.read_csv(path).dropna(subset=["test_accuracy"])
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
        p = out / f"compare_{group}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=GRIDS, default="main", help="main: issue 5's grid; adam: the Adam ablation")
    parser.add_argument("--lr", type=float, help=f"client lr of --grid adam (default {ADAM_LR:g})")
    parser.add_argument(
        "--out", type=Path, help="output directory (default runs/partial-update, and runs/partial-update/adam for --grid adam)"
    )
    parser.add_argument("--only", nargs="*", help="run names to run (default: all); see --list")
    parser.add_argument("--rounds", type=int, help="override rounds (for a quick smoke run)")
    parser.add_argument("--table", type=Path, help="markdown table output (default OUT/table.md)")
    parser.add_argument("--list", action="store_true", help="list the run names and exit")
    parser.add_argument("--report-only", action="store_true", help="only build the table from existing runs")
    args = parser.parse_args()
    if args.lr is not None and args.grid != "adam":
        parser.error("--lr applies to --grid adam only")
    runs = grid(args.grid, args.lr)
    if args.out is None:
        args.out = ROOT / "runs" / "partial-update"
        if args.grid == "adam":
            args.out = args.out / "adam"
    if args.only:
        unknown = sorted(set(args.only) - {name for name, _, _ in runs})
        if unknown:
            parser.error(f"not in --grid {args.grid}: {', '.join(unknown)} (see --list)")
    if args.list:
        print(f"# grid {args.grid} -> {args.out}")
        for name, config, overrides in runs:
            print(name, config.name, overrides)
        return
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run_all(args.out, set(args.only) if args.only else None, args.rounds, runs)
    df = table(args.out, runs)
    if df.empty:
        print("no finished runs yet")
        return
    df.to_csv(args.out / "table.csv", index=False)
    md = to_markdown(df)
    (args.table or args.out / "table.md").write_text(md + "\n")
    plots(args.out, args.grid)
    print(md)


if __name__ == "__main__":
    main()
