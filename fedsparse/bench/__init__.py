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
stopped. A run cut short after a checkpoint (``checkpoint-every`` > 0) of the same configuration is
continued from it with ``fedsparse run --resume``. Any other run (cut short without a checkpoint,
failed after writing summary.json, truncated files) is started again from round 1: its directory is
cleared first.

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
    splits = ["iid"]                # optional: the only splits this method runs in (default: all)

A run's configuration is base ← split ← method ← ``seed`` ← ``--set`` overrides.

CPU use: ``--jobs N`` runs N simulations at once. Each gets its own share of the machine's cores —
its process is pinned to ⌊cores/N⌋ of them, its Ray instance is told it has that many CPUs
(``RAY_OVERRIDE_RESOURCES``), its clients use one CPU each (``client-cpus = 1``) and torch/OpenMP one
thread each — so N runs never oversubscribe the cores. With ``--jobs 1`` (default) the run uses the
configuration's ``client-cpus`` on the whole machine, as ``fedsparse run`` does.

The modules, by job: :mod:`~fedsparse.bench.suite` (what a suite asks for),
:mod:`~fedsparse.bench.status` (what a run directory holds: finished, resumable or neither),
:mod:`~fedsparse.bench.runner` (running the runs), :mod:`~fedsparse.bench.report` and
:mod:`~fedsparse.bench.plots` (the reports), :mod:`~fedsparse.bench.cli` (the command).
"""

from fedsparse.bench.cli import add_bench_command
from fedsparse.bench.plots import plot_suite
from fedsparse.bench.report import (
    MB,
    collect,
    describe_pareto,
    markdown_table,
    pareto_front,
    report_dir,
    summarize_runs,
    write_reports,
)
from fedsparse.bench.runner import (
    BenchResult,
    Runner,
    Slot,
    TreeCPU,
    make_slots,
    run_command,
    run_suite,
    slot_config,
    slot_env,
    subprocess_runner,
)
from fedsparse.bench.status import DONE_FILE, USAGE_FILE, FinishedRun, finished_run, resume_point, run_status
from fedsparse.bench.suite import (
    RUN_SEP,
    SUITE_KEYS,
    RunSpec,
    Suite,
    available_methods,
    load_suite,
    parse_suite,
    resolve_runs,
)

__all__ = [
    "Suite",
    "RunSpec",
    "FinishedRun",
    "load_suite",
    "parse_suite",
    "resolve_runs",
    "run_suite",
    "run_status",
    "finished_run",
    "collect",
    "summarize_runs",
    "pareto_front",
    "write_reports",
    "report_dir",
    "make_slots",
    "slot_env",
    "add_bench_command",
    # also public before the split into modules, and used by tests
    "MB",
    "RUN_SEP",
    "SUITE_KEYS",
    "DONE_FILE",
    "USAGE_FILE",
    "available_methods",
    "Slot",
    "slot_config",
    "Runner",
    "subprocess_runner",
    "TreeCPU",
    "BenchResult",
    "markdown_table",
    "describe_pareto",
    "plot_suite",
    # resuming from a checkpoint
    "resume_point",
    "run_command",
]
