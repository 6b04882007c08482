"""Cross-device scale: what does one client message cost in fedsparse against a plain PyTorch loop?

The workload of most FL papers: many clients per round, each doing little work. MNIST, LeNet-5,
1,000 clients, 100 per round, 2 local steps of batch 64, central evaluation every round
(``--size 10000x1000``: 10,000 clients, 1,000 per round). Two ways, in one run, on the same cores:

1. ``fedsparse.simulate``: ServerApp + ClientApps on Flower's Ray backend (messages, metering,
   reply screening), ``client-cpus`` CPUs per actor;
2. a plain loop in this process, one thread: the same sampled clients trained one after another
   with the same train step and data, averaged, then the same central evaluation.

Round 1 pays Ray's start and the actors' imports, so rounds 2..R are timed. Printed:

* s/round of both, and the *ideal*: the plain one-thread loop ÷ cores (perfect parallelism, no
  framework);
* the ratio fedsparse ÷ ideal, and the extra wall time per client message,
  (fedsparse − ideal) ÷ clients per round;
* peak RSS: of fedsparse's whole process tree (this process, Ray's GCS / raylet / workers, every
  actor), the sum over processes sampled twice a second, and the same sum of PSS (shared pages
  split between the processes that map them: what the tree really occupies); and this process's
  peak during the plain loop.

Re-run on a quiet machine (it prints the command line it was given)::

    FEDSPARSE_DATA=/work/shared/data python experiments/bench_scale.py               # 1,000 x 100
    FEDSPARSE_DATA=/work/shared/data python experiments/bench_scale.py --size 10000x1000 --rounds 3
    python experiments/bench_scale.py --strategy topk --size 10000x1000 --rounds 3 --skip-plain

``--json FILE`` also writes the figures as JSON; ``--set KEY=VALUE`` overrides any run key.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from clients.local import derive_seed
from clients.train import iterate_batches, optimizer_from_config, train_steps
from fedsparse import simulate
from fedsparse.clientdata import client_data, dataset_for, partitions_for
from fedsparse.config import Config, parse_overrides, resolve_config, round_lr
from fedsparse.global_model import evaluate, initial_model
from fedsparse.grid import seeded_sampling

SIZES = {"1000x100": (1000, 100), "10000x1000": (10_000, 1000)}


def workload(num_clients: int, per_round: int, rounds: int, extra: Mapping[str, Any] | None = None) -> Config:
    """The cross-device configuration (the issue's workload), resolved."""
    return resolve_config(
        {
            "dataset": "mnist",
            "model": "lenet5",
            "partition": "iid",
            "num-clients": num_clients,
            "clients-per-round": per_round,
            "rounds": rounds,
            "local-steps": 2,
            "batch-size": 64,
            "lr": 0.05,
            "eval-every": 1,
            "client-cpus": 1.0,
            **dict(extra or {}),
        }
    )


# ------------------------------------------------------------------------------- memory sampling
def _proc_tree(root: int) -> list[int]:
    """``root`` and every descendant (Ray's GCS, raylet, workers and actors are all below the driver)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024 if hasattr(os, "sysconf") else 4


def _rss_kib(pid: int | str) -> int:
    """Resident set size of ``pid`` in KiB (``/proc/PID/statm``: cheap), 0 if it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
    except (OSError, ValueError, IndexError):
        return 0


def _pss_kib(pid: int | str) -> int:
    """Proportional set size of ``pid`` in KiB (``/proc/PID/smaps_rollup``: walks the page tables,
    so sampled less often), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def _cpu_and_kind(pid: int) -> tuple[tuple[int, int], float, str] | None:
    """((pid, start time), CPU seconds so far, kind) of a process: ``driver`` (this process: the
    ServerApp's round loop, metering, evaluation and Flower's simulation engine threads),
    ``actor`` (a Ray worker running ClientApps) or ``ray`` (GCS, raylet, agents, monitors)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    cpu = (float(fields[11]) + float(fields[12])) / CLOCK_TICKS
    if pid == os.getpid():
        kind = "driver"
    elif b"ClientAppActor" in cmd or b"default_worker.py" in cmd:
        kind = "actor"
    else:
        kind = "ray"
    return (pid, int(fields[19])), cpu, kind


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class TreeSampler:
    """Samples a process tree in a background thread: peak Σ RSS (every ``every`` s), peak Σ PSS
    (every ``pss_every`` samples) and CPU seconds per kind of process (see :func:`_cpu_and_kind`).

    Σ RSS counts shared pages (torch's libraries, the read-only dataset pages) once per process that
    maps them; Σ PSS splits them. With ``rounds_csv`` and ``rounds``, CPU is also snapshotted when
    the table first holds one round and when it holds them all (to within one sample): the CPU of
    the timed rounds, robust to whatever else loads the machine, unlike wall time.
    """

    def __init__(
        self,
        root: int | None = None,
        every: float = 0.5,
        pss_every: int = 8,
        rounds_csv: Path | None = None,
        rounds: int = 0,
    ) -> None:
        self.root = os.getpid() if root is None else root
        self.every, self.pss_every = every, pss_every
        self.rounds_csv, self.rounds = rounds_csv, rounds
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.cpu: dict[tuple[int, int], tuple[str, float]] = {}
        self.marks: dict[str, dict[str, float]] = {}
        self.available = Path("/proc/self/statm").is_file()
        self._samples = 0
        #: CPU seconds this sampler's own thread spent (it runs in the driver process)
        self.own_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def cpu_by_kind(self) -> dict[str, float]:
        """CPU seconds so far per kind of process; the driver's less this sampler's own thread,
        which reads /proc of every process in the driver process and is the benchmark, not fedsparse."""
        out = {"driver": 0.0, "actor": 0.0, "ray": 0.0}
        for kind, seconds in self.cpu.values():
            out[kind] += seconds
        out["driver"] = max(out["driver"] - self.own_cpu, 0.0)
        return out

    def _rows(self) -> int:
        if self.rounds_csv is None:
            return 0
        try:
            return max(len(self.rounds_csv.read_text().splitlines()) - 1, 0)
        except OSError:
            return 0

    def sample(self, pss: bool = True) -> None:
        pids = _proc_tree(self.root)
        self.peak_rss = max(self.peak_rss, sum(_rss_kib(p) for p in pids))
        if pss:
            self.peak_pss = max(self.peak_pss, sum(_pss_kib(p) for p in pids))
        self.peak_procs = max(self.peak_procs, len(pids))
        for pid in pids:
            got = _cpu_and_kind(pid)
            if got is not None:
                self.cpu[got[0]] = (got[2], got[1])
        if self.rounds_csv is not None:
            rows = self._rows()
            if rows >= 1 and "first" not in self.marks:
                self.marks["first"] = self.cpu_by_kind()
            if self.rounds and rows >= self.rounds and "last" not in self.marks:
                self.marks["last"] = self.cpu_by_kind()

    def timed_cpu(self) -> dict[str, float] | None:
        """CPU seconds per kind between the first and the last round's end (None if not seen)."""
        if "first" not in self.marks or "last" not in self.marks:
            return None
        return {k: self.marks["last"][k] - self.marks["first"][k] for k in self.marks["last"]}

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._samples += 1
            started = time.thread_time()
            self.sample(pss=self._samples % self.pss_every == 0)
            self.own_cpu += time.thread_time() - started

    def __enter__(self) -> TreeSampler:
        if self.available:
            self.sample()
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.available:
            self.sample()


# ----------------------------------------------------------------------------------- plain loop
def plain_loop(cfg: Config, timed_from: int, threads: int = 1) -> tuple[list[float], list[float], float]:
    """FedAvg over the same sampled clients in this process; (wall seconds and CPU seconds of each
    round >= timed_from, final accuracy). No messages, no framework: the floor the simulation is
    measured against."""
    torch.set_num_threads(threads)
    data = dataset_for(cfg)
    sizes = [len(p) for p in partitions_for(cfg)]
    model = initial_model(cfg)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    times, cpus, acc = [], [], math.nan
    for server_round in range(1, int(cfg["rounds"]) + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        with seeded_sampling(int(cfg["seed"]), server_round):  # the draw Flower's FedAvg makes
            chosen = random.sample(range(int(cfg["num-clients"])), int(cfg["clients-per-round"]))
        total = sum(sizes[p] for p in chosen)
        acc_state = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        for pid in chosen:
            model.load_state_dict(global_state)
            images, labels = client_data(cfg, pid)
            torch.manual_seed(derive_seed("torch", cfg["seed"], server_round, pid))
            gen = torch.Generator().manual_seed(derive_seed("batches", cfg["seed"], server_round, pid))
            batches = iterate_batches(
                images,
                labels,
                int(cfg["batch-size"]),
                gen,
                data.normalize,
                epochs=int(cfg["local-epochs"]),
                steps=int(cfg["local-steps"]),
            )
            train_steps(model, batches, optimizer_from_config(model, round_lr(cfg, server_round), cfg))
            for k, v in model.state_dict().items():
                acc_state[k] += v.double() * (sizes[pid] / total)
        global_state = {k: v.to(global_state[k].dtype) for k, v in acc_state.items()}
        model.load_state_dict(global_state)
        _, acc = evaluate(
            model, data.test_images, data.test_labels, data.normalize, batch_size=int(cfg["eval-batch-size"])
        )
        if server_round >= timed_from:
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    return times, cpus, acc


# ---------------------------------------------------------------------------------------- bench
def measure(
    cfg: Config,
    *,
    out_dir: str | Path | None = None,
    plain: bool = True,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run both and return the figures (see the module docstring); nothing is asserted about speed."""
    rounds = int(cfg["rounds"])
    timed_from = 2 if rounds >= 2 else 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_round = int(cfg["clients-per-round"])
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        target = Path(out_dir) if out_dir is not None else Path(tmp) / "run"
        t0 = time.perf_counter()
        with TreeSampler(rounds_csv=target / "rounds.csv", rounds=rounds) as mem:
            df = simulate(cfg, out_dir=target, progress=False, overwrite=True)
        wall = time.perf_counter() - t0
    timed = df[df["round"] >= timed_from]
    fed = float(timed["round_seconds"].mean())
    cpu = mem.timed_cpu() if timed_from == 2 else None
    n_timed = rounds - 1
    out: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cores": cores,
        "num_clients": int(cfg["num-clients"]),
        "clients_per_round": per_round,
        "rounds": rounds,
        "timed_rounds": f"{timed_from}-{rounds}",
        "strategy": str(cfg["strategy"]),
        "client_cpus": float(cfg["client-cpus"]),
        "client_gpus": float(cfg["client-gpus"]),
        "fedsparse_s_per_round": fed,
        "fedsparse_first_round_s": float(df["round_seconds"].iloc[0]),
        "fedsparse_wall_s": wall,
        "fedsparse_final_accuracy": float(df["test_accuracy"].iloc[-1]),
        "fedsparse_peak_rss_mib": mem.peak_rss / 1024,
        "fedsparse_peak_pss_mib": mem.peak_pss / 1024,
        "fedsparse_peak_processes": mem.peak_procs,
    }
    if cpu is not None:
        out["fedsparse_cpu_s_per_round"] = {k: v / n_timed for k, v in cpu.items()}
        out["fedsparse_cpu_ms_per_client_message"] = {k: 1000 * v / n_timed / per_round for k, v in cpu.items()}
    report(
        f"fedsparse (Flower simulation on Ray, {cfg['strategy']}, client-cpus={cfg['client-cpus']}, "
        f"client-gpus={cfg['client-gpus']}): {fed:.3f} s/round (rounds {out['timed_rounds']}), round 1 "
        f"{out['fedsparse_first_round_s']:.1f} s, final acc {out['fedsparse_final_accuracy']:.4f}; peak of the "
        f"process tree ({mem.peak_procs} processes): RSS {out['fedsparse_peak_rss_mib']:.0f} MiB, "
        f"PSS {out['fedsparse_peak_pss_mib']:.0f} MiB"
    )
    if cpu is not None:
        per = out["fedsparse_cpu_ms_per_client_message"]
        report(
            "fedsparse CPU per client message (timed rounds, sampled from /proc): "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in per.items())
            + " (driver = round loop, metering, evaluation, Flower's engine threads, not this benchmark's sampler;"
            + " actor = ClientApp + Ray worker)"
        )
    if plain:
        before = _rss_kib("self")
        with TreeSampler(every=0.25) as own:
            times, cpus, acc = plain_loop(cfg, timed_from, threads=1)
        loop = sum(times) / len(times)
        plain_cpu = sum(cpus) / len(cpus)
        ideal = loop / cores
        out.update(
            {
                "plain_1thread_s_per_round": loop,
                "plain_final_accuracy": acc,
                "plain_peak_rss_mib": own.peak_rss / 1024,
                "plain_rss_before_mib": before / 1024,
                "ideal_s_per_round": ideal,
                "ratio_to_ideal": fed / ideal,
                "ms_per_client_message": 1000 * (fed - ideal) / per_round,
                "plain_cpu_s_per_round": plain_cpu,
            }
        )
        if cpu is not None:
            extra_cpu = sum(cpu.values()) / n_timed - plain_cpu
            out["cpu_ms_per_client_message_over_plain"] = 1000 * extra_cpu / per_round
            report(
                f"CPU per round: fedsparse {sum(cpu.values()) / n_timed:.3f} s (all processes), plain loop "
                f"{plain_cpu:.3f} s: {out['cpu_ms_per_client_message_over_plain']:+.2f} ms of CPU per client message"
            )
        report(
            f"plain PyTorch loop (this process, 1 thread): {loop:.3f} s/round, final acc {acc:.4f}; "
            f"ideal on {cores} cores: {ideal:.3f} s/round"
        )
        report(
            f"ratio fedsparse / ideal: {out['ratio_to_ideal']:.2f}; extra per client message: "
            f"{out['ms_per_client_message']:+.1f} ms (({fed:.3f} - {ideal:.3f}) s / {per_round} messages)"
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1000x100", help=f"CLIENTSxPER_ROUND: {', '.join(SIZES)} or any NxM")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (round 1 is not timed; default 5)")
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--client-cpus", type=float, default=1.0)
    parser.add_argument("--client-gpus", type=float, default=0.0)
    parser.add_argument("--skip-plain", action="store_true", help="run fedsparse only")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run key (repeatable)")
    parser.add_argument("--out", help="keep fedsparse's run directory here (default: a temporary one)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    try:
        clients, per_round = SIZES.get(args.size) or tuple(int(x) for x in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size {args.size!r}: allowed: {', '.join(SIZES)} or CLIENTSxPER_ROUND (e.g. 50x10)")
    extra = {
        "strategy": args.strategy,
        "client-cpus": args.client_cpus,
        "client-gpus": args.client_gpus,
        **parse_overrides(args.set),
    }
    cfg = workload(clients, per_round, args.rounds, extra)
    print(
        f"workload: MNIST / LeNet-5, {clients} clients, {per_round} per round, {cfg['local-steps']} local steps "
        f"of batch {cfg['batch-size']}, central evaluation every round; {args.rounds} rounds"
    )
    figures = measure(cfg, out_dir=args.out, plain=not args.skip_plain)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
