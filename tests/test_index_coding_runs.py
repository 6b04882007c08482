"""experiments/index_coding_runs.py: the with/without-golomb comparison counts only runs whose
training is identical, and reports the byte ratio from the runs' own summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from experiments.index_coding_runs import main, table


def _run(root: Path, name: str, acc: list[float], up: list[int], kinds: str) -> None:
    d = root / name
    d.mkdir(parents=True)
    pd.DataFrame(
        {
            "round": [1, 2],
            "test_accuracy": acc,
            "bytes_up": up,
            "bytes_down": [100, 100],
            "cum_bytes_up": [up[0], sum(up)],
            "cum_dense_bytes_up": [4000, 8000],  # the dense reference: must not move
            "index_kinds": [kinds, kinds],  # partial-update's report of the kinds it chose: may move
            "round_seconds": [1.0, 2.0],
        }
    ).to_csv(d / "rounds.csv", index=False)
    summary = {
        "final_accuracy": acc[-1],
        "mb_up": sum(up) / 1e6,
        "mb_down": 200 / 1e6,
        "mb_total": (sum(up) + 200) / 1e6,
        "environment": {"index_kinds": kinds},
    }
    (d / "summary.json").write_text(json.dumps(summary))


def test_only_identical_training_is_counted_and_ratios_come_from_the_summaries(tmp_path: Path, capsys) -> None:
    with_g, without = tmp_path / "with", tmp_path / "without"
    _run(with_g, "topk-ef--iid--s0", [0.5, 0.6], [800, 800], "bitmap,coords,golomb")
    _run(without, "topk-ef--iid--s0", [0.5, 0.6], [1000, 1000], "bitmap,coords")
    _run(with_g, "sbc--iid--s0", [0.5, 0.6], [500, 500], "bitmap,coords,golomb")
    _run(without, "sbc--iid--s0", [0.5, 0.7], [600, 600], "bitmap,coords")  # training moved: not counted
    df, problems = table(with_g, without)
    assert list(df["method"]) == ["topk-ef"]
    row = df.iloc[0]
    assert row["x_up"] == 0.8 and row["x_down"] == 1.0 and abs(row["x_total"] - 1800 / 2200) < 1e-12
    assert len(problems) == 1 and "sbc--iid--s0" in problems[0] and "test_accuracy" in problems[0]
    assert main([str(with_g), str(without)]) == 1  # a problem is a failure
    assert "training differs" in capsys.readouterr().out
