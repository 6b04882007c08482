"""A run's output directory: what marks it as holding a run, and readying it for a new one.

A finished run is hours of compute; a half-finished one is what ``--resume`` continues. Neither is
replaced by accident: a new run refuses a directory that holds one unless told ``--overwrite``,
and then it says which files it replaces. A path that cannot be a run directory (a file, a
directory the user may not write) is reported in one line, not a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedsparse.config import ConfigError

#: Files whose presence means a directory holds (part of) a run.
RUN_FILES = ("config.toml", "rounds.csv", "checkpoint.npz", "summary.json", "messages.csv", "layer_bytes.csv")


class RunExistsError(ConfigError):
    """``--out`` holds a run and neither ``--resume`` nor ``--overwrite`` was given."""


def run_files(out_dir: str | Path) -> list[str]:
    """The run files present in ``out_dir`` (empty when it holds no run or does not exist)."""
    out_dir = Path(out_dir)
    return [name for name in RUN_FILES if (out_dir / name).exists()] if out_dir.is_dir() else []


def prepare_out_dir(out_dir: str | Path, *, overwrite: bool = False) -> list[str]:
    """Create ``out_dir`` for a new run; return the run files it will replace (``overwrite``).

    Raises :class:`RunExistsError` when it holds a run and ``overwrite`` is false, and
    :class:`ConfigError` when it is a file or cannot be created or written.
    """
    out_dir = Path(out_dir)
    where = f"--out {str(out_dir)!r}"
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{where} is a file, not a directory; choose a directory for the results")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file on the way, no permission, read-only file system
        raise ConfigError(f"{where} cannot be created ({err.strerror or err}); choose a writable directory") from err
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"{where} is not writable; choose a writable directory")
    found = run_files(out_dir)
    if found and not overwrite:
        raise RunExistsError(
            f"{where} holds a run ({', '.join(found)}); continue it with --resume {out_dir}, replace it with "
            "--overwrite, or choose another directory"
        )
    return found


__all__ = ["RUN_FILES", "RunExistsError", "run_files", "prepare_out_dir"]
