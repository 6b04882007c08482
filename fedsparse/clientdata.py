"""Each virtual client's share of the training set, computed once per process.

Every Ray actor (and the launcher, to validate the split before Ray starts) calls
:func:`partitions_for` with the same configuration; the split is seeded and cached in memory
and on disk by :func:`fedsparse.data.partition_indices`, so it is computed once and identical
everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from fedsparse.data import InMemoryDataset, load_dataset, partition_indices

#: (dataset, data-dir, $FEDSPARSE_DATA) -> the loaded dataset: a client message looks its data up
#: several times, and ``load_dataset`` searches the data roots on disk at every call.
_DATASETS: dict[tuple[str, str, str | None], InMemoryDataset] = {}


def dataset_for(cfg: Mapping[str, Any]) -> InMemoryDataset:
    """The configured dataset, loaded once per process (a changed ``FEDSPARSE_DATA`` is honoured)."""
    key = (str(cfg["dataset"]), str(cfg["data-dir"]), os.environ.get("FEDSPARSE_DATA"))
    data = _DATASETS.get(key)
    if data is None:
        data = load_dataset(key[0], key[1] or None)
        if len(_DATASETS) >= 8:
            _DATASETS.clear()
        _DATASETS[key] = data
    return data


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
    idx = _index_tensor(parts, partition_id)
    return data.train_images[idx], data.train_labels[idx]


#: id(split) -> (split, {partition id: its indices as an int64 tensor}); the split tuples are the
#: ones ``_partitions`` caches, so an id stays valid while its entry holds the tuple.
_INDEX_TENSORS: dict[int, tuple[tuple[np.ndarray, ...], dict[int, torch.Tensor]]] = {}


def _index_tensor(parts: tuple[np.ndarray, ...], partition_id: int) -> torch.Tensor:
    """A client's indices as an int64 tensor, converted once per process (a copy: the cached split
    is read-only)."""
    entry = _INDEX_TENSORS.get(id(parts))
    if entry is None or entry[0] is not parts:
        if len(_INDEX_TENSORS) >= 8:
            _INDEX_TENSORS.clear()
        entry = _INDEX_TENSORS[id(parts)] = (parts, {})
    cache = entry[1]
    idx = cache.get(partition_id)
    if idx is None:
        idx = cache[partition_id] = torch.tensor(parts[partition_id], dtype=torch.int64)
    return idx
