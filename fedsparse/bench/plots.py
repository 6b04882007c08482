"""A suite's two figures: accuracy against cumulative MB, and final accuracy against total MB with
the Pareto front — one panel per split, one colour per method across both figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


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
            ax.errorbar(
                r["mb_total"],
                r["final_acc_mean"],
                yerr=err,
                fmt="o" if r["pareto"] else "s",
                ms=7 if r["pareto"] else 5,
                color=colors[r["method"]],
                capsize=3,
                label=r["method"],
            )
            ax.annotate(
                r["method"], (r["mb_total"], r["final_acc_mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
        front = part[part["pareto"]].sort_values("mb_total")
        if len(front):
            ax.step(
                front["mb_total"],
                front["final_acc_mean"],
                where="post",
                color="black",
                lw=1,
                alpha=0.6,
                label="Pareto front",
            )
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
