"""Data: in-memory datasets, fetch routes, non-IID partitions.

- ``load_dataset(name, data_dir=None)`` -> ``InMemoryDataset`` (uint8 tensors, cached per process)
- ``fetch_dataset(name, dest=None, route="auto", source=None)`` -> folder with verified IDX files
- ``partition_indices(labels, scheme, num_partitions, seed, ...)`` -> per-client index arrays
- ``label_histogram`` / ``format_split_report`` / ``plot_split``: what a split looks like
- ``fedsparse.data.cli.add_data_commands``: the ``fedsparse data`` command

Heavy imports (HF datasets, flwr-datasets, matplotlib, torchvision) happen only when used.
"""

from __future__ import annotations

from fedsparse.data.fetch import ROUTES, ChecksumError, FetchError, fetch_dataset, verify_files
from fedsparse.data.idx import IdxFormatError, read_idx
from fedsparse.data.info import DATASET_INFO, DatasetInfo, dataset_info
from fedsparse.data.inmemory import InMemoryDataset, load_dataset
from fedsparse.data.partition import SCHEMES, PartitionError, partition_indices
from fedsparse.data.paths import DATASETS, DatasetFormatError, DatasetNotFoundError, locate, search_roots, user_data_dir
from fedsparse.data.report import format_split_report, label_histogram, plot_split

__all__ = [
    "DATASET_INFO",
    "DatasetInfo",
    "dataset_info",
    "DATASETS",
    "ROUTES",
    "SCHEMES",
    "ChecksumError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "FetchError",
    "IdxFormatError",
    "InMemoryDataset",
    "PartitionError",
    "fetch_dataset",
    "format_split_report",
    "label_histogram",
    "load_dataset",
    "locate",
    "partition_indices",
    "plot_split",
    "read_idx",
    "search_roots",
    "user_data_dir",
    "verify_files",
]
