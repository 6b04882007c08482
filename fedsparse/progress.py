"""A one-line progress display for long runs: round, accuracy, MB moved, time per round."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

from tqdm import tqdm

MB = 1e6


class Progress:
    """tqdm bar over rounds whose postfix shows the latest accuracy and the MB moved so far."""

    def __init__(self, total: int, *, enabled: bool = True, label: str = "") -> None:
        self.bar = tqdm(
            total=total, desc=label or "rounds", unit="rnd", disable=not enabled, file=sys.stderr, dynamic_ncols=True
        )
        self.best = math.nan
        # Central evaluation runs every `eval-every` rounds: between evaluations the bar keeps the
        # latest measured accuracy (with its round) instead of flashing "nan".
        self.last: tuple[float, int] | None = None

    def update(self, row: Mapping[str, Any]) -> None:
        acc = row.get("test_accuracy", math.nan)
        if acc is not None and not math.isnan(acc):
            self.best = acc if math.isnan(self.best) else max(self.best, acc)
            self.last = (float(acc), int(row.get("round", 0)))
        self.bar.set_postfix_str(f"{self.accuracy_text()} {self.traffic_text(row)}", refresh=False)
        self.bar.update(1)

    def accuracy_text(self) -> str:
        """``acc 0.8123@r45 (best 0.8200)``, or ``acc -`` before the first evaluation."""
        if self.last is None:
            return "acc -"
        acc, rnd = self.last
        return f"acc {acc:.4f}@r{rnd} (best {self.best:.4f})"

    @staticmethod
    def traffic_text(row: Mapping[str, Any]) -> str:
        return (
            f"up {row['cum_bytes_up'] / MB:.2f} MB down {row['cum_bytes_down'] / MB:.2f} MB "
            f"{row['round_seconds']:.1f}s/rnd"
        )

    def close(self) -> None:
        self.bar.close()
