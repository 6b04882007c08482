"""Client splits made by flwr-datasets' partitioners, on real Fashion-MNIST labels."""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import numpy as np
import pytest

from fedsparse.data import PartitionError, partition_indices
from fedsparse.data.partition import clear_memory_cache, partition_cache_dir

SHARED = Path(os.environ.get("FEDSPARSE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
_LABELS_FILE = SHARED / "fashion-mnist" / "train-labels-idx1-ubyte.gz"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    clear_memory_cache()


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """6000 real labels (a 10% prefix keeps the partitioners fast)."""
    if not _LABELS_FILE.is_file():
        pytest.skip(f"no datasets at {SHARED}")
    return np.frombuffer(gzip.decompress(_LABELS_FILE.read_bytes())[8:], np.uint8)[:6000].astype(np.int64)


def _check_cover(parts: list[np.ndarray], n: int) -> None:
    assert sum(len(p) for p in parts) == n
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == n  # disjoint and complete
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted


SPLITS = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.5}),
    ("pathological", {"classes_per_client": 2}),
]


@pytest.mark.parametrize(("scheme", "kw"), SPLITS)
def test_splits_cover_all_indices_once_and_are_seeded(labels: np.ndarray, scheme: str, kw: dict) -> None:
    parts = partition_indices(labels, scheme, 20, seed=3, **kw)
    assert len(parts) == 20 and all(p.dtype == np.int64 and len(p) > 0 for p in parts)
    _check_cover(parts, len(labels))
    clear_memory_cache()
    for f in partition_cache_dir().glob("*.npz"):
        f.unlink()  # recompute from scratch: same seed, same split
    again = partition_indices(labels, scheme, 20, seed=3, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(labels, scheme, 20, seed=4, **kw)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_equal_and_not_contiguous(labels: np.ndarray) -> None:
    parts = partition_indices(labels, "iid", 7, seed=0)
    assert {len(p) for p in parts} <= {len(labels) // 7, len(labels) // 7 + 1}
    assert parts[0][-1] - parts[0][0] > len(labels) // 2  # shuffled, not a contiguous shard


def test_pathological_gives_exactly_k_classes(labels: np.ndarray) -> None:
    for k in (1, 3):
        parts = partition_indices(labels, "pathological", 30, seed=0, classes_per_client=k)
        assert [len(np.unique(labels[p])) for p in parts] == [k] * 30
        _check_cover(parts, len(labels))  # 30 clients >= 10 classes: every class used


def _mean_tv_distance(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between a client's label mix and the global one."""
    glob = np.bincount(labels, minlength=10) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - glob).sum() for p in parts]))


def test_dirichlet_small_alpha_is_skewed_vs_iid(labels: np.ndarray) -> None:
    iid = _mean_tv_distance(labels, partition_indices(labels, "iid", 20, seed=0))
    mild = _mean_tv_distance(labels, partition_indices(labels, "dirichlet", 20, seed=0, alpha=100.0))
    skewed = _mean_tv_distance(labels, partition_indices(labels, "dirichlet", 20, seed=0, alpha=0.1))
    assert iid < 0.1 and mild < 0.15
    assert skewed > 0.5
    first_draw = partition_indices(labels, "dirichlet", 20, seed=0, alpha=0.1, min_partition_size=10)
    assert min(len(p) for p in first_draw) < 30
    redrawn = partition_indices(labels, "dirichlet", 20, seed=0, alpha=0.1, min_partition_size=30)
    assert min(len(p) for p in redrawn) >= 30


def test_results_are_cached_on_disk_and_shared(labels: np.ndarray) -> None:
    parts = partition_indices(labels, "pathological", 10, seed=1)
    files = list(partition_cache_dir().glob("*.npz"))
    assert len(files) == 1
    assert not parts[0].flags.writeable  # shared with later callers
    clear_memory_cache()
    cached = partition_indices(labels, "pathological", 10, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, cached))
    files[0].write_bytes(b"not an npz")  # a damaged entry is recomputed, not trusted
    clear_memory_cache()
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_indices(labels, "pathological", 10, seed=1)))
    # irrelevant arguments do not change the key; relevant ones do
    partition_indices(labels, "pathological", 10, seed=1, alpha=9.0)
    partition_indices(labels, "pathological", 10, seed=1, classes_per_client=3)
    assert len(list(partition_cache_dir().glob("*.npz"))) == 2


def test_empty_clients_raise_partition_error(labels: np.ndarray) -> None:
    with pytest.raises(
        PartitionError, match=r"leaves \d+ client\(s\) with no samples: 0, .*larger alpha, fewer clients"
    ):
        partition_indices(labels, "dirichlet", 100, seed=0, alpha=0.01, min_partition_size=0)


def test_hopeless_min_size_fails_in_bounded_time(labels: np.ndarray) -> None:
    start = time.perf_counter()
    with pytest.raises(
        PartitionError, match="min_partition_size=25.*larger alpha, fewer clients, or a smaller min_partition_size"
    ):
        partition_indices(labels, "dirichlet", 200, seed=0, alpha=0.01, min_partition_size=25)
    assert time.perf_counter() - start < 10
    with pytest.raises(PartitionError, match="needs 6600 samples but there are only 6000"):
        partition_indices(labels, "dirichlet", 60, seed=0, min_partition_size=110)


def test_pathological_infeasible_is_partition_error() -> None:
    labels = np.array([0] * 50 + [1] * 3 + [2] * 50)
    with pytest.raises(PartitionError, match="fewer clients or fewer classes per client"):
        partition_indices(labels, "pathological", 30, seed=0, classes_per_client=3)


@pytest.mark.parametrize(
    ("args", "kw", "match"),
    [
        (("shards", 10), {}, "unknown partition scheme 'shards'; choose one of: iid, dirichlet, pathological"),
        (("iid", 0), {}, r"num_partitions=0 is out of range; allowed 1\.\.6000"),
        (("iid", 6001), {}, r"num_partitions=6001 is out of range; allowed 1\.\.6000"),
        (("dirichlet", 10), {"alpha": 0.0}, r"alpha=0\.0 is out of range.*> 0"),
        (("dirichlet", 10), {"alpha": -1.0}, r"alpha=-1\.0 is out of range"),
        (("dirichlet", 10), {"min_partition_size": -1}, r"min_partition_size=-1 is out of range"),
        (("pathological", 10), {"classes_per_client": 0}, r"classes_per_client=0 is out of range.*1\.\.10"),
        (("pathological", 10), {"classes_per_client": 11}, r"classes_per_client=11 is out of range.*1\.\.10"),
    ],
)
def test_bad_arguments_name_value_and_range(labels: np.ndarray, args: tuple, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        partition_indices(labels, args[0], args[1], 0, **kw)


def test_bad_labels() -> None:
    with pytest.raises(ValueError, match="non-empty 1-D"):
        partition_indices(np.zeros((2, 3), dtype=np.int64), "iid", 2, 0)
    with pytest.raises(ValueError, match="integers"):
        partition_indices(np.zeros(10), "iid", 2, 0)
