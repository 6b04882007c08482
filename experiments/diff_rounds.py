"""Compare the ``rounds.csv`` of two run trees cell by cell, as text: the proof that a change kept
behaviour (same seed ⇒ same table).

    python experiments/diff_rounds.py runs/eq-before runs/eq-after

Every run directory (``*/rounds.csv``) of the first tree is compared with the one of the same name
in the second. Cells are compared as the strings written to the file, so "equal" means bit for bit
as written. Wall-clock columns (``round_seconds``, ``elapsed_seconds``) are left out: they measure
the machine, not the method. Wire-size columns differ by a few bytes between two runs of the *same*
code (Flower's message ids and timestamps are serialised too): run the suites with
``wire-bytes = false`` (experiments/suites/equivalence.toml does), or pass ``--ignore-wire``.
Exit status 0 when every run is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

TIMING = ("round_seconds", "elapsed_seconds")
WIRE = ("wire_bytes_up", "wire_bytes_down", "cum_wire_bytes_up", "cum_wire_bytes_down")


def compare(a: Path, b: Path, ignore: tuple[str, ...], new_columns: bool = False) -> tuple[bool, str]:
    """(identical?, one line saying how) for two rounds.csv files. ``new_columns``: columns only
    ``b`` has are named and left out (a later version that reports more); every column of ``a``
    must still be in ``b``, cell for cell."""
    x, y = pd.read_csv(a, dtype=str, keep_default_na=False), pd.read_csv(b, dtype=str, keep_default_na=False)
    added = [c for c in y.columns if c not in x.columns]
    if list(x.columns) != list(y.columns) and not (new_columns and all(c in y.columns for c in x.columns)):
        return False, f"columns differ: only in one of them {sorted(set(x.columns) ^ set(y.columns))}"
    if len(x) != len(y):
        return False, f"{len(x)} rounds against {len(y)}"
    cols = [c for c in x.columns if c not in ignore]
    differing = [c for c in cols if not x[c].equals(y[c])]
    if differing:
        return False, f"differs in {', '.join(differing)}"
    extra = f"; new columns left out: {', '.join(added)}" if added else ""
    return True, f"identical ({len(x)} rounds × {len(cols)} columns{extra})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--ignore-wire", action="store_true", help="leave the wire-size columns out too")
    parser.add_argument(
        "--new-columns", action="store_true", help="columns only AFTER has are named and left out (it reports more)"
    )
    args = parser.parse_args(argv)
    ignore = TIMING + (WIRE if args.ignore_wire else ())
    runs = sorted(p.parent.relative_to(args.before) for p in args.before.rglob("rounds.csv"))
    if not runs:
        print(f"no rounds.csv under {args.before}", file=sys.stderr)
        return 1
    same = 0
    for run in runs:
        other = args.after / run / "rounds.csv"
        ok, how = (
            compare(args.before / run / "rounds.csv", other, ignore, args.new_columns)
            if other.is_file()
            else (False, "missing")
        )
        same += ok
        print(f"{run}: {how}")
    print(f"{same} of {len(runs)} runs identical (ignored: {', '.join(ignore)})")
    return 0 if same == len(runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
