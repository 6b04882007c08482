"""Benchmark suites: methods × seeds × splits, one subprocess per run, resumable, with tables and plots.

``fedsparse bench SUITE.toml [--jobs N] [--out DIR]`` runs every (method, split, seed) of a suite
through ``fedsparse run`` (i.e. :func:`fedsparse.simulate`) in its own subprocess — each run starts and
stops its own Ray instance, so a crash or a leaked actor stays inside one run — then writes:

``DIR/<suite name>/all_rounds.csv``
    every run's ``rounds.csv`` stacked, one row per run per round, with ``run``, ``method``,
    ``split`` and ``seed`` columns (tidy: ``pandas.read_csv`` and group by what you like).
``DIR/<suite name>/runs.csv``
    one row per run: its summary.json (final/best accuracy, MB up/down/total, ...) and wall time.
``DIR/<suite name>/summary.csv`` / ``summary.md``
    one row per (split, method): final and best accuracy as mean ± sample std (ddof = 1) over seeds,
    MB up / down / total (means), the ratio of each to the baseline method (FedAvg) measured in the
    same split, wall seconds per run, and whether the method is on the Pareto front.
``DIR/<suite name>/accuracy_vs_mb.png`` / ``pareto.png``
    accuracy vs cumulative MB per method (mean over seeds), and final accuracy vs total MB with the
    Pareto front (no other method with total MB ≤ and final accuracy ≥, one of them strictly), one
    panel per split.

The runs live in ``DIR/<run>/`` and are shared: suites run into one ``DIR`` reuse each other's
identical runs, and each suite's reports go to its own ``DIR/<suite name>/``.

A run is complete when the bench wrote its completion marker ``DIR/<run>/bench.json`` (only after
the run's process exited 0 and its summary.json parsed) and its ``config.toml`` matches the
configuration the suite asks for: such a run is skipped, so an interrupted suite resumes where it
stopped. Any other run (cut short, failed after writing summary.json, truncated files) is started
again from round 1: its directory is cleared first.

Suite file (TOML)::

    name = "fmnist-lenet5"          # optional; default: the file's stem
    description = "..."             # optional
    seeds = [0, 1, 2]
    baseline = "fedavg"             # optional; the method ratios are computed against
    [base]                          # keys every run shares (fedsparse config keys)
    dataset = "fashion-mnist"
    [splits.iid]                    # each split: a set of overrides
    partition = "iid"
    [[methods]]                     # each method: a name, a strategy, and its overrides
    name = "topk"
    strategy = "topk"
    compress-ratio = 0.1

A run's configuration is base ← split ← method ← ``seed`` ← ``--set`` overrides.

CPU use: ``--jobs N`` runs N simulations at once. Each gets its own share of the machine's cores —
its process is pinned to ⌊cores/N⌋ of them, its Ray instance is told it has that many CPUs
(``RAY_OVERRIDE_RESOURCES``), its clients use one CPU each (``client-cpus = 1``) and torch/OpenMP one
thread each — so N runs never oversubscribe the cores. With ``--jobs 1`` (default) the run uses the
configuration's ``client-cpus`` on the whole machine, as ``fedsparse run`` does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from fedsparse.config import Config, ConfigError, parse_overrides, resolve_config, to_toml

MB = 1e6
RUN_SEP = "--"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
USAGE_FILE = "bench-usage.json"
#: The bench's completion marker in a run directory: written (atomically) only once the run's
#: process exited 0 and its summary.json parsed. A run directory without it is not finished.
DONE_FILE = "bench.json"
SUITE_KEYS = {"name", "description", "seeds", "baseline", "base", "splits", "methods"}


# --------------------------------------------------------------------------------------------
# suite definition
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One run of a suite: which method, split and seed, and its merged overrides."""

    method: str
    split: str
    seed: int
    overrides: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.method}{RUN_SEP}{self.split}{RUN_SEP}s{self.seed}"


