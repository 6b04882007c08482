"""A suite's two figures: accuracy against cumulative MB, and final accuracy against total MB with
the Pareto front — one panel per split, one colour per method across both figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Where place_labels tries a label, in offset points from its marker: nearest first, then further
# out, so a label sits beside its point when there is room and moves away (with a leader line) when not.
_LABEL_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
_LABEL_RADII = (5, 14, 24, 36, 50, 66)


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
    for ax, split in zip(axes[0], splits):
        part = summary[summary["split"] == split]
        place_labels(ax, list(zip(part["mb_total"], part["final_acc_mean"])), list(part["method"]))
    path = out_dir / "pareto.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths


def place_labels(
    ax: Any, points: Sequence[tuple[float, float]], labels: Sequence[str], fontsize: float = 7
) -> list[Any]:
    """Label each point so that no two labels overlap, and no label covers a marker.

    Methods of a suite often share a byte count (FedAvg and FedProx; FedDP and FedDIP), so a fixed
    offset prints their names on top of each other. Each label, in order, takes the first free spot
    among offsets around its point (nearest first); one that had to move away gets a thin leader
    line. Placement is measured in display space after layout, so call it after ``tight_layout``.
    Where no candidate is free (a very crowded panel), the one overlapping least is used.
    Returns the annotations (their window extents are what the tests check)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    to_display = ax.transData.transform
    px_per_pt = fig.dpi / 72.0
    markers = [_box_around(to_display((x, y)), 5 * px_per_pt) for x, y in points]
    frame = ax.get_window_extent(renderer)
    taken: list[tuple[float, float, float, float]] = []
    placed = []
    for (x, y), text in zip(points, labels):
        best: tuple[float, Any, tuple[float, float, float, float]] | None = None
        for radius in _LABEL_RADII:
            for dx, dy in _LABEL_DIRECTIONS:
                ann = ax.annotate(
                    text,
                    (x, y),
                    textcoords="offset points",
                    xytext=(dx * radius, dy * radius),
                    ha="left" if dx > 0 else "right" if dx < 0 else "center",
                    va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                    fontsize=fontsize,
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="0.4", shrinkA=0, shrinkB=3)
                    if radius > _LABEL_RADII[0]
                    else None,
                )
                ext = ann.get_window_extent(renderer)
                box = (ext.x0, ext.y0, ext.x1, ext.y1)
                outside = box[0] < frame.x0 or box[2] > frame.x1 or box[1] < frame.y0 or box[3] > frame.y1
                cost = sum(_overlap_area(box, other) for other in (*taken, *markers)) + (1e6 if outside else 0.0)
                if best is None or cost < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (cost, ann, box)
                else:
                    ann.remove()
                if cost == 0.0:
                    break
            if best is not None and best[0] == 0.0:
                break
        assert best is not None
        taken.append(best[2])
        placed.append(best[1])
    return placed


def _box_around(xy: Any, half: float) -> tuple[float, float, float, float]:
    return (float(xy[0]) - half, float(xy[1]) - half, float(xy[0]) + half, float(xy[1]) + half)


def _overlap_area(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0
