"""fedsparse.arrays: the cached-header conversions give exactly what Flower's own give.

Bytes are counted from ``Array.data``, so :func:`to_array` must produce the very bytes
``Array(ndarray)`` (``np.save``) does, and :func:`to_numpy` the very array ``Array.numpy()``
(``np.load``) does — for every dtype and layout a model or a codec payload uses, and for the odd ones
(Fortran order, big-endian, empty, 0-d) through Flower's path. A corrupt buffer must fail as it did.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedsparse.arrays import record_from_numpy, record_from_torch, record_to_numpy, record_to_torch, to_array, to_numpy
from fedsparse.models import build_model

RNG = np.random.default_rng(0)
CASES = {
    "float32 matrix": RNG.standard_normal((6, 5)).astype(np.float32),
    "float64 4-d": RNG.standard_normal((2, 3, 4, 5)),
    "float16": RNG.standard_normal(17).astype(np.float16),
    "int64": RNG.integers(-5, 5, 31),
    "uint8": RNG.integers(0, 255, (3, 9)).astype(np.uint8),
    "bool": RNG.random(13) > 0.5,
    "0-d": np.array(3.5, dtype=np.float32),
    "empty": np.zeros((0, 4), dtype=np.float32),
    "big-endian": RNG.standard_normal(7).astype(">f4"),
    "non-contiguous slice": RNG.standard_normal((8, 8)).astype(np.float32)[::2, 1::3],
    "Fortran order": np.asfortranarray(RNG.standard_normal((4, 3)).astype(np.float32)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_to_array_is_byte_identical_to_flowers(name: str) -> None:
    x = CASES[name]
    for _ in range(2):  # first call formats the header, the second reuses it
        ours, flowers = to_array(x), Array(x)
        assert ours.data == flowers.data
        assert (ours.dtype, ours.shape, ours.stype) == (flowers.dtype, flowers.shape, flowers.stype)


@pytest.mark.parametrize("name", list(CASES))
def test_to_numpy_equals_np_load(name: str) -> None:
    arr = Array(CASES[name])
    for _ in range(2):
        ours, flowers = to_numpy(arr), arr.numpy()
        assert ours.dtype == flowers.dtype and ours.shape == flowers.shape
        assert ours.tobytes() == flowers.tobytes()
        assert ours.flags.writeable  # callers may update it in place, as they could np.load's
        if ours.size:
            ours.flat[0] = ours.flat[0]


def test_records_match_flowers_for_a_model() -> None:
    state = build_model("lenet5", 10, 1, 28).state_dict()
    ours, flowers = record_from_torch(state), ArrayRecord(state)
    assert list(ours.keys()) == list(flowers.keys())
    assert all(ours[k].data == flowers[k].data for k in flowers)
    assert ours.count_bytes() == flowers.count_bytes()
    back, theirs = record_to_torch(flowers), flowers.to_torch_state_dict()
    assert list(back) == list(theirs) and all(torch.equal(back[k], theirs[k]) for k in theirs)
    arrays = record_to_numpy(flowers)
    again = record_from_numpy(arrays)
    assert all(again[k].data == flowers[k].data for k in flowers)


def test_corrupt_buffers_fail_as_numpy_does() -> None:
    good = Array(np.arange(10, dtype=np.float32))
    truncated = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-3])
    with pytest.raises(ValueError):
        truncated.numpy()
    with pytest.raises(ValueError):
        to_numpy(truncated)
    garbage = Array(dtype="float32", shape=(3,), stype=good.stype, data=b"not an npy buffer at all")
    with pytest.raises(ValueError):
        to_numpy(garbage)
    other = Array(dtype="float32", shape=(3,), stype="torch.raw", data=good.data)
    with pytest.raises(TypeError, match="Unsupported serialization type"):
        to_numpy(other)