@dataclass
class Suite:
    name: str
    description: str
    base: dict[str, Any]
    methods: dict[str, dict[str, Any]]  # name -> overrides (insertion order kept)
    splits: dict[str, dict[str, Any]]
    seeds: list[int]
    baseline: str | None
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # --set overrides

    def runs(
        self,
        methods: Sequence[str] | None = None,
        splits: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[RunSpec]:
        """Every (split, method, seed) selected, in suite order (split-major, then method, seed)."""
        for kind, wanted, have in (("method", methods, self.methods), ("split", splits, self.splits)):
            unknown = [w for w in wanted or [] if w not in have]
            if unknown:
                raise ConfigError(f"unknown {kind} {unknown[0]!r}; this suite has: {', '.join(have)}")
        unknown_seeds = [s for s in seeds or [] if s not in self.seeds]
        if unknown_seeds:
            raise ConfigError(f"seed {unknown_seeds[0]} is not in this suite's seeds {self.seeds}")
        out = []
        for split, split_over in self.splits.items():
            if splits and split not in splits:
                continue
            for method, method_over in self.methods.items():
                if methods and method not in methods:
                    continue
                for seed in self.seeds:
                    if seeds and seed not in seeds:
                        continue
                    merged = {**self.base, **split_over, **method_over, "seed": seed, **self.extra}
                    out.append(RunSpec(method, split, seed, merged))
        return out


def _table(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must be a table of configuration keys, got {type(value).__name__}")
    nested = [k for k, v in value.items() if isinstance(v, (dict, list))]
    if nested:
        raise ConfigError(f"{where}: '{key}' holds non-scalar entries {nested}; allowed: flat configuration keys")
    return dict(value)


def _check_name(kind: str, name: Any, where: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or RUN_SEP in name or not name.strip("."):
        raise ConfigError(
            f"{where}: {kind} name {name!r} is not allowed; use letters, digits, '_', '.', '+' or a single '-'"
        )
    return name


def parse_suite(data: Mapping[str, Any], *, where: str = "suite", path: Path | None = None) -> Suite:
    """Check a suite's structure (not yet its configuration values: see :func:`resolve_runs`)."""
    unknown = sorted(set(data) - SUITE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown top-level entries {unknown}; allowed: {', '.join(sorted(SUITE_KEYS))}")
    base = _table(data, "base", where)
    seeds = data.get("seeds", [int(base.get("seed", 0))])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ConfigError(f"{where}: seeds = {seeds!r}; allowed: a non-empty list of integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds = {seeds!r} repeats a seed")
    raw_splits = data.get("splits", {"default": {}})
    if not isinstance(raw_splits, dict) or not raw_splits:
        raise ConfigError(f"{where}: 'splits' must be a non-empty table of tables ([splits.NAME])")
    splits = {_check_name("split", k, where): _table(raw_splits, k, f"{where}: split {k!r}") for k in raw_splits}
    raw_methods = data.get("methods")
    if not isinstance(raw_methods, list) or not raw_methods:
        raise ConfigError(f"{where}: no methods; add [[methods]] tables with a name and a strategy")
    methods: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(raw_methods):
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: methods[{i}] must be a table")
        name = _check_name("method", entry.get("name"), f"{where}: methods[{i}]")
        if name in methods:
            raise ConfigError(f"{where}: method {name!r} is defined twice")
        over = {k: v for k, v in entry.items() if k != "name"}
        if "strategy" not in over:
            raise ConfigError(f"{where}: method {name!r} has no 'strategy'")
        nested = [k for k, v in over.items() if isinstance(v, (dict, list))]
        if nested:
            raise ConfigError(f"{where}: method {name!r} holds non-scalar entries {nested}")
        methods[name] = over
    baseline = data.get("baseline", "fedavg" if "fedavg" in methods else None)
    if baseline is not None and baseline not in methods:
        raise ConfigError(f"{where}: baseline {baseline!r} is not one of the methods ({', '.join(methods)})")
    # the name is a directory (DIR/<suite name>/ holds the suite's reports): a safe name without
    # "--", so it never collides with a run directory (method--split--sSEED)
    name = _check_name("suite", str(data.get("name", path.stem if path else "suite")), where)
    return Suite(name, str(data.get("description", "")), base, methods, splits, list(seeds), baseline, path)


def load_suite(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Suite:
    """Read a suite file; ``overrides`` (``--set``) apply to every run."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"suite file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"suite file {str(path)!r} is not valid TOML: {err}") from err
    suite = parse_suite(data, where=f"suite {path.name}", path=path)
    suite.extra = dict(overrides or {})
    return suite


def available_methods(suite: Suite) -> tuple[list[str], list[str]]:
    """(methods whose strategy is registered, methods whose strategy is not)."""
    from strategies.registry import strategy_names

    known = set(strategy_names())
    have = [m for m, o in suite.methods.items() if str(o["strategy"]) in known]
    return have, [m for m in suite.methods if m not in have]


def resolve_runs(runs: Sequence[RunSpec]) -> dict[str, Config]:
    """Every run's full configuration, checked before anything starts (errors name the run)."""
    out = {}
    for spec in runs:
        try:
            out[spec.name] = resolve_config(None, spec.overrides)
        except ConfigError as err:
            raise ConfigError(f"run {spec.name} (method {spec.method}, split {spec.split}): {err}") from err
    return out


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------


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


Runner = Callable[[RunSpec, Config, Path, Slot], int]


def subprocess_runner(spec: RunSpec, cfg: Config, run_dir: Path, slot: Slot) -> int:
    """Run ``fedsparse run`` in a child process (pinned to the slot's cores); log to ``bench.log``."""
    cfg_path = run_dir / "bench-config.toml"
    cfg_path.write_text(to_toml({k: v for k, v in cfg.items() if k != "out-dir"}))
    cmd = [sys.executable, "-m", "fedsparse.cli", "run", str(cfg_path), "--out", str(run_dir), "--quiet"]
    cores = slot.cores

    def pin() -> None:  # runs in the child before exec
        if cores is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)

    with (run_dir / "bench.log").open("w") as log:
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


def _comparable(cfg: Mapping[str, Any]) -> dict[str, Any]:
    # Operational keys do not change what a run computes: a finished run with other values is still
    # valid (the same keys a resumed run may change; imported here: checkpoint imports torch).
    from fedsparse.checkpoint import OPERATIONAL_KEYS

    return {k: v for k, v in cfg.items() if k not in OPERATIONAL_KEYS}


@dataclass(frozen=True)
class FinishedRun:
    """A finished run's figures: its summary.json and the bench's completion marker (bench.json)."""

    summary: dict[str, Any]
    record: dict[str, Any]


def _read_json_object(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(the JSON object in ``path``, "") or (None, why it cannot be used)."""
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{path.name} does not parse ({type(err).__name__})"
    if not isinstance(data, dict):
        return None, f"{path.name} holds {type(data).__name__}, not a JSON object"
    return data, ""


def _run_outputs(run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """(summary, "") when the files the reports read are there and summary.json parses."""
    summary, why = _read_json_object(run_dir / "summary.json")
    if summary is None:
        return None, why
    if not (run_dir / "rounds.csv").is_file():
        return None, "no rounds.csv"
    return summary, ""


def finished_run(run_dir: Path) -> tuple[FinishedRun | None, str]:
    """The one definition of a finished run, used both to skip runs (:func:`run_status`) and to read
    them (:func:`collect`): the bench's completion marker ``bench.json`` parses (the bench writes it,
    atomically, only after the run's process exited 0 and its summary.json parsed), summary.json
    still parses and rounds.csv is there. Returns (the run, "") or (None, why not).

    A summary.json without the marker is a run that failed after writing it (plots, process exit)
    or was cut short while the bench waited: it is not finished, whatever summary.json says.
    """
    if not run_dir.exists():
        return None, "not run"
    record, why = _read_json_object(run_dir / DONE_FILE)
    if record is None:
        return None, "incomplete" if why == f"no {DONE_FILE}" else f"incomplete ({why})"
    summary, why = _run_outputs(run_dir)
    if summary is None:
        return None, f"incomplete ({why})"
    return FinishedRun(summary, record), ""


def _write_marker(run_dir: Path, record: Mapping[str, Any]) -> None:
    """Write bench.json atomically (a temporary file renamed over it): it is whole or absent."""
    tmp = run_dir / f".{DONE_FILE}.tmp"
    with tmp.open("w") as f:
        f.write(json.dumps(dict(record)) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / DONE_FILE)


def run_status(run_dir: Path, cfg: Config) -> tuple[bool, str]:
    """(complete, why not): complete when :func:`finished_run` says so and config.toml matches ``cfg``."""
    finished, why = finished_run(run_dir)
    if finished is None:
        return False, why
    cfg_file = run_dir / "config.toml"
    if not cfg_file.is_file():
        return False, "no config.toml"
    from fedsparse.config import defaults

    try:
        done = tomllib.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False, "config.toml does not parse"
    want = json.loads(json.dumps(_comparable(cfg)))
    have = json.loads(json.dumps(_comparable(done)))
    # A key the finished run did not know yet (added to fedsparse since) counted as its default.
    known = json.loads(json.dumps(defaults()))
    have = {k: have.get(k, known.get(k)) for k in want}
    changed = sorted(k for k in want if want[k] != have[k])
    if changed:
        return False, "configuration changed (" + ", ".join(f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in changed[:4]) + ")"
    return True, ""


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


@dataclass
class BenchResult:
    out_dir: Path
    ran: list[str]
    skipped: list[str]
    failed: list[str]
    summary: Any  # pandas DataFrame
    files: list[Path]


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
) -> BenchResult:
    """Run what is not done yet, then (re)write the tables, report and plots from every finished run."""
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

    todo, skipped = [], []
    for spec in specs:
        done, why = run_status(out_dir / spec.name, configs[spec.name])
        if done:
            skipped.append(spec.name)
        else:
            todo.append((spec, why))
    report(
        f"[bench] {suite.name}: {len(specs)} runs ({len(skipped)} already done, {len(todo)} to run), "
        f"jobs={jobs}" + (f" ({len(slots[0].cores)} core(s) each)" if slots[0].cores else "") + f", results in {out_dir}"
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

    def one(i: int, spec: RunSpec, why: str) -> None:
        slot = free.get()
        try:
            run_dir = out_dir / spec.name
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
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
                summary, problem = _run_outputs(run_dir)
                if summary is None:
                    failure = f"exit 0, but {problem}"
                else:
                    extra, _ = _read_json_object(run_dir / USAGE_FILE)
                    record = {**(extra or {}), "exit_code": 0, "wall_seconds": wall, "cores": slot.cores, "jobs": jobs}
                    try:
                        _write_marker(run_dir, record)  # the run counts as finished from here on
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
                        f"{_fmt_seconds(wall)} (elapsed {_fmt_seconds(time.monotonic() - started)}, ETA {_fmt_seconds(eta)})"
                    )
                else:
                    failed.append(spec.name)
                    tail = ""
                    log = run_dir / "bench.log"
                    if log.is_file():
                        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
                        tail = (" — " + lines[-1][:200]) if lines else ""
                    report(f"[{i:>{width}}/{len(todo)}] FAILED {spec.name} ({failure}); log: {log}{tail}")
        finally:
            free.put(slot)

    if todo:
        with ThreadPoolExecutor(max_workers=len(slots)) as pool:
            for future in [pool.submit(one, i, spec, why) for i, (spec, why) in enumerate(todo, start=1)]:
                future.result()
    finished = [s for s in specs if s.name not in failed and finished_run(out_dir / s.name)[0] is not None]
    summary, files = write_reports(suite, out_dir, finished, command=command, failed=failed)
    where = files[0].parent if files else report_dir(out_dir, suite)
    report(f"[bench] wrote {', '.join(str(p.name) for p in files)} in {where}" + (f"; {len(failed)} run(s) failed" if failed else ""))
    return BenchResult(out_dir, ran, skipped, failed, summary, files)


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def collect(out_dir: Path, specs: Iterable[RunSpec]) -> tuple[Any, Any]:
    """(all rounds stacked, one row per run) from the files of those ``specs`` that are finished
    (:func:`finished_run`; the others are left out)."""
    import pandas as pd

    frames, rows = [], []
    for spec in specs:
        run_dir = out_dir / spec.name
        finished, _ = finished_run(run_dir)
        if finished is None:
            continue
        df = pd.read_csv(run_dir / "rounds.csv")
        df.insert(0, "run", spec.name)
        df.insert(1, "method", spec.method)
        df.insert(2, "split", spec.split)
        df["seed"] = spec.seed
        df["cum_mb_total"] = (df["cum_bytes_up"] + df["cum_bytes_down"]) / MB
        frames.append(df)
        summary, usage = finished.summary, finished.record
        row = {"run": spec.name, "method": spec.method, "split": spec.split, "seed": spec.seed}
        row.update({k: v for k, v in summary.items() if not isinstance(v, (dict, list)) and k not in row})
        row["run_wall_seconds"] = usage.get("wall_seconds", summary.get("wall_seconds"))
        row["run_cpu_seconds"] = usage.get("cpu_seconds", math.nan)
        later = df[df["round"] >= 2]["round_seconds"] if "round_seconds" in df else []
        # a round's typical cost; round 1 carries the Ray actors' start-up (torch import, data)
        row["round_seconds_median"] = float(later.median()) if len(later) else math.nan
        rows.append(row)
    all_rounds = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return all_rounds, pd.DataFrame(rows)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, accuracy) points: True where no other point has cost ≤ and accuracy ≥, one strictly."""
    out = []
    for i, (c, a) in enumerate(points):
        dominated = any(
            (c2 <= c and a2 >= a and (c2 < c or a2 > a)) for j, (c2, a2) in enumerate(points) if j != i
        )
        out.append(not dominated and math.isfinite(c) and math.isfinite(a))
    return out


def summarize_runs(runs: Any, baseline: str | None, method_order: Sequence[str] | None = None) -> Any:
    """One row per (split, method): mean ± sample std over seeds, MB, ratios to the baseline, Pareto."""
    import pandas as pd

    if runs.empty:
        return pd.DataFrame()
    rows = []
    order = list(method_order or dict.fromkeys(runs["method"]))
    for split in dict.fromkeys(runs["split"]):
        part = runs[runs["split"] == split]
        base = part[part["method"] == baseline] if baseline else part.iloc[0:0]
        base_mb = {k: float(base[k].mean()) if len(base) else math.nan for k in ("mb_up", "mb_down", "mb_total")}
        for method in [m for m in order if m in set(part["method"])]:
            g = part[part["method"] == method]
            row = {
                "split": split,
                "method": method,
                "strategy": g["strategy"].iloc[0] if "strategy" in g else "",
                "seeds": int(len(g)),
                "rounds": int(g["rounds"].max()) if "rounds" in g else math.nan,
                "final_acc_mean": float(g["final_accuracy"].mean()),
                "final_acc_std": float(g["final_accuracy"].std(ddof=1)) if len(g) > 1 else math.nan,
                "best_acc_mean": float(g["best_accuracy"].mean()),
                "best_acc_std": float(g["best_accuracy"].std(ddof=1)) if len(g) > 1 else math.nan,
                "mb_up": float(g["mb_up"].mean()),
                "mb_down": float(g["mb_down"].mean()),
                "mb_total": float(g["mb_total"].mean()),
            }
            for k in ("up", "down", "total"):
                b = base_mb[f"mb_{k}"]
                row[f"ratio_{k}"] = row[f"mb_{k}"] / b if b and math.isfinite(b) else math.nan
            row["wall_s"] = float(pd.to_numeric(g["run_wall_seconds"], errors="coerce").mean())
            row["cpu_s"] = float(pd.to_numeric(g["run_cpu_seconds"], errors="coerce").mean())
            row["round_s"] = float(pd.to_numeric(g["round_seconds_median"], errors="coerce").mean())
            rows.append(row)
    summary = pd.DataFrame(rows)
    summary["pareto"] = False
    for split in dict.fromkeys(summary["split"]):
        idx = summary.index[summary["split"] == split]
        front = pareto_front(list(zip(summary.loc[idx, "mb_total"], summary.loc[idx, "final_acc_mean"])))
        summary.loc[idx, "pareto"] = front
    return summary


def _pm(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    if not math.isfinite(mean):
        return "–"
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if math.isfinite(std) else "")


def markdown_table(summary: Any) -> str:
    """The summary as GitHub markdown, one table per split."""
    out = []
    for split in dict.fromkeys(summary["split"]):
        part = summary[summary["split"] == split]
        out.append(f"**split: {split}**\n")
        out.append(
            "| method | strategy | seeds | final acc % | best acc % | MB up | MB down | MB total | × up | × down | × total "
            "| s/run | s/round | Pareto |"
        )
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|")
        for r in part.to_dict("records"):
            ratio = lambda v: f"{v:.3f}" if math.isfinite(v) else "–"  # noqa: E731
            out.append(
                f"| {r['method']} | {r['strategy']} | {r['seeds']} | {_pm(r['final_acc_mean'], r['final_acc_std'])} | "
                f"{_pm(r['best_acc_mean'], r['best_acc_std'])} | {r['mb_up']:.2f} | {r['mb_down']:.2f} | {r['mb_total']:.2f} | "
                f"{ratio(r['ratio_up'])} | {ratio(r['ratio_down'])} | {ratio(r['ratio_total'])} | {r['wall_s']:.0f} | {r['round_s']:.1f} | "
                f"{'★' if r['pareto'] else ''} |"
            )
        out.append("")
    return "\n".join(out)


def describe_pareto(summary: Any) -> str:
    lines = []
    for split in dict.fromkeys(summary["split"]):
        part = summary[(summary["split"] == split) & summary["pareto"]].sort_values("mb_total")
        items = [f"{r['method']} ({r['mb_total']:.2f} MB, {100 * r['final_acc_mean']:.2f} %)" for r in part.to_dict("records")]
        lines.append(f"- {split}: " + (" → ".join(items) if items else "none"))
    return "\n".join(lines)


def _cost_line(runs: Any) -> str:
    import pandas as pd

    wall = pd.to_numeric(runs["run_wall_seconds"], errors="coerce").sum()
    cpu = pd.to_numeric(runs["run_cpu_seconds"], errors="coerce")
    text = f"Cost: {len(runs)} runs took {_fmt_seconds(wall)} of run wall time in all"
    if cpu.notna().any():
        text += f" and {_fmt_seconds(cpu.sum())} of CPU time (each run's process tree: Python, Ray, client actors)"
    try:
        load = os.getloadavg()[2]
        text += f"; 15-minute load average when the report was written: {load:.1f} on {os.cpu_count()} cores"
    except OSError:  # pragma: no cover
        pass
    return text + "."


def report_dir(out_dir: Path, suite: Suite) -> Path:
    """Where a suite's reports go: ``out_dir/<suite name>/`` (the runs, ``out_dir/<run>/``, are
    shared by every suite run into ``out_dir``; the reports are per suite)."""
    return Path(out_dir) / suite.name


def write_reports(
    suite: Suite, out_dir: Path, finished: Sequence[RunSpec], *, command: str = "", failed: Sequence[str] = ()
) -> tuple[Any, list[Path]]:
    """all_rounds.csv, runs.csv, summary.csv, summary.md and the plots, from the finished runs,
    in :func:`report_dir` (``out_dir/<suite name>/``)."""
    all_rounds, runs = collect(out_dir, finished)
    files: list[Path] = []
    if runs.empty:
        return runs, files
    rdir = report_dir(out_dir, suite)
    rdir.mkdir(parents=True, exist_ok=True)
    all_rounds.to_csv(rdir / "all_rounds.csv", index=False)
    runs.to_csv(rdir / "runs.csv", index=False)
    summary = summarize_runs(runs, suite.baseline, list(suite.methods))
    summary.to_csv(rdir / "summary.csv", index=False)
    files += [rdir / "all_rounds.csv", rdir / "runs.csv", rdir / "summary.csv"]
    files += plot_suite(all_rounds, summary, rdir, title=suite.name)
    md = [f"# Benchmark suite `{suite.name}`", ""]
    if suite.description:
        md += [suite.description.strip(), ""]
    if command:
        md += ["Command:", "", "```", command, "```", ""]
    common = {k: v for k, v in {**suite.base, **suite.extra}.items()}
    md += [
        f"{len(runs)} finished runs: methods {', '.join(dict.fromkeys(runs['method']))}; "
        f"splits {', '.join(dict.fromkeys(runs['split']))}; seeds {', '.join(str(s) for s in sorted(set(runs['seed'])))}.",
        "",
        "Shared settings: " + ", ".join(f"`{k} = {v}`" for k, v in common.items()),
        "",
        "Accuracy: test accuracy of the global model, % (mean ± sample std over seeds; final = last round, "
        "best = best evaluated round). MB: payload megabytes (10⁶ B) actually serialised, mean over seeds; "
        f"× = ratio to `{suite.baseline}` in the same split. s/run: wall seconds per run (subprocess, Ray start "
        "included); s/round: median wall seconds of rounds 2.. (round 1 carries the actors' start-up). "
        "★ = on the Pareto front (no other method of the split has total MB ≤ and final accuracy ≥ this one's, "
        "with at least one of the two strictly better).",
        "",
        markdown_table(summary),
        _cost_line(runs),
        "",
        "Pareto front (total MB ascending):",
        "",
        describe_pareto(summary),
        "",
        "Plots: `accuracy_vs_mb.png` (accuracy vs cumulative MB, mean over seeds), `pareto.png`.",
    ]
    if failed:
        md += ["", f"Failed runs (see `../<run>/bench.log`): {', '.join(failed)}"]
    (rdir / "summary.md").write_text("\n".join(md) + "\n")
    files.insert(3, rdir / "summary.md")
    return summary, files


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------


def plot_suite(all_rounds: Any, summary: Any, out_dir: Path, title: str = "") -> list[Path]:
    """accuracy_vs_mb.png and pareto.png, one panel per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(dict.fromkeys(summary["split"]))
    methods = list(dict.fromkeys(summary["method"]))
    colors = {m: plt.get_cmap("tab20" if len(methods) > 10 else "tab10")(i) for i, m in enumerate(methods)}
    paths = []

    fig, axes = plt.subplots(1, len(splits), figsize=(6.2 * len(splits), 4.4), squeeze=False)
    evald = all_rounds.dropna(subset=["test_accuracy"])
    for ax, split in zip(axes[0], splits):
        for method in methods:
            g = evald[(evald["split"] == split) & (evald["method"] == method)]
            if g.empty:
                continue
            mean = g.groupby("round")[["cum_mb_total", "test_accuracy"]].mean()
            ax.plot(mean["cum_mb_total"], mean["test_accuracy"], marker=".", ms=3, label=method, color=colors[method])
        ax.set_xscale("log")
        ax.set_xlabel("cumulative MB moved (up + down, payload; log scale)")
        ax.set_ylabel("test accuracy (mean over seeds)")
        ax.set_title(f"{title} — {split}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out_dir / "accuracy_vs_mb.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    fig, axes = plt.subplots(1, len(splits), figsize=(6.2 * len(splits), 4.4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        part = summary[summary["split"] == split]
        for r in part.to_dict("records"):
            err = r["final_acc_std"] if math.isfinite(r["final_acc_std"]) else 0.0
            ax.errorbar(r["mb_total"], r["final_acc_mean"], yerr=err, fmt="o" if r["pareto"] else "s",
                        ms=7 if r["pareto"] else 5, color=colors[r["method"]], capsize=3, label=r["method"])
            ax.annotate(r["method"], (r["mb_total"], r["final_acc_mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = part[part["pareto"]].sort_values("mb_total")
        if len(front):
            ax.step(front["mb_total"], front["final_acc_mean"], where="post", color="black", lw=1, alpha=0.6, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("total MB moved per run (up + down, payload; log scale)")
        ax.set_ylabel("final test accuracy (mean ± std over seeds)")
        ax.set_title(f"{title} — {split}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = out_dir / "pareto.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite, parse_overrides(args.set))
    out = Path(args.out) if args.out else Path("runs") / f"bench-{suite.name}"
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    methods = args.only.split(",") if args.only else None
    splits = args.splits.split(",") if args.splits else None
    if args.dry_run:
        specs = suite.runs(methods, splits, seeds)
        configs = resolve_runs(specs)
        walls = []
        todo = 0
        for spec in specs:
            done, why = run_status(out / spec.name, configs[spec.name])
            finished, _ = finished_run(out / spec.name)
            wall = finished.record.get("wall_seconds") if done and finished is not None else None
            if isinstance(wall, (int, float)) and math.isfinite(wall):
                walls.append(float(wall))
            todo += not done
            print(f"{spec.name:40s} {'done' if done else why}")
        est = f"; about {_fmt_seconds(sum(walls) / len(walls) * todo / args.jobs)} at the finished runs' mean" if walls and todo else ""
        print(f"{len(specs)} runs, {todo} to run{est}")
        return 0
    command = "fedsparse bench " + " ".join(a for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"] else ""
    result = run_suite(
        suite, out, jobs=args.jobs, methods=methods, splits=splits, seeds=seeds,
        skip_unavailable=args.skip_unavailable, command=command,
    )
    if not result.summary.empty:
        print(markdown_table(result.summary))
    return 1 if result.failed else 0


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:  # noqa: SLF001 (argparse's type)
    """Register ``fedsparse bench`` on the CLI's subparsers."""
    bench = subparsers.add_parser(
        "bench", help="run a benchmark suite (methods × seeds × splits) and write tables and plots",
        description=__doc__.split("\n\n")[0],
    )
    bench.add_argument("suite", help="suite TOML file (see docs/benchmarks.md)")
    bench.add_argument("--jobs", type=int, default=1, help="runs at once, each on its own share of the cores (default 1)")
    bench.add_argument(
        "--out", help="results directory (default: runs/bench-<suite name>): runs in DIR/<run>/ (finished ones are "
        "skipped, and shared with other suites run there), this suite's reports in DIR/<suite name>/",
    )
    bench.add_argument("--only", help="comma-separated methods to run (default: all)")
    bench.add_argument("--splits", help="comma-separated splits to run (default: all)")
    bench.add_argument("--seeds", help="comma-separated seeds to run (default: the suite's)")
    bench.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key in every run (repeatable)")
    bench.add_argument("--skip-unavailable", action="store_true", help="leave out methods whose strategy is not registered")
    bench.add_argument("--dry-run", action="store_true", help="list the runs and which are done; run nothing")
    bench.set_defaults(func=_cmd_bench)


__all__ = [
    "Suite", "RunSpec", "FinishedRun", "load_suite", "parse_suite", "resolve_runs", "run_suite", "run_status",
    "finished_run", "collect", "summarize_runs", "pareto_front", "write_reports", "report_dir", "make_slots",
    "slot_env", "add_bench_command",
]
