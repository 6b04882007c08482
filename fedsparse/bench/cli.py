"""``fedsparse bench``: the command line over :mod:`fedsparse.bench` (registered by fedsparse.cli)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fedsparse.bench.report import fmt_seconds, markdown_table
from fedsparse.bench.runner import run_suite
from fedsparse.bench.status import RESTART_QUIETLY, finished_run, resume_point, run_status
from fedsparse.bench.suite import Suite, load_suite, resolve_runs
from fedsparse.config import parse_overrides

DESCRIPTION = "Benchmark suites: methods × seeds × splits, one subprocess per run, resumable, with tables and plots."


def _dry_run(
    suite: Suite, out: Path, jobs: int, methods: list[str] | None, splits: list[str] | None, seeds: list[int] | None
) -> int:
    """List the runs and which are done or resumable; estimate the rest from the finished runs."""
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
        if not done:
            resume_from, why_not = resume_point(out / spec.name, configs[spec.name])
            if resume_from is not None:
                why += f"; resumes from its round-{resume_from} checkpoint"
            elif why_not not in RESTART_QUIETLY:
                why += f"; {why_not}, starts over"
        print(f"{spec.name:40s} {'done' if done else why}")
    est = (
        f"; about {fmt_seconds(sum(walls) / len(walls) * todo / jobs)} at the finished runs' mean"
        if walls and todo
        else ""
    )
    print(f"{len(specs)} runs, {todo} to run{est}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite, parse_overrides(args.set))
    out = Path(args.out) if args.out else Path("runs") / f"bench-{suite.name}"
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    methods = args.only.split(",") if args.only else None
    splits = args.splits.split(",") if args.splits else None
    if args.dry_run:
        return _dry_run(suite, out, args.jobs, methods, splits, seeds)
    command = "fedsparse bench " + " ".join(a for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"] else ""
    result = run_suite(
        suite,
        out,
        jobs=args.jobs,
        methods=methods,
        splits=splits,
        seeds=seeds,
        skip_unavailable=args.skip_unavailable,
        command=command,
        shared_ray=args.shared_ray,
    )
    if not result.summary.empty:
        print(markdown_table(result.summary))
    return 1 if result.failed else 0


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's own type, it has no public name
    """Register ``fedsparse bench`` on the CLI's subparsers."""
    bench = subparsers.add_parser(
        "bench",
        help="run a benchmark suite (methods × seeds × splits) and write tables and plots",
        description=DESCRIPTION,
    )
    bench.add_argument("suite", help="suite TOML file (see docs/benchmarks.md)")
    bench.add_argument(
        "--jobs", type=int, default=1, help="runs at once, each on its own share of the cores (default 1)"
    )
    bench.add_argument(
        "--out",
        help="results directory (default: runs/bench-<suite name>): runs in DIR/<run>/ (finished ones are "
        "skipped, and shared with other suites run there), this suite's reports in DIR/<suite name>/",
    )
    bench.add_argument("--only", help="comma-separated methods to run (default: all)")
    bench.add_argument("--splits", help="comma-separated splits to run (default: all)")
    bench.add_argument("--seeds", help="comma-separated seeds to run (default: the suite's)")
    bench.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key in every run (repeatable)")
    bench.add_argument(
        "--skip-unavailable", action="store_true", help="leave out methods whose strategy is not registered"
    )
    bench.add_argument("--dry-run", action="store_true", help="list the runs and which are done; run nothing")
    bench.add_argument(
        "--shared-ray",
        action="store_true",
        help="start one Ray head for the suite and run every run on it, instead of a Ray start per run "
        "(--jobs 1 only; each run stays its own process and job: same results)",
    )
    bench.set_defaults(func=_cmd_bench)
