"""What a run ran on: package versions, the git commit, torch's threads and the device.

The same seed gives the same table only on the same software: a fresh install that resolves a newer
flwr or torch can move the last digits (measured: 0.8463 against 0.8459, bytes identical). So every
run records it — as comments at the top of ``config.toml`` (which a resume still reads as plain
TOML), as ``environment`` in ``summary.json``, and in the bench's ``runs.csv`` — and ``make``
installs from the pinned ``constraints.txt``.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fedsparse.codec import default_index_kinds

PACKAGES = ("fedsparse", "flwr", "torch", "torchvision", "numpy", "ray", "pandas")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the checkout fedsparse is imported from ('' outside a git checkout), with
    ``+dirty`` when it has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return ""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    if head.returncode != 0:
        return ""
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def describe(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Versions, git commit, Python, torch's thread count, the clients' device, and the sparse index
    kinds the codec may choose (``FEDSPARSE_INDEX_KINDS`` narrows them for a benchmark; a run made
    so must say it)."""
    on_gpu = float(cfg.get("client-gpus", 0.0)) > 0 and torch.cuda.is_available()
    return {
        **{name: _version(name) for name in PACKAGES},
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "client_threads": max(1, int(float(cfg.get("client-cpus", 1.0)))),
        "device": torch.cuda.get_device_name(0) if on_gpu else "cpu",
        "index_kinds": ",".join(default_index_kinds()),
    }


def toml_header(cfg: Mapping[str, Any]) -> str:
    """``describe(cfg)`` as TOML comment lines (a config file stays a plain config)."""
    return "".join(f"# {key}: {value}\n" for key, value in describe(cfg).items())


__all__ = ["PACKAGES", "describe", "git_commit", "toml_header"]
