"""Seeded IID / Dirichlet / pathological client splits, computed by flwr-datasets' partitioners.

The partitioners run on a two-column ``datasets.Dataset`` (``idx``, ``label``) built from the
label array, and each partition's ``idx`` column gives indices into the caller's own arrays;
the images never go through HF datasets. Results are cached in-process and on disk
(``<user cache>/partitions/*.npz``) because a pathological split of 60k labels takes seconds
and every Ray actor would otherwise recompute it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from fedsparse.data.paths import user_cache_dir

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "pathological")
#: Bump when the way a split is derived changes, so stale disk-cache entries are not reused.
_CACHE_VERSION = 1
_MEMORY_CACHE: dict[str, tuple[np.ndarray, ...]] = {}
_MEMORY_CACHE_MAX = 32
#: A split's arguments (scheme name, ints and floats): the cache key and what _compute reads.
_Params = dict[str, str | int | float]


class PartitionError(ValueError):
    """The requested split cannot be made (empty clients, unreachable minimum size, ...)."""


def partition_cache_dir() -> Path:
    """Where split results are cached on disk."""
    return user_cache_dir() / "partitions"


def partition_indices(
    labels: np.ndarray,
    scheme: str,
    num_partitions: int,
    seed: int,
    *,
    alpha: float = 0.5,
    min_partition_size: int = 10,
    classes_per_client: int = 2,
) -> list[np.ndarray]:
    """Split ``labels`` among ``num_partitions`` clients; return each client's sorted indices.

    - ``iid``: a seeded shuffle, then flwr-datasets' IidPartitioner (equal sizes, +-1).
    - ``dirichlet``: DirichletPartitioner(partition_by="label", alpha, min_partition_size, seed);
      smaller alpha = more label skew. It resamples (at most 11 times) until every client has
      ``min_partition_size`` samples, then gives up with a PartitionError.
    - ``pathological``: PathologicalPartitioner with ``classes_per_client`` classes per client,
      class_assignment_mode="first-deterministic" (client i gets class i mod C, the rest at
      random without repeats: exactly ``classes_per_client`` distinct classes each, and every
      class used once there are at least C clients).

    Same arguments, same split (also across processes). Only the arguments a scheme uses are
    validated and enter its cache key. The returned arrays are read-only (they are shared).
    """
    labels = _check_labels(labels)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    n = len(labels)
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, (int, np.integer)):
        raise ValueError(f"num_partitions must be an int, got {num_partitions!r}")
    if not 1 <= num_partitions <= n:
        raise ValueError(f"num_partitions={num_partitions} is out of range; allowed 1..{n} (the number of labels)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    params: _Params = {"scheme": scheme, "num_partitions": int(num_partitions), "seed": int(seed)}
    if scheme == "dirichlet":
        if not (isinstance(alpha, (int, float, np.floating)) and np.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha={alpha!r} is out of range; the Dirichlet concentration must be > 0")
        if (
            isinstance(min_partition_size, bool)
            or not isinstance(min_partition_size, (int, np.integer))
            or min_partition_size < 0
        ):
            raise ValueError(f"min_partition_size={min_partition_size!r} is out of range; allowed: an int >= 0")
        if num_partitions * min_partition_size > n:
            raise PartitionError(
                f"min_partition_size={min_partition_size} for {num_partitions} clients needs "
                f"{num_partitions * min_partition_size} samples but there are only {n}; "
                f"use fewer clients or a min_partition_size <= {n // num_partitions}"
            )
        params.update(alpha=float(alpha), min_partition_size=int(min_partition_size))
    elif scheme == "pathological":
        num_classes = len(np.unique(labels))
        if (
            isinstance(classes_per_client, bool)
            or not isinstance(classes_per_client, (int, np.integer))
            or not (1 <= classes_per_client <= num_classes)
        ):
            raise ValueError(
                f"classes_per_client={classes_per_client!r} is out of range; the labels hold "
                f"{num_classes} classes, so choose 1..{num_classes}"
            )
        params.update(classes_per_client=int(classes_per_client))

    key = _cache_key(labels, params)
    parts = _MEMORY_CACHE.get(key)
    if parts is None:
        parts = _load_disk(key, n)
    if parts is None:
        parts = _compute(labels, params)
        _store_disk(key, parts)
    if len(_MEMORY_CACHE) >= _MEMORY_CACHE_MAX:
        _MEMORY_CACHE.pop(next(iter(_MEMORY_CACHE)))
    _MEMORY_CACHE[key] = parts
    _check_not_empty(parts, params, n)
    return list(parts)


def clear_memory_cache() -> None:
    """Forget in-process results (tests)."""
    _MEMORY_CACHE.clear()


# --------------------------------------------------------------------------- computing


def _check_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _compute(labels: np.ndarray, params: _Params) -> tuple[np.ndarray, ...]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    num_partitions = int(params["num_partitions"])
    seed = int(params["seed"])
    ds = datasets.Dataset.from_dict({"idx": np.arange(len(labels), dtype=np.int64), "label": labels})
    scheme = params["scheme"]
    if scheme == "iid":
        # IidPartitioner takes contiguous shards; shuffling first makes the split random and seeded.
        ds = ds.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(params["alpha"]),
            min_partition_size=int(params["min_partition_size"]),
            shuffle=False,  # order within a client is irrelevant: we return sorted indices
            seed=seed,
        )
    else:
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=int(params["classes_per_client"]),
            class_assignment_mode="first-deterministic",
            shuffle=False,
            seed=seed,
        )
    partitioner.dataset = ds
    with warnings.catch_warnings():
        # Dirichlet warns on every resampling round; Pathological when a class goes unused.
        warnings.simplefilter("ignore", UserWarning)
        try:
            parts = tuple(
                _frozen(np.sort(np.asarray(partitioner.load_partition(pid)["idx"], dtype=np.int64)))
                for pid in range(num_partitions)
            )
        except ValueError as exc:
            raise PartitionError(_explain(exc, params, len(labels))) from exc
    return parts


def _explain(exc: ValueError, params: _Params, n: int) -> str:
    scheme = params["scheme"]
    what = _describe(params, n)
    if scheme == "dirichlet":
        return (
            f"{what}: could not give every client at least min_partition_size="
            f"{params['min_partition_size']} samples after 11 Dirichlet draws ({exc}). "
            "Use a larger alpha, fewer clients, or a smaller min_partition_size."
        )
    if scheme == "pathological":
        return f"{what}: {exc} Use fewer clients or fewer classes per client."
    return f"{what}: {exc}"


def _describe(params: _Params, n: int) -> str:
    extra = {k: v for k, v in params.items() if k not in ("scheme", "num_partitions")}
    args = ", ".join(f"{k}={v}" for k, v in extra.items())
    return f"{params['scheme']} split of {n} labels into {params['num_partitions']} clients ({args})"


def _check_not_empty(parts: tuple[np.ndarray, ...], params: _Params, n: int) -> None:
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        shown = ", ".join(map(str, empty[:20])) + (f", ... ({len(empty)} in all)" if len(empty) > 20 else "")
        raise PartitionError(
            f"{_describe(params, n)} leaves {len(empty)} client(s) with no samples: {shown}. "
            "Use a larger alpha, fewer clients, or a min_partition_size >= 1 (so the "
            "Dirichlet draw is repeated until every client gets that many)."
        )


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


# --------------------------------------------------------------------------- caching


def _cache_key(labels: np.ndarray, params: _Params) -> str:
    digest = hashlib.sha256(labels.tobytes()).hexdigest()
    payload = json.dumps(
        {"v": _CACHE_VERSION, "flwr_datasets": _flwr_datasets_version(), "labels": digest, **params},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def _flwr_datasets_version() -> str:
    """From the package metadata: importing flwr_datasets (and HF datasets) costs seconds."""
    try:
        return importlib.metadata.version("flwr-datasets")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _load_disk(key: str, n: int) -> tuple[np.ndarray, ...] | None:
    path = partition_cache_dir() / f"{key}.npz"
    try:
        with np.load(path, allow_pickle=False) as npz:
            parts = tuple(_frozen(npz[f"p{i}"].astype(np.int64)) for i in range(int(npz["count"])))
    except (OSError, KeyError, ValueError, EOFError):
        return None  # absent or damaged: recompute
    total = np.concatenate(parts) if parts else np.empty(0, np.int64)
    if len(total) != n or (total.size and (total.min() < 0 or total.max() >= n)):
        return None
    return parts


def _store_disk(key: str, parts: tuple[np.ndarray, ...]) -> None:
    """Write atomically (tmp file + rename) so concurrent Ray actors never read half a file."""
    folder = partition_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}-", suffix=".npz", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, count=np.int64(len(parts)), **{f"p{i}": p for i, p in enumerate(parts)})  # type: ignore[arg-type]  # keys p0, p1, ... never hit savez's allow_pickle
            os.replace(tmp, folder / f"{key}.npz")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass  # a read-only cache dir only costs recomputation
