"""FedDIP measurement grid (issue 3): LeNet-5 / Fashion-MNIST, N = 50, K = 5, L = 5 epochs, batch 64,
lr 0.01, s0 = 0.5, sp = 0.9, R = 5, Q = 10, λ_max = 1e-3, T = ``--rounds`` (200 by default).

* IID: FedAvg vs FedDP (λ = 0) vs FedDIP.
* Pathological non-IID (2 classes per client): FedAvg vs FedProx vs FedDIP+Prox (μ = 0.01).

The runs go one after another (never in parallel: the machine is shared), each through
``fedsparse run`` in its own process, into ``OUT/<setting>-<method>/``; a run whose
``summary.json`` already holds the requested number of rounds is not repeated, and one that was
interrupted continues from its checkpoint (``checkpoint-every``, ``fedsparse run --resume``). At the end the script prints a Markdown table (also written to ``OUT/table.md``) and
writes ``OUT/<setting>_compare_accuracy_vs_*.png``::

    python experiments/run_feddip.py --out runs/feddip-t200            # the whole grid
    python experiments/run_feddip.py --out runs/feddip-t200 --only iid-feddip
    python experiments/run_feddip.py --out runs/feddip-t200 --table-only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"
PATHOLOGICAL = ["partition=\"pathological\"", "classes-per-client=2"]

# (setting, method label, config file, extra overrides)
GRID: list[tuple[str, str, str, list[str]]] = [
    ("iid", "FedAvg", "fedavg-fmnist-lenet5.toml", []),
    ("iid", "FedDP", "feddp-fmnist-lenet5.toml", []),
    ("iid", "FedDIP", "feddip-fmnist-lenet5.toml", []),
    ("noniid", "FedAvg", "fedavg-fmnist-lenet5.toml", PATHOLOGICAL),
    ("noniid", "FedProx", "fedprox-fmnist-lenet5-noniid.toml", []),
    ("noniid", "FedDIP+Prox", "feddip-prox-fmnist-lenet5-noniid.toml", []),
]


def run_name(setting: str, method: str) -> str:
    return f"{setting}-{method.lower().replace('+', '-')}"


def command(config: str, extra: list[str], common: list[str], out: Path) -> list[str]:
    cmd = [str(ROOT / ".venv" / "bin" / "fedsparse"), "run", str(Path("experiments/configs") / config)]
    for item in [*common, *extra]:
        cmd += ["--set", item]
    return cmd + ["--out", str(out)]


def done(out: Path, rounds: int) -> bool:
    path = out / "summary.json"
    return path.is_file() and int(json.loads(path.read_text()).get("rounds", 0)) == rounds


def mean_top5(df: pd.DataFrame) -> float:
    """The paper's Table V metric: mean of the five highest test accuracies during the run."""
    return float(df["test_accuracy"].dropna().nlargest(5).mean())


def best_within_budget(df: pd.DataFrame, budget_mb: float) -> float:
    """The paper's Table IV view: best test accuracy reached before moving ``budget_mb`` MB (up + down)."""
    moved = (df["cum_bytes_up"] + df["cum_bytes_down"]) / 1e6
    within = df.loc[moved <= budget_mb, "test_accuracy"].dropna()
    return float(within.max()) if len(within) else float("nan")


