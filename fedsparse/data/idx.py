"""A small reader for the IDX format (MNIST, Fashion-MNIST), gzip-compressed or raw.

Exists so the datasets load from any copy of the four files (ours, Debian's re-gzipped ones,
npm's raw ones, torchvision's ``raw/`` folder) without torchvision's own checks and layout.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np

from fedsparse.data.paths import DatasetFormatError

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


class IdxFormatError(DatasetFormatError):
    """An IDX file is truncated, has a bad magic number, or is a broken gzip stream."""


def read_bytes(path: str | Path) -> bytes:
    """The file's IDX content, decompressed when it is gzip (detected by magic, not name)."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise IdxFormatError(f"{path}: corrupt gzip stream ({exc})") from exc


def md5_of_content(path: str | Path) -> str:
    """md5 of the decompressed IDX bytes: stable across Debian's re-gzipped copies."""
    return hashlib.md5(read_bytes(path)).hexdigest()


def parse(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes into a numpy array (native byte order, a fresh writable copy)."""
    if len(data) < 4:
        raise IdxFormatError(f"{source}: only {len(data)} bytes, too short for an IDX header")
    zero, code, ndim = int.from_bytes(data[0:2], "big"), data[2], data[3]
    if zero != 0 or code not in _DTYPES or ndim == 0:
        raise IdxFormatError(
            f"{source}: bad IDX magic number 0x{data[:4].hex()} "
            "(expected 0x0000TTDD with a known type code TT and DD >= 1 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{source}: truncated IDX header ({len(data)} bytes, need {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[code])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise IdxFormatError(
            f"{source}: size mismatch, header says shape {shape} of {dtype.name} "
            f"({expected} bytes) but the content is {len(data)} bytes"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (raw or gzip) into a numpy array."""
    return parse(read_bytes(path), source=str(path))
