"""The state of one run directory: finished, resumable from a checkpoint, or to be run from scratch.

One definition serves every reader (the runner deciding what to skip or resume, the reports deciding
what to count, ``--dry-run``), so they can never disagree about a run. The bench, not the run,
decides that a run finished: its completion marker ``bench.json`` is written only after the run's
process exited 0 and its summary.json parsed — a summary.json alone may belong to a run that failed
afterwards.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsparse.config import Config

#: Per-run resource use the default runner measures (CPU seconds of the run's process tree).
USAGE_FILE = "bench-usage.json"
#: The bench's completion marker in a run directory: written (atomically) only once the run's
#: process exited 0 and its summary.json parsed. A run directory without it is not finished.
DONE_FILE = "bench.json"


@dataclass(frozen=True)
class FinishedRun:
    """A finished run's figures: its summary.json and the bench's completion marker (bench.json)."""

    summary: dict[str, Any]
    record: dict[str, Any]


def read_json_object(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(the JSON object in ``path``, "") or (None, why it cannot be used)."""
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{path.name} does not parse ({type(err).__name__})"
    if not isinstance(data, dict):
        return None, f"{path.name} holds {type(data).__name__}, not a JSON object"
    return data, ""


def run_outputs(run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """(summary, "") when the files the reports read are there and summary.json parses."""
    summary, why = read_json_object(run_dir / "summary.json")
    if summary is None:
        return None, why
    if not (run_dir / "rounds.csv").is_file():
        return None, "no rounds.csv"
    return summary, ""


def finished_run(run_dir: Path) -> tuple[FinishedRun | None, str]:
    """The one definition of a finished run, used both to skip runs (:func:`run_status`) and to read
    them (:func:`fedsparse.bench.report.collect`): the bench's completion marker ``bench.json``
    parses (the bench writes it, atomically, only after the run's process exited 0 and its
    summary.json parsed), summary.json still parses and rounds.csv is there. Returns (the run, "")
    or (None, why not).

    A summary.json without the marker is a run that failed after writing it (plots, process exit)
    or was cut short while the bench waited: it is not finished, whatever summary.json says.
    """
    if not run_dir.exists():
        return None, "not run"
    record, why = read_json_object(run_dir / DONE_FILE)
    if record is None:
        return None, "incomplete" if why == f"no {DONE_FILE}" else f"incomplete ({why})"
    summary, why = run_outputs(run_dir)
    if summary is None:
        return None, f"incomplete ({why})"
    return FinishedRun(summary, record), ""


def write_marker(run_dir: Path, record: Mapping[str, Any]) -> None:
    """Write bench.json atomically (a temporary file renamed over it): it is whole or absent."""
    tmp = run_dir / f".{DONE_FILE}.tmp"
    with tmp.open("w") as f:
        f.write(json.dumps(dict(record)) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / DONE_FILE)


def _comparable(cfg: Mapping[str, Any]) -> dict[str, Any]:
    # Operational keys do not change what a run computes: a finished run with other values is still
    # valid (the same keys a resumed run may change; imported here: checkpoint imports torch).
    from fedsparse.checkpoint import OPERATIONAL_KEYS

    return {k: v for k, v in cfg.items() if k not in OPERATIONAL_KEYS}


def config_changes(cfg: Config, have: Mapping[str, Any]) -> str:
    """How ``have`` (a run's recorded configuration) differs from ``cfg`` in what the run computes:
    "" when it does not, else up to four ``key: old -> new`` items.

    Operational keys are ignored, and a key the run did not know yet (added to fedsparse since)
    counts as its default.
    """
    from fedsparse.config import defaults

    want = json.loads(json.dumps(_comparable(cfg)))
    had = json.loads(json.dumps(_comparable(have)))
    known = json.loads(json.dumps(defaults()))
    had = {k: had.get(k, known.get(k)) for k in want}
    changed = sorted(k for k in want if want[k] != had[k])
    return ", ".join(f"{k}: {had.get(k)!r} -> {want.get(k)!r}" for k in changed[:4])


def _recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's config.toml, or None when it is missing or does not parse."""
    try:
        return tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None


def run_status(run_dir: Path, cfg: Config) -> tuple[bool, str]:
    """(complete, why not): complete when :func:`finished_run` says so and config.toml matches ``cfg``."""
    finished, why = finished_run(run_dir)
    if finished is None:
        return False, why
    if not (run_dir / "config.toml").is_file():
        return False, "no config.toml"
    done = _recorded_config(run_dir)
    if done is None:
        return False, "config.toml does not parse"
    changed = config_changes(cfg, done)
    if changed:
        return False, f"configuration changed ({changed})"
    return True, ""


#: Why :func:`resume_point` says no when there is nothing to resume (the usual case, not worth a word).
RESTART_QUIETLY = ("not run", "no checkpoint")


def resume_point(run_dir: Path, cfg: Config) -> tuple[int | None, str]:
    """(the checkpoint's round, "") when ``run_dir`` holds an unfinished run of ``cfg`` that
    ``fedsparse run --resume`` can continue, else (None, why not).

    Resumable: a readable ``checkpoint.npz`` (the run had ``checkpoint-every`` > 0) whose
    configuration, and the run's config.toml, match ``cfg`` (operational keys aside). A long run cut
    short is then continued from its last checkpoint instead of started again from round 1; any
    other unfinished run directory is cleared and run from scratch.
    """
    if not run_dir.is_dir():
        return None, "not run"
    from fedsparse.checkpoint import CHECKPOINT_FILE, read_checkpoint_config

    if not (run_dir / CHECKPOINT_FILE).is_file():
        return None, "no checkpoint"
    try:
        server_round, saved = read_checkpoint_config(run_dir)
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint means: start over
        return None, f"checkpoint unreadable ({type(err).__name__})"
    recorded = _recorded_config(run_dir)
    if recorded is None:
        return None, "config.toml missing or unreadable"
    for what, have in (("checkpoint", saved), ("config.toml", recorded)):
        changed = config_changes(cfg, have)
        if changed:
            return None, f"its {what} is of another configuration ({changed})"
    return server_round, ""