def table(out_root: Path, budget_mb: float = 250.0) -> pd.DataFrame:
    rows = []
    for setting, method, _, _ in GRID:
        out = out_root / run_name(setting, method)
        if not (out / "summary.json").is_file():
            continue
        s = json.loads((out / "summary.json").read_text())
        df = pd.read_csv(out / "rounds.csv")
        rows.append(
            {
                "setting": setting,
                "method": method,
                "rounds": s["rounds"],
                "final acc": 100 * s["final_accuracy"],
                "best acc": 100 * s["best_accuracy"],
                "best round": s["best_round"],
                "top-5 mean acc": 100 * mean_top5(df),
                f"best acc ≤ {budget_mb:g} MB": 100 * best_within_budget(df, budget_mb),
                "final sparsity": s.get("final_sparsity", float("nan")),  # NaN: a dense method
                "MB down": s["mb_down"],
                "MB up": s["mb_up"],
                "down / FedAvg": s["comm_ratio_down"],
                "up / FedAvg": s["comm_ratio_up"],
                "wall min": s["wall_seconds"] / 60,
            }
        )
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame) -> str:
    fmt = {
        **{c: "{:.2f}" for c in df.columns if c.startswith("best acc ≤")},
        "final acc": "{:.2f}", "best acc": "{:.2f}", "top-5 mean acc": "{:.2f}", "final sparsity": "{:.4f}",
        "MB down": "{:.1f}", "MB up": "{:.1f}", "down / FedAvg": "{:.3f}", "up / FedAvg": "{:.3f}", "wall min": "{:.0f}",
    }
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = ["dense" if c == "final sparsity" and pd.isna(r[c]) else fmt.get(c, "{}").format(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_tables(out_root: Path) -> str:
    """Per-layer final sparsity (the paper's Figure 5) of every pruning run, as Markdown."""
    parts = []
    for setting, method, _, _ in GRID:
        path = out_root / run_name(setting, method) / "feddip_layer_sparsity.csv"
        if not path.is_file():
            continue
        layers = pd.read_csv(path)
        lines = [f"{setting} / {method}:", "", "| layer | weights | kept | initial (ERK) sparsity | final sparsity |", "|---|---|---|---|---|"]
        for _, r in layers.iterrows():
            lines.append(f"| {r['layer']} | {r['numel']} | {r['kept']} | {r['initial_sparsity']:.3f} | {r['sparsity']:.3f} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plots(out_root: Path) -> None:
    from fedsparse.results import plot_comparison

    for setting in sorted({g[0] for g in GRID}):
        frames = []
        for s, method, _, _ in GRID:
            path = out_root / run_name(s, method) / "rounds.csv"
            if s == setting and path.is_file():
                frames.append(pd.read_csv(path).assign(strategy=method))
        if frames:
            target = out_root / f"{setting}_compare"
            target.mkdir(parents=True, exist_ok=True)
            plot_comparison(pd.concat(frames, ignore_index=True), target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/feddip-t200", help="where the runs go")
    parser.add_argument("--rounds", type=int, default=200, help="T: rounds of every run (and FedDIP's schedule)")
    parser.add_argument("--eval-every", type=int, default=5, help="central evaluation every N rounds (and the last)")
    parser.add_argument("--client-cpus", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=10, help="checkpoint every N rounds; an interrupted run resumes")
    parser.add_argument("--only", action="append", help="run only these (e.g. iid-feddip); repeatable")
    parser.add_argument("--table-only", action="store_true", help="do not run; tabulate what is there")
    parser.add_argument("--budget-mb", type=float, default=250.0, help="communication budget (MB up + down) of the budget column")
    args = parser.parse_args()

    out_root = Path(args.out)
    common = [
        f"rounds={args.rounds}", f"eval-every={args.eval_every}", f"client-cpus={args.client_cpus}", f"seed={args.seed}",
        f"checkpoint-every={args.checkpoint_every}",
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    if not args.table_only:
        for setting, method, config, extra in GRID:
            name = run_name(setting, method)
            if args.only and name not in args.only:
                continue
            out = out_root / name
            if done(out, args.rounds):
                print(f"[skip] {name}: already has {args.rounds} rounds in {out}")
                continue
            if (out / "checkpoint.npz").is_file():  # an interrupted run: continue from its checkpoint
                cmd = [str(ROOT / ".venv" / "bin" / "fedsparse"), "run", "--resume", str(out)]
            else:
                cmd = command(config, extra, common, out)
            print("[run]", " ".join(cmd), flush=True)
            t0 = time.time()
            subprocess.run(cmd, cwd=ROOT, env=env, check=True)
            print(f"[done] {name} in {(time.time() - t0) / 60:.1f} min", flush=True)
    df = table(out_root, args.budget_mb)
    if df.empty:
        sys.exit(f"no finished runs under {out_root}")
    md = to_markdown(df)
    layers = layer_tables(out_root)
    if layers:
        md += "\n\n" + layers
    (out_root / "table.md").write_text(md + "\n")
    df.to_csv(out_root / "table.csv", index=False)
    plots(out_root)
    print(md)


if __name__ == "__main__":
    main()
