"""experiments/attack_schedule.py: per round, the k sampled partitions with the lowest ids, read
from a run's messages.csv; refuses a run whose partitions are unknown or too few."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from experiments.attack_schedule import schedule
from fedsparse.failures import parse_fail_clients


def _messages(tmp: Path, rounds: dict[int, list[int]]) -> Path:
    rows = [
        {"round": r, "direction": d, "partition_id": p, "node_id": 100 + p, "message_type": "train"}
        for r, parts in rounds.items()
        for p in parts
        for d in ("down", "up")
    ]
    pd.DataFrame(rows).to_csv(tmp / "messages.csv", index=False)
    return tmp


def test_k_lowest_sampled_partitions_each_round(tmp_path: Path) -> None:
    run = _messages(tmp_path, {1: [7, 3, 9, 4], 2: [0, 8, 5, 2]})
    text = schedule(run, 2)
    assert text == "1:3:scale 1:4:scale 2:0:scale 2:2:scale"
    rules = parse_fail_clients(text)
    assert [r.matches(1, 3) for r in rules].count(True) == 1 and not any(r.matches(2, 3) for r in rules)


def test_unknown_partitions_or_too_few_clients_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no partition id"):
        schedule(_messages(tmp_path, {1: [-1, 2]}), 1)
    with pytest.raises(ValueError, match="round 1 sampled 2 clients, fewer than k = 3"):
        schedule(_messages(tmp_path, {1: [1, 2]}), 3)
    with pytest.raises(ValueError, match="k = 0; allowed: k >= 1"):
        schedule(tmp_path, 0)
