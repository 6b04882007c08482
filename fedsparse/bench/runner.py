"""Running a suite: a share of the cores per concurrent run, one ``fedsparse run`` subprocess per run,
and :func:`run_suite`, which runs what is not finished yet and then rewrites the reports.

Why a subprocess per run: each run starts and stops its own Ray instance, so a crash or a leaked
actor stays inside one run. Why slots: with ``--jobs N`` each run is pinned to its own ⌊cores/N⌋
cores and told so (Ray's CPU count, one thread per client), so N runs never oversubscribe the
machine.

An unfinished run directory is continued from its checkpoint when it holds one of the same
configuration (:func:`~fedsparse.bench.status.resume_point`: ``fedsparse run --resume``); any other is
cleared and run from round 1.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsparse.bench.report import fmt_seconds, report_dir, write_reports
from fedsparse.bench.status import (
    DONE_FILE,
    RESTART_QUIETLY,
    USAGE_FILE,
    finished_run,
    read_json_object,
    resume_point,
    run_outputs,
    run_status,
    write_marker,
)
from fedsparse.bench.suite import RunSpec, Suite, available_methods, resolve_runs
from fedsparse.config import Config, ConfigError, to_toml


@dataclass(frozen=True)
class Slot:
    """A share of the machine one concurrent run uses: its cores (None = no pinning)."""

    index: int
    cores: tuple[int, ...] | None


def make_slots(jobs: int) -> list[Slot]:
    """``jobs`` disjoint core sets of ⌊cores/jobs⌋ cores (jobs = 1: the whole machine, unpinned)."""
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: allowed: an integer >= 1")
    if jobs == 1:
        return [Slot(0, None)]
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = list(range(os.cpu_count() or 1))
    if jobs > len(cores):
        raise ConfigError(f"--jobs {jobs} exceeds the {len(cores)} cores available; allowed: 1 .. {len(cores)}")
    per = len(cores) // jobs
    return [Slot(i, tuple(cores[i * per : (i + 1) * per])) for i in range(jobs)]


def slot_config(cfg: Config, slot: Slot) -> Config:
    """The run's configuration on a slot: one CPU per client when the slot is a share of the machine."""
    if slot.cores is None:
        return dict(cfg)
    return {**cfg, "client-cpus": 1.0}


