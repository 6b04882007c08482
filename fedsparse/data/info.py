"""Static facts about each dataset (classes, channels, image size), known without loading it.

Configuration checks use these before any data is read or Ray is started.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    in_channels: int
    image_size: int


DATASET_INFO: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(10, 1, 28),
    "mnist": DatasetInfo(10, 1, 28),
    "cifar10": DatasetInfo(10, 3, 32),
    "cifar100": DatasetInfo(100, 3, 32),
}


def dataset_info(name: str) -> DatasetInfo:
    """Classes, channels and image size of ``name``."""
    if name not in DATASET_INFO:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_INFO)}")
    return DATASET_INFO[name]
