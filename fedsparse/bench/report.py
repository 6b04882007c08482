"""A suite's reports, from its finished runs' own files: the tidy tables, the per-(split, method)
summary with seed statistics, ratios and the Pareto front, and ``summary.md``.

Everything here reads run directories and writes ``DIR/<suite name>/``; nothing starts a run, so the
reports can be rebuilt from the runs at any time (every bench invocation does).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fedsparse.bench.plots import plot_suite
from fedsparse.bench.status import finished_run
from fedsparse.bench.suite import RunSpec, Suite

MB = 1e6


def fmt_seconds(s: float) -> str:
    """``12s``, ``3m05s``, ``1h02m``; ``?`` when not finite."""
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def collect(out_dir: Path, specs: Iterable[RunSpec]) -> tuple[Any, Any]:
    """(all rounds stacked, one row per run) from the files of those ``specs`` that are finished
    (:func:`~fedsparse.bench.status.finished_run`; the others are left out)."""
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
        # what the run ran on (fedsparse.environment): versions, commit, threads, device
        row.update({f"env_{k}": v for k, v in dict(summary.get("environment", {})).items()})
        row["run_wall_seconds"] = usage.get("wall_seconds", summary.get("wall_seconds"))
        row["run_cpu_seconds"] = usage.get("cpu_seconds", math.nan)
        later = df[df["round"] >= 2]["round_seconds"] if "round_seconds" in df else None
        # a round's typical cost; round 1 carries the Ray actors' start-up (torch import, data)
        row["round_seconds_median"] = float(later.median()) if later is not None and len(later) else math.nan
        rows.append(row)
    all_rounds = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return all_rounds, pd.DataFrame(rows)


def study_runs(out_dir: Path, suite_path: Path) -> tuple[Any, Any, Any, Path] | None:
    """(suite, all rounds, one row per run, its report folder — created) of a suite's finished runs
    under a bench's ``out_dir``, for the read-only study reports (experiments/report_*.py); None,
    after saying so, when none has finished."""
    from fedsparse.bench.suite import load_suite

    suite = load_suite(suite_path)
    all_rounds, runs = collect(out_dir, suite.runs())
    if runs.empty:
        print(f"no finished runs of suite {suite.name} under {out_dir}")
        return None
    target = report_dir(out_dir, suite)
    target.mkdir(parents=True, exist_ok=True)
    return suite, all_rounds, runs, target


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, accuracy) points: True where no other point has cost ≤ and accuracy ≥, one strictly."""
    out = []
    for i, (c, a) in enumerate(points):
        dominated = any((c2 <= c and a2 >= a and (c2 < c or a2 > a)) for j, (c2, a2) in enumerate(points) if j != i)
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

            def ratio(v: float) -> str:
                return f"{v:.3f}" if math.isfinite(v) else "–"

            out.append(
                f"| {r['method']} | {r['strategy']} | {r['seeds']} | {_pm(r['final_acc_mean'], r['final_acc_std'])} | "
                f"{_pm(r['best_acc_mean'], r['best_acc_std'])} | {r['mb_up']:.2f} | {r['mb_down']:.2f} | {r['mb_total']:.2f} | "
                f"{ratio(r['ratio_up'])} | {ratio(r['ratio_down'])} | {ratio(r['ratio_total'])} | {r['wall_s']:.0f} | {r['round_s']:.1f} | "
                f"{'★' if r['pareto'] else ''} |"
            )
        out.append("")
    return "\n".join(out)


def describe_pareto(summary: Any) -> str:
    """The Pareto front of each split as one line, cheapest first."""
    lines = []
    for split in dict.fromkeys(summary["split"]):
        part = summary[(summary["split"] == split) & summary["pareto"]].sort_values("mb_total")
        items = [
            f"{r['method']} ({r['mb_total']:.2f} MB, {100 * r['final_acc_mean']:.2f} %)"
            for r in part.to_dict("records")
        ]
        lines.append(f"- {split}: " + (" → ".join(items) if items else "none"))
    return "\n".join(lines)


def _cost_line(runs: Any) -> str:
    import pandas as pd

    wall = pd.to_numeric(runs["run_wall_seconds"], errors="coerce").sum()
    cpu = pd.to_numeric(runs["run_cpu_seconds"], errors="coerce")
    text = f"Cost: {len(runs)} runs took {fmt_seconds(wall)} of run wall time in all"
    if cpu.notna().any():
        text += f" and {fmt_seconds(cpu.sum())} of CPU time (each run's process tree: Python, Ray, client actors)"
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
