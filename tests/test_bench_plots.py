"""The Pareto figure's labels: none overlaps another, none covers a marker."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedsparse.bench.plots import _overlap_area, place_labels  # noqa: E402

# (MB total, final accuracy) of the default suite's IID split (experiments/results/benchmarks.md, before
# the new methods): FedAvg and FedProx share a byte count, FedDP and FedDIP share both coordinates.
CROWDED = {
    "fedavg": (74.49, 0.8474),
    "fedprox": (74.49, 0.8463),
    "feddp": (19.78, 0.7994),
    "feddip": (19.78, 0.7998),
    "fedluar": (60.84, 0.8466),
    "partial-update": (77.56, 0.8159),
    "topk-ef": (41.94, 0.8388),
    "randk": (41.09, 0.8529),
    "fedpaq": (43.18, 0.8467),
    "snip": (11.81, 0.7941),
    "dgc": (42.5, 0.8401),
    "sbc": (38.9, 0.8390),
    "smartidx": (38.7, 0.8395),
}


def _extents(anns: list) -> list[tuple[float, float, float, float]]:
    renderer = anns[0].figure.canvas.get_renderer()
    out = []
    for a in anns:
        e = a.get_window_extent(renderer)
        out.append((e.x0, e.y0, e.x1, e.y1))
    return out


def _panel() -> tuple[plt.Figure, plt.Axes]:
    fig, ax = plt.subplots(figsize=(6.2, 4.4), dpi=120)
    xs, ys = zip(*CROWDED.values())
    ax.plot(xs, ys, "o", ms=6)
    ax.set_xscale("log")
    fig.tight_layout()
    return fig, ax


def test_labels_of_a_crowded_panel_do_not_overlap() -> None:
    fig, ax = _panel()
    anns = place_labels(ax, list(CROWDED.values()), list(CROWDED))
    assert [a.get_text() for a in anns] == list(CROWDED)
    boxes = _extents(anns)
    for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
        assert _overlap_area(a, b) == 0.0, (list(CROWDED)[i], list(CROWDED)[j])
    px = fig.dpi / 72.0
    for x, y in CROWDED.values():
        mx, my = ax.transData.transform((x, y))
        marker = (mx - 3 * px, my - 3 * px, mx + 3 * px, my + 3 * px)
        assert all(_overlap_area(marker, b) == 0.0 for b in boxes)
    plt.close(fig)


def test_a_fixed_offset_would_overlap_here() -> None:
    """The data above is crowded enough that the old fixed (4, 4)-point offset collides."""
    fig, ax = _panel()
    anns = [ax.annotate(m, xy, textcoords="offset points", xytext=(4, 4), fontsize=7) for m, xy in CROWDED.items()]
    boxes = _extents(anns)
    assert any(_overlap_area(a, b) > 0 for a, b in itertools.combinations(boxes, 2))
    plt.close(fig)