def slot_env(slot: Slot, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of a run on ``slot``: Ray and torch see only the slot's cores."""
    env = dict(os.environ if base is None else base)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    if slot.cores is not None:
        n = str(len(slot.cores))
        env["RAY_OVERRIDE_RESOURCES"] = json.dumps({"CPU": len(slot.cores)})
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = n
    return env


#: ``runner(spec, cfg, run_dir, slot) -> exit code``. ``run_dir`` is empty, or holds an unfinished
#: run of ``cfg`` with a checkpoint to continue from (a runner that cannot resume starts it over).
Runner = Callable[[RunSpec, Config, Path, Slot], int]


def run_command(cfg_path: Path, run_dir: Path, ray_address: str | None = None) -> list[str]:
    """The ``fedsparse run`` command of a run: from round 1 into ``run_dir``, or, when ``run_dir``
    holds a checkpoint (:func:`run_suite` keeps one only if it belongs to this configuration),
    ``--resume run_dir`` — with ``cfg_path`` given too, so ``fedsparse run`` itself refuses a
    checkpoint of another configuration instead of continuing it."""
    from fedsparse.checkpoint import CHECKPOINT_FILE

    where = ["--resume", str(run_dir)] if (run_dir / CHECKPOINT_FILE).is_file() else ["--out", str(run_dir)]
    ray = ["--ray-address", ray_address] if ray_address else []
    return [sys.executable, "-m", "fedsparse.cli", "run", str(cfg_path), *where, *ray, "--quiet"]


def subprocess_runner(spec: RunSpec, cfg: Config, run_dir: Path, slot: Slot, *, ray_address: str | None = None) -> int:
    """Run ``fedsparse run`` in a child process (pinned to the slot's cores); log to ``bench.log``
    (appended to: a resumed run keeps the log of its interrupted attempt). ``ray_address``: join that
    Ray instance (``--shared-ray``) instead of starting one."""
    cfg_path = run_dir / "bench-config.toml"
    cfg_path.write_text(to_toml({k: v for k, v in cfg.items() if k != "out-dir"}))
    cmd = run_command(cfg_path, run_dir, ray_address)
    cores = slot.cores

    def pin() -> None:  # runs in the child before exec
        if cores is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)

    with (run_dir / "bench.log").open("a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=slot_env(slot), preexec_fn=pin)
        meter = TreeCPU(proc.pid)
        try:
            while proc.poll() is None:
                meter.sample()
                time.sleep(1.0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    (run_dir / USAGE_FILE).write_text(json.dumps({"cpu_seconds": meter.total()}) + "\n")
    return int(proc.returncode)


class TreeCPU:
    """CPU seconds (user + system) used by a process and all its descendants — the run's Python
    process, Ray's GCS / raylet and the client actors — read from ``/proc`` once a second.

    A process's last sample counts, so each process may miss up to a second of CPU at its end. This
    is what a run costs whatever else the machine is doing (wall time is not: it grows with load).
    NaN where ``/proc`` is not available.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[tuple[int, int], float] = {}
        self.available = Path("/proc/self/stat").is_file()
        self.tick = os.sysconf("SC_CLK_TCK") if self.available else 100

    @staticmethod
    def _stat(pid: str) -> tuple[int, float, int] | None:
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
        # fields[1] = ppid, [11] = utime, [12] = stime, [19] = starttime (clock ticks)
        return int(fields[1]), float(fields[11]) + float(fields[12]), int(fields[19])

    def sample(self) -> None:
        if not self.available:
            return
        stats = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                st = self._stat(entry)
                if st is not None:
                    stats[int(entry)] = st
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        stack = [self.root]
        while stack:
            pid = stack.pop()
            if pid in stats:
                _, ticks, start = stats[pid]
                self.seen[(pid, start)] = ticks / self.tick
            stack.extend(children.get(pid, []))

    def total(self) -> float:
        return float(sum(self.seen.values())) if self.available else math.nan


@dataclass
class BenchResult:
    """What one :func:`run_suite` call did: runs run, skipped as finished, failed; the reports."""

    out_dir: Path
    ran: list[str]
    skipped: list[str]
    failed: list[str]
    summary: Any  # pandas DataFrame
    files: list[Path]


def _prepare(run_dir: Path, resume_from: int | None) -> None:
    """An empty run directory, or — for a resumed run — the same one without what a previous
    attempt of the bench left: a stale marker must not outlive a failed resume."""
    if resume_from is None:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
    else:
        for name in (DONE_FILE, USAGE_FILE):
            (run_dir / name).unlink(missing_ok=True)


def run_suite(
    suite: Suite,
    out_dir: str | Path,
    *,
    jobs: int = 1,
    methods: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    skip_unavailable: bool = False,
    runner: Runner | None = None,
    report: Callable[[str], None] = print,
    command: str = "",
    shared_ray: bool = False,
) -> BenchResult:
    """Run what is not done yet (continuing runs that stopped after a checkpoint), then (re)write
    the tables, report and plots from every finished run.

    ``shared_ray``: the runs join one Ray head started for the suite (:mod:`fedsparse.bench.sharedray`)
    instead of each starting its own; ``jobs`` must be 1 (pinned slots need a Ray per slot)."""
    if shared_ray:
        if jobs != 1:
            raise ConfigError(f"--shared-ray with --jobs {jobs}: allowed: --jobs 1 (one head for runs in sequence)")
        if runner is not None:
            raise ConfigError("shared_ray applies to the subprocess runner only")
        from fedsparse.bench.sharedray import SharedRay

        with contextlib.ExitStack() as stack:
            head: SharedRay | None = None
            address = ""

            def shared(spec: RunSpec, cfg: Config, run_dir: Path, slot: Slot) -> int:
                nonlocal head, address
                if head is None:  # started on the first run that needs it: none when all are done
                    head = SharedRay()
                    address = stack.enter_context(head)
                    report(f"[bench] shared Ray head at {address} for this suite's runs")
                return subprocess_runner(spec, cfg, run_dir, slot, ray_address=address)

            return run_suite(
                suite,
                out_dir,
                jobs=jobs,
                methods=methods,
                splits=splits,
                seeds=seeds,
                skip_unavailable=skip_unavailable,
                runner=shared,
                report=report,
                command=command,
            )
    out_dir = Path(out_dir)
    if skip_unavailable:
        have, missing = available_methods(suite)
        if missing:
            report(f"[bench] skipping methods whose strategy is not registered: {', '.join(missing)}")
        methods = [m for m in (methods or list(suite.methods)) if m in have]
        if not methods:
            raise ConfigError("no method of this suite has a registered strategy")
    specs = suite.runs(methods, splits, seeds)
    configs = resolve_runs(specs)
    slots = make_slots(jobs)
    runner = runner or subprocess_runner
    out_dir.mkdir(parents=True, exist_ok=True)

    todo: list[tuple[RunSpec, str, int | None]] = []
    skipped: list[str] = []
    for spec in specs:
        done, why = run_status(out_dir / spec.name, configs[spec.name])
        if done:
            skipped.append(spec.name)
            continue
        resume_from, why_not = resume_point(out_dir / spec.name, configs[spec.name])
        if resume_from is not None:
            why += f"; resuming from its round-{resume_from} checkpoint"
        elif why_not not in RESTART_QUIETLY:
            why += f"; {why_not}, starting over"
        todo.append((spec, why, resume_from))
    report(
        f"[bench] {suite.name}: {len(specs)} runs ({len(skipped)} already done, {len(todo)} to run), "
        f"jobs={jobs}"
        + (f" ({len(slots[0].cores)} core(s) each)" if slots[0].cores else "")
        + f", results in {out_dir}"
    )
    free: queue.Queue[Slot] = queue.Queue()
    for slot in slots:
        free.put(slot)
    lock = threading.Lock()
    ran: list[str] = []
    failed: list[str] = []
    walls: list[float] = []
    started = time.monotonic()
    width = len(str(len(todo)))

    def one(i: int, spec: RunSpec, why: str, resume_from: int | None) -> None:
        slot = free.get()
        try:
            run_dir = out_dir / spec.name
            _prepare(run_dir, resume_from)
            with lock:
                report(f"[{i:>{width}}/{len(todo)}] start {spec.method} / {spec.split} / seed {spec.seed} ({why})")
            t0 = time.monotonic()
            cfg = slot_config(configs[spec.name], slot)
            try:
                code = runner(spec, cfg, run_dir, slot)
            except Exception as err:  # noqa: BLE001 - a run's failure must not stop the suite
                with (run_dir / "bench.log").open("a") as log:
                    log.write(f"\nrunner raised: {err!r}\n")
                code = -1
            wall = time.monotonic() - t0
            failure = f"exit {code}"
            done_run = None
            if code == 0:
                summary, problem = run_outputs(run_dir)
                if summary is None:
                    failure = f"exit 0, but {problem}"
                else:
                    extra, _ = read_json_object(run_dir / USAGE_FILE)
                    record = {**(extra or {}), "exit_code": 0, "wall_seconds": wall, "cores": slot.cores, "jobs": jobs}
                    if resume_from is not None:  # wall and CPU seconds count this attempt only
                        record["resumed_from_round"] = resume_from
                    try:
                        write_marker(run_dir, record)  # the run counts as finished from here on
                    except OSError as err:
                        problem = f"{DONE_FILE} could not be written ({err})"
                    else:
                        done_run, problem = finished_run(run_dir)
                    failure = f"exit 0, but {problem}"
            with lock:
                if done_run is not None:
                    ran.append(spec.name)
                    walls.append(wall)
                    s = {k: v if isinstance(v, (int, float)) else math.nan for k, v in done_run.summary.items()}
                    remaining = len(todo) - len(ran) - len(failed)
                    eta = (sum(walls) / len(walls)) * remaining / len(slots)
                    report(
                        f"[{i:>{width}}/{len(todo)}] done  {spec.method} / {spec.split} / seed {spec.seed}: "
                        f"acc {s.get('final_accuracy', float('nan')):.4f}, {s.get('mb_total', float('nan')):.2f} MB, "
                        f"{fmt_seconds(wall)} (elapsed {fmt_seconds(time.monotonic() - started)}, ETA {fmt_seconds(eta)})"
                    )
                else:
                    failed.append(spec.name)
                    tail = ""
                    log_path = run_dir / "bench.log"
                    if log_path.is_file():
                        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
                        tail = (" — " + lines[-1][:200]) if lines else ""
                    report(f"[{i:>{width}}/{len(todo)}] FAILED {spec.name} ({failure}); log: {log_path}{tail}")
        finally:
            free.put(slot)

    if todo:
        with ThreadPoolExecutor(max_workers=len(slots)) as pool:
            for future in [pool.submit(one, i, *job) for i, job in enumerate(todo, start=1)]:
                future.result()
    finished = [s for s in specs if s.name not in failed and finished_run(out_dir / s.name)[0] is not None]
    summary, files = write_reports(suite, out_dir, finished, command=command, failed=failed)
    where = files[0].parent if files else report_dir(out_dir, suite)
    report(
        f"[bench] wrote {', '.join(str(p.name) for p in files)} in {where}"
        + (f"; {len(failed)} run(s) failed" if failed else "")
    )
    return BenchResult(out_dir, ran, skipped, failed, summary, files)
