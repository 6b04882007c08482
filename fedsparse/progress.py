"""A one-line progress display for long runs: round, accuracy, MB moved, time per round."""

from __future__ import annotations

import math
import sys
from typing import Any, Mapping

from tqdm import tqdm

MB = 1e6


class Progress:
    """tqdm bar over rounds whose postfix shows the latest accuracy and the MB moved so far."""

    def __init__(self, total: int, *, enabled: bool = True, label: str = "") -> None:
        self.bar = tqdm(total=total, desc=label or "rounds", unit="rnd", disable=not enabled, file=sys.stderr, dynamic_ncols=True)
        self.best = math.nan

    def update(self, row: Mapping[str, Any]) -> None:
        acc = row.get("test_accuracy", math.nan)
        if not math.isnan(acc):
            self.best = acc if math.isnan(self.best) else max(self.best, acc)
        self.bar.set_postfix_str(
            f"acc {acc:.4f} (best {self.best:.4f}) "
            f"up {row['cum_bytes_up'] / MB:.2f} MB down {row['cum_bytes_down'] / MB:.2f} MB "
            f"{row['round_seconds']:.1f}s/rnd",
            refresh=False,
        )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
