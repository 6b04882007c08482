"""Whole datasets held in memory as uint8 tensors, loaded once per process.

Images stay uint8 ([N, C, H, W]) so 50 simulated clients in one Ray actor share one copy;
``normalize`` turns a batch into float32 on the fly.
"""

from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsparse.data.idx import IdxFormatError, read_idx
from fedsparse.data.info import DATASET_INFO
from fedsparse.data.paths import IDX_FILES, DatasetFormatError, check_dataset_name, idx_file, locate

#: Per-channel pixel mean / std of the training set (pixels scaled to [0, 1]).
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_NUM_CLASSES: dict[str, int] = {name: info.num_classes for name, info in DATASET_INFO.items()}


@dataclass(frozen=True, eq=False)
class InMemoryDataset:
    """Train and test split of one dataset as uint8 images and int64 labels.

    The tensors are shared by every caller of ``load_dataset`` in the process: index them,
    never modify them in place.
    """

    name: str
    train_images: torch.Tensor  # uint8 [N, C, H, W]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor  # uint8 [M, C, H, W]
    test_labels: torch.Tensor  # int64 [M]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[2])

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """float32 ``(x / 255 - mean) / std`` of a uint8 batch [B, C, H, W] (or one [C, H, W])."""
        if images_uint8.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 images straight from the dataset, got {images_uint8.dtype}")
        if images_uint8.dim() not in (3, 4) or images_uint8.shape[-3] != len(self.mean):
            raise ValueError(
                f"normalize expects [B, {len(self.mean)}, H, W] or [{len(self.mean)}, H, W], "
                f"got shape {tuple(images_uint8.shape)}"
            )
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images_uint8.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=images_uint8.device).view(-1, 1, 1)
        return (images_uint8.to(torch.float32) / 255.0 - mean) / std

    def __repr__(self) -> str:
        return (
            f"InMemoryDataset({self.name!r}, train={tuple(self.train_images.shape)}, "
            f"test={tuple(self.test_images.shape)}, num_classes={self.num_classes})"
        )


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> InMemoryDataset:
    """Load ``name`` from the first data root that holds it (see ``fedsparse.data.paths``).

    Cached per process, keyed by the folder actually found, so a Ray actor reads the files once
    and a change of ``FEDSPARSE_DATA`` is still honoured.
    Raises DatasetNotFoundError (with the routes to get the data) when no root holds it.
    """
    check_dataset_name(name)
    folder = locate(name, data_dir)
    return _load_from(name, str(folder.resolve()))


@functools.lru_cache(maxsize=8)
def _load_from(name: str, folder: str) -> InMemoryDataset:
    path = Path(folder)
    try:
        arrays = _read_idx_split(name, path) if name in ("fashion-mnist", "mnist") else _read_cifar(name, path)
    except DatasetFormatError as err:
        raise type(err)(f"{err}; {_refetch_hint(name)}") from err
    x_train, y_train, x_test, y_test = arrays
    mean, std = _STATS[name]
    return InMemoryDataset(
        name=name,
        train_images=torch.from_numpy(x_train),
        train_labels=torch.from_numpy(y_train),
        test_images=torch.from_numpy(x_test),
        test_labels=torch.from_numpy(y_test),
        num_classes=_NUM_CLASSES[name],
        mean=mean,
        std=std,
    )


def _refetch_hint(name: str) -> str:
    """What to do about a damaged file: the files are replaced whole, by the route that got them."""
    if name in ("fashion-mnist", "mnist"):
        return f"delete the dataset's files and fetch them again: fedsparse data fetch {name}"
    return f"delete the folder and unpack {name}'s python-pickle archive again"


def _read_idx_split(name: str, folder: Path) -> tuple[np.ndarray, ...]:
    """Read and cross-check the four IDX files: shapes, counts, label range."""
    paths = [idx_file(folder, stem) for stem in IDX_FILES]
    missing = [stem for stem, p in zip(IDX_FILES, paths) if p is None]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)}")
    out: list[np.ndarray] = []
    for split in (0, 2):
        img_path, lab_path = paths[split], paths[split + 1]
        assert img_path is not None and lab_path is not None
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.dtype != np.uint8 or images.ndim != 3:
            raise IdxFormatError(f"{img_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise IdxFormatError(f"{lab_path}: expected uint8 labels [N], got {labels.dtype} {labels.shape}")
        if len(images) != len(labels):
            raise IdxFormatError(f"{img_path} holds {len(images)} images but {lab_path} {len(labels)} labels")
        if labels.size and int(labels.max()) >= _NUM_CLASSES[name]:
            raise IdxFormatError(f"{lab_path}: label {int(labels.max())} out of range for {name}")
        out += [np.ascontiguousarray(images[:, None, :, :]), labels.astype(np.int64)]
    return tuple(out)


#: The only globals a CIFAR batch may name: numpy's array reconstruction. Lists, dicts, strings,
#: bytes and numbers need no global.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches without running code: a data folder someone else controls could
    otherwise hold a pickle whose ``__reduce__`` calls ``os.system``. Anything but numpy's array
    reconstruction is refused (:class:`pickle.UnpicklingError`)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a CIFAR batch holds only arrays, lists and dicts"
        )


def _read_cifar(name: str, folder: Path) -> tuple[np.ndarray, ...]:
    """torchvision's python-pickle layout; CIFAR-100 uses the fine (100-class) labels."""
    if name == "cifar10":
        train_files, test_files, label_key = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"
    else:
        train_files, test_files, label_key = ["train"], ["test"], "fine_labels"

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for fname in files:
            path = folder / fname
            try:
                with open(path, "rb") as fh:
                    entry = _ArraysOnlyUnpickler(fh, encoding="latin1").load()
                data = np.asarray(entry["data"], dtype=np.uint8)
                labels = np.asarray(entry[label_key], dtype=np.int64)
            except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
                raise DatasetFormatError(f"{path}: not a readable {name} pickle batch ({exc!r})") from exc
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
                raise DatasetFormatError(
                    f"{path}: expected data [N, 3072] and N labels, got {data.shape}, {labels.shape}"
                )
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(labels)
        x, y = np.concatenate(xs), np.concatenate(ys)
        if y.size and (y.min() < 0 or y.max() >= _NUM_CLASSES[name]):
            raise DatasetFormatError(f"{folder}: labels out of range 0..{_NUM_CLASSES[name] - 1} for {name}")
        return np.ascontiguousarray(x), y

    return (*read(train_files), *read(test_files))


def clear_cache() -> None:
    """Forget the loaded datasets (tests; freeing memory)."""
    _load_from.cache_clear()
