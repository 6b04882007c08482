"""What a client split looks like: per-client label counts, a text summary and a bar chart."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def label_histogram(labels: np.ndarray, partitions: Sequence[np.ndarray], num_classes: int) -> pd.DataFrame:
    """One row per client: ``client``, ``size``, then one column per class id ``0..C-1`` (ints)."""
    labels = np.asarray(labels)
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} is out of range; allowed: >= 1")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels span {labels.min()}..{labels.max()}, outside 0..{num_classes - 1}")
    counts = (
        np.stack([np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=num_classes) for p in partitions])
        if len(partitions)
        else np.zeros((0, num_classes), dtype=np.int64)
    )
    df = pd.DataFrame(counts, columns=list(range(num_classes)))
    df.insert(0, "size", counts.sum(axis=1))
    df.insert(0, "client", np.arange(len(partitions)))
    return df


def class_columns(df: pd.DataFrame) -> list[int]:
    """The per-class count columns of a label_histogram frame."""
    return [c for c in df.columns if c not in ("client", "size")]


def split_summary(df: pd.DataFrame) -> dict[str, float]:
    """Sizes (min/median/max) and classes present per client (mean/min/max)."""
    classes = (df[class_columns(df)] > 0).sum(axis=1)
    return {
        "clients": int(len(df)),
        "samples": int(df["size"].sum()),
        "size_min": int(df["size"].min()),
        "size_median": float(df["size"].median()),
        "size_max": int(df["size"].max()),
        "classes_mean": float(classes.mean()),
        "classes_min": int(classes.min()),
        "classes_max": int(classes.max()),
    }


def format_split_report(df: pd.DataFrame, max_rows: int = 20) -> str:
    """A compact text table (first ``max_rows`` clients) plus size and class-count statistics.

    With more than 20 classes the per-class columns give way to the number of classes and
    the three largest classes of each client.
    """
    if len(df) == 0:
        return "(no clients)"
    cols = class_columns(df)
    shown = df.head(max_rows)
    if len(cols) <= 20:
        table = shown.to_string(index=False)
    else:
        present = (shown[cols] > 0).sum(axis=1)
        top = shown[cols].apply(
            lambda row: " ".join(f"{c}:{row[c]}" for c in row.nlargest(3).index if row[c] > 0), axis=1
        )
        table = pd.DataFrame(
            {"client": shown["client"], "size": shown["size"], "classes": present, "top classes": top}
        ).to_string(index=False)
    lines = [table]
    if len(df) > max_rows:
        lines.append(f"... {len(df) - max_rows} more clients")
    s = split_summary(df)
    lines.append(
        f"clients {s['clients']}, samples {s['samples']}; size min/median/max "
        f"{s['size_min']}/{s['size_median']:g}/{s['size_max']}; classes per client mean "
        f"{s['classes_mean']:.2f} (min {s['classes_min']}, max {s['classes_max']})"
    )
    return "\n".join(lines)


def plot_split(df: pd.DataFrame, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Save a stacked bar chart of per-client label counts as PNG; return the path.

    Uses matplotlib's object API with the Agg canvas, so it never touches pyplot's global
    backend (safe in headless Ray workers and alongside other plotting code).
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    cols = class_columns(df)
    n = len(df)
    fig = Figure(figsize=(max(6.0, min(24.0, 0.18 * n + 2)), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["tab10" if len(cols) <= 10 else "tab20"]
    bottom = np.zeros(n)
    x = df["client"].to_numpy()
    for i, c in enumerate(cols):
        values = df[c].to_numpy(dtype=float)
        ax.bar(x, values, bottom=bottom, width=0.85, color=cmap(i % cmap.N), label=str(c), linewidth=0)
        bottom += values
    ax.set_xlabel("client")
    ax.set_ylabel("samples")
    ax.set_xlim(-0.6, n - 0.4)
    if title:
        ax.set_title(title)
    if len(cols) <= 20:
        ax.legend(
            title="class",
            fontsize=7,
            title_fontsize=8,
            ncol=1 if len(cols) <= 10 else 2,
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
        )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
