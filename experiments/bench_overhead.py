"""What does running on Flower's simulation engine cost over a plain PyTorch loop?

The same FedAvg workload two ways, in one run so the figures compare:

1. ``fedsparse.simulate``: ServerApp + ClientApps on Flower's Ray backend (messages, metering);
2. a plain loop in this process: the same sampled clients, trained one after another with the
   same train step, averaged, then the same central evaluation.

LeNet-5 on Fashion-MNIST, 50 clients, 10 per round, 1 local epoch; rounds 2–6 are timed (round 1
pays for Ray's start and the actors' imports). Prints both times and the ratio::

    python experiments/bench_overhead.py [--rounds 6] [--clients-per-round 10]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

import torch

from clients.local import derive_seed
from clients.train import evaluate, iterate_batches, make_optimizer, train_steps
from fedsparse import simulate
from fedsparse.clientdata import client_data, dataset_for, partitions_for
from fedsparse.config import resolve_config, round_lr
from fedsparse.grid import seeded_sampling
from fedsparse.server import initial_model


def plain_loop(cfg: dict, timed_from: int, threads: int) -> tuple[float, float]:
    """FedAvg in one process; returns (seconds for rounds >= timed_from, final accuracy)."""
    torch.set_num_threads(threads)
    data = dataset_for(cfg)
    sizes = [len(p) for p in partitions_for(cfg)]
    model = initial_model(cfg)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    elapsed, acc = 0.0, float("nan")
    for server_round in range(1, int(cfg["rounds"]) + 1):
        t0 = time.perf_counter()
        with seeded_sampling(int(cfg["seed"]), server_round):  # the same draw Flower's FedAvg makes
            chosen = random.sample(range(int(cfg["num-clients"])), int(cfg["clients-per-round"]))
        total = sum(sizes[p] for p in chosen)
        acc_state = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        for pid in chosen:
            model.load_state_dict(global_state)
            images, labels = client_data(cfg, pid)
            gen = torch.Generator().manual_seed(derive_seed("batches", cfg["seed"], server_round, pid))
            batches = iterate_batches(
                images, labels, int(cfg["batch-size"]), gen, data.normalize, epochs=int(cfg["local-epochs"])
            )
            train_steps(model, batches, make_optimizer(model, round_lr(cfg, server_round)))
            for k, v in model.state_dict().items():
                acc_state[k] += v.double() * (sizes[pid] / total)
        global_state = {k: v.to(global_state[k].dtype) for k, v in acc_state.items()}
        model.load_state_dict(global_state)
        _, acc = evaluate(
            model, data.test_images, data.test_labels, data.normalize, batch_size=int(cfg["eval-batch-size"])
        )
        if server_round >= timed_from:
            elapsed += time.perf_counter() - t0
    return elapsed, acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--client-cpus", type=float, default=1.0)
    args = parser.parse_args()
    cfg = resolve_config(
        {
            "dataset": "fashion-mnist",
            "model": "lenet5",
            "num-clients": 50,
            "clients-per-round": args.clients_per_round,
            "rounds": args.rounds,
            "local-epochs": 1,
            "batch-size": 64,
            "lr": 0.01,
            "client-cpus": args.client_cpus,
        }
    )
    with tempfile.TemporaryDirectory() as out:
        df = simulate(cfg, out_dir=out, progress=False)
    flower_s = float(df.loc[df["round"] >= 2, "round_seconds"].sum())
    cores = os.cpu_count() or 1
    actors = int(cores // float(cfg["client-cpus"]))
    n = args.rounds - 1
    print(
        f"workload: LeNet-5 / Fashion-MNIST, {args.clients_per_round} clients/round, 1 local epoch, rounds 2-{args.rounds}, {cores} cores"
    )
    print(
        f"fedsparse run (Flower simulation on Ray, {actors} actors x {int(float(cfg['client-cpus']))} thread): "
        f"{flower_s:7.2f} s ({flower_s / n:.2f} s/round), final acc {df['test_accuracy'].iloc[-1]:.4f}"
    )
    for threads in sorted({1, cores}):
        plain_s, plain_acc = plain_loop(cfg, timed_from=2, threads=threads)
        print(
            f"plain PyTorch loop (one process, clients in sequence, {threads} thread(s)): "
            f"{plain_s:7.2f} s ({plain_s / n:.2f} s/round), final acc {plain_acc:.4f}; ratio fedsparse/plain {flower_s / plain_s:.2f}"
        )


if __name__ == "__main__":
    main()
