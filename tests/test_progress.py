"""The progress line between central evaluations keeps the latest measured accuracy."""

from __future__ import annotations

import math

from fedsparse.progress import Progress


def _row(rnd: int, acc: float) -> dict:
    return {
        "round": rnd,
        "test_accuracy": acc,
        "cum_bytes_up": 2e6 * rnd,
        "cum_bytes_down": 1e6 * rnd,
        "round_seconds": 1.5,
    }


def test_accuracy_text_keeps_the_last_evaluation() -> None:
    bar = Progress(4, enabled=False)
    bar.update(_row(1, math.nan))
    assert bar.accuracy_text() == "acc -"
    bar.update(_row(2, 0.5))
    bar.update(_row(3, math.nan))
    assert bar.accuracy_text() == "acc 0.5000@r2 (best 0.5000)"
    bar.update(_row(4, 0.25))
    assert bar.accuracy_text() == "acc 0.2500@r4 (best 0.5000)"
    assert Progress.traffic_text(_row(4, 0.25)) == "up 8.00 MB down 4.00 MB 1.5s/rnd"
    bar.close()
