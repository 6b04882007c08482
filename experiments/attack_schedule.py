"""The ``fail-clients`` value for "exactly k of the sampled clients attack in every round".

Which clients a round samples depends only on the seed, ``num-clients`` and ``clients-per-round``
(``fedsparse.server.seeded_sampling`` over the nodes in partition order), not on the method. This
reads the sampled partitions of each round from a finished run's ``messages.csv`` with those
settings and names, for every round, the k sampled partitions with the lowest ids as attackers::

    python -m experiments.attack_schedule runs/robustness/fedavg-mean-clean--iid--s0 --k 2
    # -> "1:3:scale 1:5:scale 2:0:scale ..."  (the suite's fail-clients)

``experiments/report_robustness.py`` counts, from each attacked run's own ``messages.csv``, how
many attackers its rounds really had, so a run whose sampling differed would show it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def schedule(run_dir: Path, k: int, mode: str = "scale") -> str:
    """``ROUND:PARTITION:MODE`` items: per round, the ``k`` lowest sampled partition ids."""
    if k < 1:
        raise ValueError(f"k = {k}; allowed: k >= 1")
    msgs = pd.read_csv(run_dir / "messages.csv")
    down = msgs[(msgs["direction"] == "down") & msgs["message_type"].astype(str).str.contains("train")]
    if (down["partition_id"] < 0).any():
        raise ValueError(f"{run_dir}: some messages have no partition id (the partition query failed); use another run")
    items = []
    for server_round, parts in down.groupby("round")["partition_id"]:
        chosen = sorted(int(p) for p in parts.unique())
        if len(chosen) < k:
            raise ValueError(f"{run_dir}: round {server_round} sampled {len(chosen)} clients, fewer than k = {k}")
        items += [f"{server_round}:{p}:{mode}" for p in chosen[:k]]
    return " ".join(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run with the suite's seed and sampling")
    parser.add_argument("--k", type=int, default=2, help="attackers a round (default 2)")
    parser.add_argument("--mode", default="scale", help="the fail-clients mode (default scale)")
    args = parser.parse_args()
    print(schedule(args.run_dir, args.k, args.mode))


if __name__ == "__main__":
    main()
