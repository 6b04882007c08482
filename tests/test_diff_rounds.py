"""experiments/diff_rounds.py, the before/after proof: cells compared as written; timing columns
left out; a column only the later run has is refused unless --new-columns, which names it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from experiments.diff_rounds import TIMING, compare


def _csv(path: Path, **cols: list[object]) -> Path:
    pd.DataFrame(cols).to_csv(path, index=False)
    return path


def test_identical_but_for_timing(tmp_path: Path) -> None:
    a = _csv(tmp_path / "a.csv", round=[1, 2], test_accuracy=[0.5, 0.6], round_seconds=[1.0, 2.0])
    b = _csv(tmp_path / "b.csv", round=[1, 2], test_accuracy=[0.5, 0.6], round_seconds=[9.0, 9.0])
    assert compare(a, b, TIMING) == (True, "identical (2 rounds × 2 columns)")


def test_a_changed_cell_or_a_new_column_is_reported(tmp_path: Path) -> None:
    a = _csv(tmp_path / "a.csv", round=[1, 2], test_accuracy=[0.5, 0.6])
    changed = _csv(tmp_path / "c.csv", round=[1, 2], test_accuracy=[0.5, 0.6000001])
    assert compare(a, changed, TIMING) == (False, "differs in test_accuracy")
    more = _csv(tmp_path / "m.csv", round=[1, 2], test_accuracy=[0.5, 0.6], regrown=[0, 3])
    assert not compare(a, more, TIMING)[0]
    ok, how = compare(a, more, TIMING, new_columns=True)
    assert ok and how.endswith("new columns left out: regrown)")
    fewer = _csv(tmp_path / "f.csv", round=[1, 2])
    assert not compare(a, fewer, TIMING, new_columns=True)[0]  # a column of the earlier run is gone
