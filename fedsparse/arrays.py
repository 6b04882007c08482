"""Flower ``Array`` ↔ numpy / torch, exactly as Flower does it, without re-parsing every header.

Why: a Flower ``Array`` is an ``.npy`` buffer. ``Array.numpy()`` runs ``np.load``, which parses the
buffer's text header (a Python-literal dict) for every array of every message, and
``Array(ndarray)`` runs ``np.save``, which formats one. In a cross-device round (hundreds of small
client messages, ~10 arrays each) that parsing and formatting was a measurable part of each client
message (experiments/results/scale.md). The headers repeat — the same model, round after round — so
here each distinct header is parsed (or formatted) once, by numpy itself, and cached; the data
part is then read with ``np.frombuffer`` / written with ``tobytes``.

Exactness: :func:`to_array` returns an ``Array`` whose ``data`` is byte for byte what
``Array(ndarray)`` would hold (the header is the one ``np.save`` wrote for the same dtype and shape,
the data is the array in C order, as ``np.save`` writes a C-ordered array), so bytes counted from
messages do not change. :func:`to_numpy` returns a writable array equal in dtype, shape and every
byte to ``Array.numpy()``. Anything outside the common case — another ``stype``, a Fortran-ordered
or object array, a malformed header — goes through Flower's own conversion, errors included.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

_MAGIC = b"\x93NUMPY"
_STYPE_NUMPY = "numpy.ndarray"
#: header bytes -> (dtype, shape); bounded: a run sees a handful of distinct headers.
_READ: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}
#: (dtype.str, shape) -> header bytes, as np.save writes them.
_WRITE: dict[tuple[str, tuple[int, ...]], bytes] = {}
_CACHE_LIMIT = 4096


def _header_end(data: bytes) -> int:
    """Offset of the array data in an ``.npy`` buffer (0 when it is not one we read here)."""
    if len(data) < 10 or data[:6] != _MAGIC:
        return 0
    major = data[6]
    if major == 1:
        return 10 + int.from_bytes(data[8:10], "little")
    if major in (2, 3) and len(data) >= 12:
        return 12 + int.from_bytes(data[8:12], "little")
    return 0


def _parse_header(header: bytes) -> tuple[np.dtype, tuple[int, ...]] | None:
    """(dtype, shape) of a C-ordered, non-object ``.npy`` header, parsed by numpy; None otherwise."""
    fp = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            return None
    except (ValueError, OSError, SyntaxError):
        return None
    if fortran or dtype.hasobject:
        return None
    return dtype, tuple(int(n) for n in shape)


def to_numpy(arr: Array) -> np.ndarray:
    """``arr.numpy()``, with the header parsed once per distinct header (a writable copy)."""
    data = arr.data
    end = _header_end(data) if arr.stype == _STYPE_NUMPY else 0
    if not end:
        return arr.numpy()
    header = data[:end]
    parsed = _READ.get(header)
    if parsed is None:
        parsed = _parse_header(header)
        if parsed is None:
            return arr.numpy()
        if len(_READ) < _CACHE_LIMIT:
            _READ[header] = parsed
    dtype, shape = parsed
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(data) - end != count * dtype.itemsize:
        return arr.numpy()  # truncated or padded: let numpy say what is wrong
    return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape).copy()


def to_array(x: np.ndarray) -> Array:
    """``Array(x)``, byte for byte, with ``np.save``'s header formatted once per (dtype, shape)."""
    x = np.asarray(x)
    if x.dtype.hasobject or (x.flags.f_contiguous and not x.flags.c_contiguous and x.ndim > 1):
        return Array(x)
    key = (x.dtype.str, tuple(int(n) for n in x.shape))
    header = _WRITE.get(key)
    if header is None:
        buffer = io.BytesIO()
        np.save(buffer, x, allow_pickle=False)
        full = buffer.getvalue()
        header = full[: len(full) - x.nbytes]
        if len(_WRITE) < _CACHE_LIMIT:
            _WRITE[key] = header
        return Array(dtype=str(x.dtype), shape=key[1], stype=_STYPE_NUMPY, data=full)
    return Array(dtype=str(x.dtype), shape=key[1], stype=_STYPE_NUMPY, data=header + x.tobytes())


def record_to_torch(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    """``record.to_torch_state_dict()`` through :func:`to_numpy`."""
    return OrderedDict((k, torch.from_numpy(to_numpy(arr))) for k, arr in record.items())


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{name: arr.numpy()}`` through :func:`to_numpy`."""
    return {k: to_numpy(arr) for k, arr in record.items()}


def record_from_torch(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``ArrayRecord(state_dict)`` through :func:`to_array` (tensors are detached and moved to CPU)."""
    return ArrayRecord({k: to_array(v.detach().cpu().numpy()) for k, v in state.items()})


def record_from_numpy(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``ArrayRecord({name: Array(x)})`` through :func:`to_array`."""
    return ArrayRecord({k: to_array(v) for k, v in arrays.items()})


__all__ = ["to_numpy", "to_array", "record_to_torch", "record_to_numpy", "record_from_torch", "record_from_numpy"]
