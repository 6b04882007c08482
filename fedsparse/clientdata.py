"""Each virtual client's share of the training set, computed once per process.

Every Ray actor (and the launcher, to validate the split before Ray starts) calls
:func:`partitions_for` with the same configuration; the split is seeded and cached in memory
and on disk by :func:`fedsparse.data.partition_indices`, so it is computed once and identical
everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from fedsparse.data import InMemoryDataset, load_dataset, partition_indices


def dataset_for(cfg: Mapping[str, Any]) -> InMemoryDataset:
    """The configured dataset, loaded once per process."""
    return load_dataset(str(cfg["dataset"]), str(cfg["data-dir"]) or None)


@lru_cache(maxsize=8)
def _partitions(
    dataset: str, data_dir: str, scheme: str, num_clients: int, seed: int, alpha: float, min_size: int, classes: int
) -> tuple[np.ndarray, ...]:
    data = load_dataset(dataset, data_dir or None)
    labels = data.train_labels.numpy()
    parts = partition_indices(
        labels,
        scheme,
        num_clients,
        seed,
        alpha=alpha,
        min_partition_size=min_size,
        classes_per_client=classes,
    )
    return tuple(parts)


def partitions_for(cfg: Mapping[str, Any]) -> tuple[np.ndarray, ...]:
    """Indices of every client's training samples (raises PartitionError if one is empty)."""
    return _partitions(
        str(cfg["dataset"]),
        str(cfg["data-dir"]),
        str(cfg["partition"]),
        int(cfg["num-clients"]),
        int(cfg["seed"]),
        float(cfg["alpha"]),
        int(cfg["min-partition-size"]),
        int(cfg["classes-per-client"]),
    )


def client_data(cfg: Mapping[str, Any], partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, int64 labels) of one client: views into the in-memory training set."""
    parts = partitions_for(cfg)
    if not 0 <= partition_id < len(parts):
        raise ValueError(f"partition-id {partition_id} out of range; this run has {len(parts)} clients")
    data = dataset_for(cfg)
    idx = torch.tensor(parts[partition_id], dtype=torch.int64)  # a copy: the cached split is read-only
    return data.train_images[idx], data.train_labels[idx]
