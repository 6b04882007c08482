"""Aggregation arithmetic shared by strategies that average decoded payloads themselves."""

from __future__ import annotations

import numpy as np


def weighted_mean(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Σ ρ_n x_n in float64, cast back to the inputs' dtype (integers rounded)."""
    acc = np.zeros(arrays[0].shape, dtype=np.float64)
    for x, w in zip(arrays, weights):
        acc += np.asarray(x, dtype=np.float64) * w
    dtype = arrays[0].dtype
    if dtype.kind in "iub":
        acc = np.rint(acc)
    return acc.astype(dtype)


__all__ = ["weighted_mean"]
