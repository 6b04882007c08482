"""What checkpointing costs: checkpoint size, save / load time, client-state files, per strategy.

For each strategy, one short run on Flower's simulation engine with ``checkpoint-every = 1``
(LeNet-5 on Fashion-MNIST, 20 clients, 5 per round, 5 rounds, 20 local steps), then, in this
process, the checkpoint the run left is loaded and saved again 5 times to time both. Prints a
markdown table and writes it (with the command) to ``--report``::

    python experiments/run_reliability.py [--rounds 5] [--strategies fedavg,feddip,fedluar,partial-update]
        [--out runs/reliability] [--report experiments/results/reliability.md]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

BASE = {
    "dataset": "fashion-mnist",
    "model": "lenet5",
    "num-clients": 20,
    "clients-per-round": 5,
    "local-steps": 20,
    "batch-size": 32,
    "lr": 0.05,
    "momentum": 0.9,
    "checkpoint-every": 1,
    "eval-every": 5,
    "seed": 0,
}
EXTRA = {"fedluar": {"persist-momentum": True}}


def measure(strategy: str, rounds: int, out: Path) -> dict:
    from fedsparse import simulate
    from fedsparse.checkpoint import CHECKPOINT_FILE, CLIENT_STATE_DIR, load_checkpoint, save_checkpoint

    run_dir = out / strategy
    df = simulate(
        {**BASE, **EXTRA.get(strategy, {}), "strategy": strategy, "rounds": rounds}, out_dir=run_dir, progress=False
    )
    size = (run_dir / CHECKPOINT_FILE).stat().st_size
    states = list((run_dir / CLIENT_STATE_DIR).glob("*.rd")) if (run_dir / CLIENT_STATE_DIR).is_dir() else []
    loads, saves = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        saved = load_checkpoint(run_dir)
        loads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        save_checkpoint(run_dir, saved)
        saves.append(time.perf_counter() - t0)
    dense = int(df["cum_dense_bytes_down"].iloc[0] / df["clients"].iloc[0])  # one dense model, payload bytes
    return {
        "strategy": strategy,
        "rounds": rounds,
        "checkpoint_kb": size / 1e3,
        "model_kb": dense / 1e3,
        "save_ms": 1e3 * statistics.median(saves),
        "load_ms": 1e3 * statistics.median(loads),
        "client_files": len(states),
        "client_state_kb": sum(p.stat().st_size for p in states) / 1e3,
        "final_accuracy": float(df["test_accuracy"].dropna().iloc[-1]),
    }


def table(rows: list[dict]) -> str:
    head = (
        "| strategy | rounds | checkpoint (kB) | dense model (kB) | save (ms) | load (ms) | client-state files kept | "
        "client state on disk (kB) |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {r['rounds']} | {r['checkpoint_kb']:.1f} | {r['model_kb']:.1f} | {r['save_ms']:.1f} | "
            f"{r['load_ms']:.1f} | {r['client_files']} | {r['client_state_kb']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--strategies", default="fedavg,feddip,fedluar,partial-update")
    parser.add_argument("--out", default="runs/reliability")
    parser.add_argument("--report", default="")
    args = parser.parse_args()
    rows = [measure(s, args.rounds, Path(args.out)) for s in args.strategies.split(",")]
    text = table(rows)
    print(text)
    if args.report:
        command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        Path(args.report).write_text(
            "# Checkpoint cost\n\n"
            f"Produced by `{command}` (LeNet-5, Fashion-MNIST, 20 clients, 5 per round, checkpoint-every = 1).\n\n"
            + text
            + "\n"
        )


if __name__ == "__main__":
    main()
