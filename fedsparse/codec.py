"""Sparse tensor codec: the actual bytes a sparse model/update puts into a Flower message.

FedDIP's pruned downlink/uplink, the partial-update broadcast (DPU) and Top-k baselines all send
"some entries of some tensors". This module turns named tensors plus boolean keep-masks into a
**two-array** payload (every Flower ``Array`` costs an npy header and wire framing, so fewer is
better) and back, exactly:

``"index"`` (uint8)
    ``[4-byte little-endian header length H][H bytes of UTF-8 JSON header][index bytes]``.
    The header is columnar, one list entry per tensor in encoding order::

        {"codec": "fedsparse-sparse", "version": 1, "value_bits": 32,
         "names": [...], "shapes": [[...], ...], "dtypes": ["<f4", ...],  # numpy dtype.str
         "kinds": ["bitmap" | "coords" | "golomb" | "dense" | "raw", ...],
         "nnz": [...],      # number of values stored for the tensor (n for dense)
         "ilen": [...],     # bytes of the tensor's index (or raw) encoding in the index blob
         "rice": [...],     # only if some tensor is golomb-coded: the Rice parameter b of
                            # each golomb-coded tensor, in order (no entry for other kinds)
         "qmin": [...], "qscale": [...]}   # only for value_bits == 8 (null where not quantised)

    followed by the per-tensor index encodings concatenated in the same order.
``"values"`` (float32 / float16 / uint8 for value_bits 32 / 16 / 8)
    The kept values of every floating-point tensor, concatenated in the same order, each tensor's
    values in C (row-major) order of its kept positions.

Index kinds, chosen per tensor by **measured** byte length (ties → bitmap, then coords, then
golomb):

- ``bitmap``: ``np.packbits`` of the flattened mask, ⌈n/8⌉ bytes.
- ``coords``: sorted flat positions as gaps ``g = p[0], p[1]-p[0]-1, ...`` in unsigned LEB128
  varints (7 bits per byte, high bit = continuation). An all-False mask is ``coords`` with an empty
  index.
- ``golomb``: the same gaps Golomb–Rice coded with parameter ``b`` (divisor 2^b, stored in the
  header's ``rice`` list): gap ``g`` is the quotient ``q = g >> b`` in unary and the remainder
  ``g mod 2^b`` in b bits. The k remainders come first, each b bits MSB-first, then the k unary
  quotients, each q zero bits and a one bit; the bit stream is packed MSB-first
  (``np.packbits``) and zero-padded to a whole byte, so the index is
  ⌈Σ(q_i + 1 + b) / 8⌉ bytes. Remainders and quotients are kept apart so that both directions are
  vectorised: the decoder reads the remainders as fixed-width fields and the quotients as the
  distances between the set bits of the unary part. ``b`` starts from
  ``max(0, round(log2(ln 2 · n/k)))`` (the Rice parameter of a geometric gap distribution with
  density k/n) and is moved to b − 1 or b + 1 where that is shorter on the actual gaps. For
  i.i.d. masks this is within a few per cent of the entropy bound n·H(k/n)/8
  (:func:`shannon_bound_bytes`) for densities from about 0.001 to 0.5; the varint list is up to
  ~1.7× above it.
- ``dense``: mask ``None`` or all True; all n values, no index bytes.
- ``raw``: a non-floating tensor (integer/bool, e.g. BN's ``num_batches_tracked``) sent dense as its
  native bytes inside the index blob, so it round-trips exactly whatever ``value_bits`` is. Masks
  are not supported for such tensors. With ``encode(..., raw_dense=True)`` floating-point tensors
  sent dense (mask ``None``) are stored ``raw`` too, i.e. exactly, while the masked tensors' values
  still go through fp16 / 8-bit (the partial-update broadcast keeps biases float32 this way). The
  decoder needs no option: ``raw`` is decoded from the header's dtype either way.

Values: ``value_bits=32`` sends float32 (bit-exact for float32 inputs); 16 sends float16 (values
must fit its range); 8 uses per-tensor affine quantisation ``q = round((x - min) / scale)`` with
``scale = (max - min) / 255`` over the tensor's kept values, decoded as ``min + q·scale`` (error at
most scale/2). Decoded tensors have the input's dtype and shape, zeros where not kept.

The ``coords`` length is ``Σ bytes-per-varint`` and the ``golomb`` length ⌈Σ(q_i + 1 + b) / 8⌉,
exactly what the encoder writes (the tests compare them with the materialised encodings); only the
chosen encoding is built. When k ≥ ⌈n/8⌉ a coordinate list cannot be shorter than the bitmap (each
varint is ≥ 1 byte), so its length is not counted.

The ``rice`` list is header bytes, and they are counted: a tensor's golomb length in the choice
is its index plus its list entry (the digits of b and a separator), and if the golomb-coded
tensors together save less than the whole list costs (its key and brackets included), they fall
back to their best other kind. A payload with no golomb-coded tensor is byte for byte what this
codec wrote before the ``golomb`` kind existed (same version, 1), so the change never makes a
payload larger, and every earlier payload still decodes. A decoder that predates ``golomb``
rejects a payload that uses it with "unknown index kind 'golomb'". ``encode(...,
allowed_kinds=...)`` restricts the choice (benchmarks, comparisons with the older format); so does
the environment variable ``FEDSPARSE_INDEX_KINDS`` for every encoder of a run (:func:`default_index_kinds`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

import numpy as np
from flwr.app import ArrayRecord

from fedsparse.arrays import record_from_numpy, record_to_numpy

CODEC_NAME = "fedsparse-sparse"
CODEC_VERSION = 1
VALUE_BITS: tuple[int, ...] = (32, 16, 8)
INDEX_KINDS: tuple[str, ...] = ("bitmap", "coords", "golomb")  # sparse index kinds, tie order
INDEX_KEY = "index"
VALUES_KEY = "values"

_VALUE_DTYPE: dict[int, np.dtype[Any]] = {32: np.dtype(np.float32), 16: np.dtype(np.float16), 8: np.dtype(np.uint8)}
_F16_MAX = float(np.finfo(np.float16).max)
_MAX_VARINT_BYTES = 10  # ⌈64 / 7⌉


# --------------------------------------------------------------------------- varint (LEB128)


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    """Bytes each unsigned value takes as a LEB128 varint (1 for 0)."""
    lengths = np.ones(values.shape, dtype=np.int64)
    for j in range(1, _MAX_VARINT_BYTES):
        above = values >= np.uint64(1) << np.uint64(7 * j)
        if not above.any():
            break
        lengths += above
    return lengths


def varint_encode(values: np.ndarray) -> np.ndarray:
    """Unsigned LEB128 encoding of a 1-D array of non-negative integers, vectorised per byte
    position (at most 10 passes, none per element)."""
    v = np.asarray(values)
    if v.ndim != 1:
        raise ValueError(f"varint_encode expects a 1-D array, got shape {v.shape}")
    if v.size == 0:
        return np.empty(0, dtype=np.uint8)
    if v.dtype.kind not in "iu":
        raise ValueError(f"varint_encode expects integers, got dtype {v.dtype}")
    if v.dtype.kind == "i" and (v < 0).any():
        raise ValueError("varint_encode expects non-negative integers")
    v = v.astype(np.uint64, copy=False)
    lengths = _varint_lengths(v)
    if int(lengths.max()) == 1:
        return v.astype(np.uint8)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    for j in range(int(lengths.max())):
        sel = lengths > j
        if j == 0:
            idx, vj, lj = starts, v, lengths
        else:
            idx, vj, lj = starts[sel] + j, v[sel], lengths[sel]
        byte = (vj >> np.uint64(7 * j)) & np.uint64(0x7F)
        byte |= np.where(lj > j + 1, np.uint64(0x80), np.uint64(0))
        out[idx] = byte.astype(np.uint8)
    return out


def varint_decode(data: np.ndarray, count: int | None = None) -> np.ndarray:
    """Decode concatenated unsigned LEB128 varints into uint64; ``count`` checks how many."""
    b = np.asarray(data, dtype=np.uint8)
    if b.size == 0:
        values = np.empty(0, dtype=np.uint64)
    elif not (b & 0x80).any():
        values = b.astype(np.uint64)
    else:
        ends = np.flatnonzero((b & 0x80) == 0)
        if ends.size == 0 or ends[-1] != b.size - 1:
            raise ValueError("truncated varint stream: the last byte has its continuation bit set")
        starts = np.empty_like(ends)
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        lengths = ends - starts + 1
        if int(lengths.max()) > _MAX_VARINT_BYTES:
            raise ValueError("corrupt varint stream: a value is longer than 10 bytes")
        values = (b[starts] & 0x7F).astype(np.uint64)
        for j in range(1, int(lengths.max())):
            sel = np.flatnonzero(lengths > j)
            values[sel] |= (b[starts[sel] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    if count is not None and values.size != count:
        raise ValueError(f"varint stream holds {values.size} values, expected {count}")
    return values


def _gaps(positions: np.ndarray) -> np.ndarray:
    """Sorted distinct flat positions → gaps p[0], p[i] - p[i-1] - 1 (all ≥ 0)."""
    g = np.diff(positions, prepend=-1) - 1
    return g.astype(np.uint64)


def _positions(gaps: np.ndarray) -> np.ndarray:
    return np.cumsum(gaps.astype(np.int64) + 1) - 1


def coords_encode(positions: np.ndarray) -> np.ndarray:
    """Coordinate-list index: gap-coded flat positions as LEB128 varints."""
    return varint_encode(_gaps(np.asarray(positions, dtype=np.int64)))


def coords_decode(data: np.ndarray, count: int) -> np.ndarray:
    return _positions(varint_decode(data, count))


# --------------------------------------------------------------------------- Golomb–Rice

_MAX_GOLOMB_BITS = 63


def rice_parameter(n: int, k: int) -> int:
    """Rice parameter ``max(0, round(log2(ln 2 · n/k)))`` for k of n positions (0 for k = 0): the
    divisor 2^b nearest the optimal Golomb divisor ≈ ln 2 / p of geometric gaps with p = k/n."""
    if k <= 0 or n <= 0:
        return 0
    return min(_MAX_GOLOMB_BITS, max(0, round(math.log2(math.log(2) * n / k))))


def _golomb_bits_total(gaps: np.ndarray, b: int) -> int:
    """Σ(q_i + 1 + b) bits with q_i = g_i >> b: the length of the Golomb–Rice stream."""
    return int(gaps.size) * (b + 1) + int((gaps >> np.uint64(b)).sum())


def _golomb_choose_gaps(gaps: np.ndarray, n: int) -> tuple[int, int]:
    """(b, bytes) for gaps: the Rice parameter of k/n, or its neighbour where that is shorter on
    these gaps (ties keep the first of b, b − 1, b + 1)."""
    k, n = int(gaps.size), int(n)
    if k == 0:
        return 0, 0
    b0 = rice_parameter(n, k)
    best_b, best_len = -1, -1
    for b in (b0, b0 - 1, b0 + 1):  # (b ≤ n's bit length: the decoder refuses larger ones)
        if 0 <= b <= min(_MAX_GOLOMB_BITS, max(1, n.bit_length())):
            length = (_golomb_bits_total(gaps, b) + 7) // 8
            if best_b < 0 or length < best_len:
                best_b, best_len = b, length
    return best_b, best_len


def golomb_choose(positions: np.ndarray, n: int) -> tuple[int, int]:
    """(Rice parameter b, index bytes) the codec would use for sorted distinct flat ``positions``
    in a tensor of ``n`` entries (see the module docstring)."""
    return _golomb_choose_gaps(_gaps(np.asarray(positions, dtype=np.int64)), n)


def golomb_nbytes(positions: np.ndarray, b: int) -> int:
    """⌈Σ(q_i + 1 + b) / 8⌉: bytes of the Golomb–Rice index of ``positions`` with parameter b."""
    _check_golomb_bits(b)
    return (_golomb_bits_total(_gaps(np.asarray(positions, dtype=np.int64)), b) + 7) // 8


def _check_golomb_bits(b: Any) -> int:
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 0 <= b <= _MAX_GOLOMB_BITS:
        raise ValueError(f"Golomb–Rice parameter must be an integer in 0..{_MAX_GOLOMB_BITS}, got {b!r}")
    return int(b)


def _golomb_encode_gaps(gaps: np.ndarray, b: int) -> np.ndarray:
    k = int(gaps.size)
    if k == 0:
        return np.empty(0, dtype=np.uint8)
    ends = (gaps >> np.uint64(b)).astype(np.int64)
    ends += 1
    np.cumsum(ends, out=ends)  # unary part: q zeros then a one per gap; ends[i] is after the one
    rem_bits = k * b
    bits = np.zeros(rem_bits + int(ends[-1]), dtype=np.uint8)  # one byte per bit, then packed
    if b:
        # k rows of b bits, MSB first: one vectorised pass per bit position (b passes, ≤ 63)
        rem = (gaps & np.uint64((1 << b) - 1)).astype(_uint_for_bits(b))
        rows = bits[:rem_bits].reshape(k, b)
        for j in range(b):
            np.right_shift(rem, b - 1 - j, out=rows[:, j], casting="unsafe")  # low byte kept
        rows &= 1
    ends += rem_bits - 1
    bits[ends] = 1
    return np.packbits(bits)


def _uint_for_bits(b: int) -> type[np.unsignedinteger]:
    return np.uint8 if b <= 8 else np.uint16 if b <= 16 else np.uint32 if b <= 32 else np.uint64


def golomb_encode(positions: np.ndarray, b: int) -> np.ndarray:
    """Golomb–Rice index of sorted distinct flat ``positions`` with parameter ``b`` (the module
    docstring gives the layout), vectorised: no per-element Python loop."""
    b = _check_golomb_bits(b)
    return _golomb_encode_gaps(_gaps(np.asarray(positions, dtype=np.int64)), b)


def golomb_decode(data: np.ndarray, count: int, b: int, n: int | None = None) -> np.ndarray:
    """Flat positions (int64, increasing) from a Golomb–Rice index holding ``count`` gaps.

    Raises ValueError for a stream that is cut short, holds more codewords than ``count``, or has
    anything but zero padding (less than a byte) after the last one; with ``n`` (the tensor size)
    also for a position ≥ n or a parameter the encoder would never use for n (b above n's bit
    length).
    """
    b = _check_golomb_bits(b)
    data = np.asarray(data, dtype=np.uint8)
    if n is not None and b > max(1, int(n).bit_length()):
        raise ValueError(f"corrupt golomb index: parameter b={b} is too large for {n} entries")
    if count == 0:
        if data.size:
            raise ValueError(f"corrupt golomb index: {data.size} bytes for 0 positions")
        return np.empty(0, dtype=np.int64)
    bits = np.unpackbits(data)
    rem_bits = count * b
    if bits.size < rem_bits + count:
        raise ValueError(f"truncated golomb index: {data.size} bytes cannot hold {count} codewords with b={b}")
    ones = np.flatnonzero(bits[rem_bits:].view(np.bool_))
    if ones.size < count:
        raise ValueError(f"truncated golomb index: {ones.size} unary codewords, header says {count}")
    if ones.size > count or bits.size - (rem_bits + int(ones[-1]) + 1) >= 8:
        raise ValueError("corrupt golomb index: bits or bytes after the last codeword")
    q = np.diff(ones, prepend=-1)
    q -= 1  # unary quotients: zeros before each one
    rem = np.zeros(count, dtype=np.uint64)
    if b:
        rows = bits[:rem_bits].reshape(count, b)
        for j in range(b):  # one vectorised pass per bit position, MSB first
            rem <<= np.uint64(1)
            rem |= rows[:, j]
    if n is not None:
        # the last position, in Python integers, before any fixed-width arithmetic can wrap
        last = (int(q.sum()) << b) + int(rem.sum()) + count - 1
        if last >= n:
            raise ValueError(f"corrupt golomb index: position {last} out of range for {n} entries")
    # positions = cumsum(q·2^b + r + 1) − 1, in place in q (int64)
    q <<= b
    q += rem.astype(np.int64)
    q += 1
    np.cumsum(q, out=q)
    q -= 1
    return q


# --------------------------------------------------------------------------- encode / decode


def _check_value_bits(value_bits: int) -> None:
    if value_bits not in _VALUE_DTYPE:
        raise ValueError(
            f"unsupported value_bits={value_bits!r}; choose one of: " + ", ".join(str(b) for b in VALUE_BITS)
        )


class _Choice(NamedTuple):
    kind: str
    encoded: np.ndarray  # the index bytes
    k: int
    positions: np.ndarray | None  # None for dense
    b: int | None  # Rice parameter of a golomb index
    alt_kind: str | None  # the best kind other than golomb (None if none is allowed)
    alt_len: int


def _materialise(
    kind: str, mask_flat: np.ndarray, positions: np.ndarray, gaps: np.ndarray | None, b: int | None
) -> np.ndarray:
    if kind == "bitmap":
        return np.packbits(mask_flat)
    if gaps is None:
        gaps = _gaps(positions)
    if kind == "coords":
        return varint_encode(gaps)
    assert kind == "golomb" and b is not None
    return _golomb_encode_gaps(gaps, b)


def _choose_index(mask_flat: np.ndarray, n: int, allowed: frozenset[str]) -> _Choice:
    """The allowed index of a boolean flat mask that adds the fewest payload bytes: its measured
    length, plus for golomb its entry in the header's ``rice`` list (ties: the earlier of
    INDEX_KINDS). Only that one is built; the best non-golomb kind is returned beside it for the
    payload-level fallback in :func:`encode`."""
    positions = np.flatnonzero(mask_flat)
    k = int(positions.size)
    if k == n:
        return _Choice("dense", np.empty(0, np.uint8), k, None, None, None, 0)
    lengths: dict[str, int] = {}
    bitmap_len = (n + 7) // 8
    if "bitmap" in allowed:
        lengths["bitmap"] = bitmap_len
    gaps = None
    # every varint is >= 1 byte: with k >= ⌈n/8⌉ coords cannot beat (or tie) the bitmap
    if "coords" in allowed and not ("bitmap" in allowed and k >= bitmap_len):
        gaps = _gaps(positions)
        lengths["coords"] = int(_varint_lengths(gaps).sum())
    b = None
    cost = dict(lengths)  # payload bytes: golomb's index plus its entry in the header's list
    if "golomb" in allowed:
        if gaps is None:
            gaps = _gaps(positions)
        b, lengths["golomb"] = _golomb_choose_gaps(gaps, n)
        cost["golomb"] = lengths["golomb"] + len(str(b)) + 1  # "b," (or "b]")
    order = {kind: rank for rank, kind in enumerate(INDEX_KINDS)}
    kind = min(cost, key=lambda kd: (cost[kd], order[kd]))
    others = [kd for kd in lengths if kd != "golomb"]
    alt = min(others, key=lambda kd: (lengths[kd], order[kd])) if others else None
    index = _materialise(kind, mask_flat, positions, gaps, b)
    assert index.size == lengths[kind], (kind, index.size, lengths[kind])
    return _Choice(kind, index, k, positions, b if kind == "golomb" else None, alt, lengths[alt] if alt else 0)


def _quantise_u8(x: np.ndarray) -> tuple[np.ndarray, float, float]:
    if x.size == 0:
        return np.empty(0, np.uint8), 0.0, 0.0
    x64 = x.astype(np.float64)
    if not np.isfinite(x64).all():
        raise ValueError("value_bits=8 needs finite values (found NaN or inf)")
    lo, hi = float(x64.min()), float(x64.max())
    scale = (hi - lo) / 255.0
    if scale == 0.0:
        return np.zeros(x.size, np.uint8), lo, 0.0
    q = np.rint((x64 - lo) / scale)
    return np.clip(q, 0, 255).astype(np.uint8), lo, scale


INDEX_KINDS_ENV = "FEDSPARSE_INDEX_KINDS"


def default_index_kinds() -> tuple[str, ...]:
    """The index kinds :func:`encode` may choose when its caller names none: all of them, unless the
    environment variable ``FEDSPARSE_INDEX_KINDS`` (comma-separated) restricts them.

    Why an environment variable: it is a benchmarking switch, to measure what the golomb kind saves
    in whole runs (``FEDSPARSE_INDEX_KINDS=bitmap,coords`` writes the codec's payloads from before
    golomb). Every encoder of a run reads it, in the driver and in Ray's actors alike (they inherit
    the driver's environment), without a setting threaded through every method. Indices are
    lossless either way, so a run's training is the same; only its bytes move."""
    raw = os.environ.get(INDEX_KINDS_ENV, "").strip()
    if not raw:
        return INDEX_KINDS
    kinds = tuple(k.strip() for k in raw.split(",") if k.strip())
    bad = [k for k in kinds if k not in INDEX_KINDS]
    if bad or not kinds:
        raise ValueError(
            f"{INDEX_KINDS_ENV}={raw!r}: unknown index kind(s) {bad}; allowed: a comma-separated "
            f"non-empty subset of {', '.join(INDEX_KINDS)}"
        )
    return kinds


def encode(
    tensors: Mapping[str, np.ndarray],
    masks: Mapping[str, np.ndarray | None],
    value_bits: int = 32,
    *,
    raw_dense: bool = False,
    allowed_kinds: Collection[str] | None = None,
) -> dict[str, np.ndarray]:
    """Encode named tensors, keeping the entries where ``masks[name]`` is True.

    A name missing from ``masks`` or mapped to ``None`` is sent dense (with ``raw_dense``, as its
    exact native bytes, unaffected by ``value_bits``). Each masked tensor's index is the smallest
    of ``allowed_kinds`` (a non-empty subset of :data:`INDEX_KINDS`; ``("bitmap", "coords")``
    writes the payloads of the codec before ``golomb``; ``None``: :func:`default_index_kinds`). Returns
    ``{"index": uint8, "values": float32|float16|uint8}`` (see the module docstring).
    """
    _check_value_bits(value_bits)
    allowed = frozenset(default_index_kinds() if allowed_kinds is None else allowed_kinds)
    if not allowed or not allowed <= set(INDEX_KINDS):
        raise ValueError(f"allowed_kinds must be a non-empty subset of {INDEX_KINDS}, got {sorted(allowed)}")
    unknown = set(masks) - set(tensors)
    if unknown:
        raise ValueError(f"masks given for unknown tensors: {sorted(unknown)}")
    header: dict[str, Any] = {
        "codec": CODEC_NAME,
        "version": CODEC_VERSION,
        "value_bits": value_bits,
        "names": [],
        "shapes": [],
        "dtypes": [],
        "kinds": [],
        "nnz": [],
        "ilen": [],
    }
    if value_bits == 8:
        header["qmin"], header["qscale"] = [], []
    index_parts: list[np.ndarray] = []
    value_parts: list[np.ndarray] = []
    rice: list[int] = []
    # golomb-coded tensors: position → (best other kind, its length, flat mask)
    fallback: dict[int, tuple[str | None, int, np.ndarray]] = {}
    vdtype = _VALUE_DTYPE[value_bits]
    for name, tensor in tensors.items():
        arr = np.asarray(tensor)
        mask = masks.get(name)
        n = arr.size
        qmin: float | None = None
        qscale: float | None = None
        b: int | None = None
        if arr.dtype.kind != "f" or (raw_dense and mask is None):
            if mask is not None:
                raise ValueError(
                    f"tensor '{name}' has dtype {arr.dtype}: masks are only supported for "
                    "floating-point tensors (non-float tensors are sent raw)"
                )
            kind, index, k = "raw", np.frombuffer(np.ascontiguousarray(arr).tobytes(), np.uint8), n
            kept = None
        else:
            if mask is None:
                kind, index, k, kept = "dense", np.empty(0, np.uint8), n, arr.reshape(-1)
            else:
                m = np.asarray(mask)
                if m.dtype != np.bool_:
                    raise ValueError(f"mask for '{name}' must be boolean, got dtype {m.dtype}")
                if m.shape != arr.shape:
                    raise ValueError(f"mask for '{name}' has shape {m.shape}, tensor has shape {arr.shape}")
                flat = m.reshape(-1)
                kind, index, k, positions, b, alt_kind, alt_len = _choose_index(flat, n, allowed)
                if kind == "golomb":
                    fallback[len(index_parts)] = (alt_kind, alt_len, flat)
                flat_arr = arr.reshape(-1)
                kept = flat_arr if positions is None else flat_arr[positions]
            if value_bits == 8:
                q, lo, scale = _quantise_u8(kept)
                qmin, qscale = lo, scale
                value_parts.append(q)
            else:
                if value_bits == 16 and kept.size:
                    big = np.abs(kept[np.isfinite(kept)])
                    if big.size and float(big.max()) > _F16_MAX:
                        raise ValueError(
                            f"tensor '{name}' has values beyond the float16 range "
                            f"(|x| <= {_F16_MAX}); use value_bits=32"
                        )
                value_parts.append(kept.astype(vdtype, copy=False))
        header["names"].append(name)
        header["shapes"].append(list(arr.shape))
        header["dtypes"].append(arr.dtype.str)
        header["kinds"].append(kind)
        header["nnz"].append(k)
        header["ilen"].append(int(index.size))
        if b is not None:
            rice.append(b)
        if value_bits == 8:
            header["qmin"].append(qmin)
            header["qscale"].append(qscale)
        index_parts.append(index)
    head = _header_json(header, rice if rice else None)
    if fallback and all(alt is not None for alt, _, _ in fallback.values()):
        # The rice list is header bytes: keep it only if the golomb indices save more.
        plain = dict(header, kinds=list(header["kinds"]), ilen=list(header["ilen"]))
        for i, (alt, alt_len, _) in fallback.items():
            plain["kinds"][i], plain["ilen"][i] = alt, alt_len
        plain_head = _header_json(plain, None)
        if len(plain_head) + sum(plain["ilen"]) <= len(head) + sum(header["ilen"]):
            for i, (alt, alt_len, flat) in fallback.items():
                assert alt is not None
                index_parts[i] = _materialise(alt, flat, np.flatnonzero(flat), None, None)
                assert index_parts[i].size == alt_len
            head = plain_head
    prefix = np.frombuffer(len(head).to_bytes(4, "little") + head, dtype=np.uint8)
    index_blob = np.concatenate([prefix, *index_parts])
    values = np.concatenate(value_parts).astype(vdtype, copy=False) if value_parts else np.empty(0, vdtype)
    return {INDEX_KEY: index_blob, VALUES_KEY: values}


def _header_json(header: dict[str, Any], rice: list[int] | None) -> bytes:
    """The header's JSON bytes, with the ``rice`` list after ``ilen`` when given (without it the
    header is exactly what the codec wrote before the golomb kind)."""
    if rice is not None:
        keys = list(header)
        at = keys.index("ilen") + 1
        header = {**{k: header[k] for k in keys[:at]}, "rice": rice, **{k: header[k] for k in keys[at:]}}
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _read_header(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], np.ndarray]:
    missing = {INDEX_KEY, VALUES_KEY} - set(arrays)
    if missing:
        raise ValueError(f"not a {CODEC_NAME} payload: missing arrays {sorted(missing)} (got {sorted(arrays)})")
    # An array the decoder would ignore is still bytes on the wire and a sign of a foreign or
    # tampered payload: refuse it rather than silently dropping it.
    extra = set(arrays) - {INDEX_KEY, VALUES_KEY}
    if extra:
        raise ValueError(
            f"not a {CODEC_NAME} payload: unexpected arrays {sorted(extra)} "
            f"(a payload holds exactly {INDEX_KEY!r} and {VALUES_KEY!r})"
        )
    header, rest = parse_header(arrays[INDEX_KEY], INDEX_KEY)
    if header.get("codec") != CODEC_NAME or header.get("version") != CODEC_VERSION:
        raise ValueError(f"unsupported payload: codec={header.get('codec')!r} version={header.get('version')!r}")
    return header, rest


def parse_header(blob: np.ndarray, what: str = INDEX_KEY) -> tuple[dict[str, Any], np.ndarray]:
    """The JSON header at the start of a payload array and the bytes after it.

    ``blob`` is a 1-D uint8 array laid out as this codec's ``index`` array is:
    ``[4-byte little-endian length H][H bytes of UTF-8 JSON object][rest]``. The length is checked
    against the array; which codec and version the header names is the caller's to check. Other
    payload formats that reuse the layout (the compression baselines' ``header`` arrays,
    :mod:`clients.compression`) parse it with this. ``what`` names the array in error messages.
    Raises ValueError for anything that is not such an array.
    """
    blob = np.asarray(blob)
    if blob.dtype != np.uint8 or blob.ndim != 1 or blob.size < 4:
        raise ValueError(f"'{what}' must be a 1-D uint8 array with a header")
    hlen = int.from_bytes(blob[:4].tobytes(), "little")
    if 4 + hlen > blob.size:
        raise ValueError(f"truncated payload: header longer than the '{what}' array")
    header = json.loads(blob[4 : 4 + hlen].tobytes().decode("utf-8"))  # JSON / Unicode errors are ValueErrors
    if not isinstance(header, dict):
        raise ValueError(f"corrupt payload: the header of '{what}' is not a JSON object")
    return header, blob[4 + hlen :]


def decode(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Decode a payload from :func:`encode` into (dense tensors, boolean masks).

    Tensors have their original shape and dtype with zeros where nothing was kept.
    """
    header, index_bytes = _read_header(arrays)
    value_bits = header["value_bits"]
    _check_value_bits(value_bits)
    values = np.asarray(arrays[VALUES_KEY])
    if values.dtype != _VALUE_DTYPE[value_bits]:
        raise ValueError(f"'{VALUES_KEY}' has dtype {values.dtype}, header says {value_bits} bits")
    tensors: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    n_golomb = sum(1 for kind in header["kinds"] if kind == "golomb")
    rice = header.get("rice", [])
    if not isinstance(rice, list) or len(rice) != n_golomb:
        raise ValueError(
            f"corrupt payload: the header's 'rice' list must hold one Rice parameter per "
            f"golomb-coded tensor ({n_golomb}), got {rice!r}"
        )
    ipos = vpos = 0
    gpos = 0
    for i, name in enumerate(header["names"]):
        shape = tuple(header["shapes"][i])
        dtype = np.dtype(header["dtypes"][i])
        kind, k, ilen = header["kinds"][i], int(header["nnz"][i]), int(header["ilen"][i])
        n = math.prod(shape)
        index = index_bytes[ipos : ipos + ilen]
        ipos += ilen
        if index.size != ilen:
            raise ValueError(f"truncated payload: index of '{name}' is cut short")
        if kind == "raw":
            tensors[name] = np.frombuffer(index.tobytes(), dtype=dtype).reshape(shape).copy()
            masks[name] = np.ones(shape, dtype=bool)
            continue
        vals = values[vpos : vpos + k]
        vpos += k
        if vals.size != k:
            raise ValueError(f"truncated payload: values of '{name}' are cut short")
        if value_bits == 8:
            lo, scale = header["qmin"][i], header["qscale"][i]
            vals = (lo + vals.astype(np.float64) * scale) if k else vals.astype(np.float64)
        if kind == "dense":
            tensors[name] = vals.astype(dtype).reshape(shape)
            masks[name] = np.ones(shape, dtype=bool)
            continue
        if kind == "bitmap":
            flat_mask = np.unpackbits(index, count=n).astype(bool)
            positions = np.flatnonzero(flat_mask)
            if positions.size != k:
                raise ValueError(f"corrupt payload: bitmap of '{name}' has {positions.size} bits set, header says {k}")
        elif kind == "coords":
            positions = coords_decode(index, k)
            if k and (positions[-1] >= n):
                raise ValueError(f"corrupt payload: coordinate of '{name}' out of range")
            flat_mask = np.zeros(n, dtype=bool)
            flat_mask[positions] = True
        elif kind == "golomb":
            b = rice[gpos]
            gpos += 1
            if k > n:
                raise ValueError(f"corrupt payload: '{name}' has {k} positions for {n} entries")
            try:
                positions = golomb_decode(index, k, b, n)
            except ValueError as err:
                raise ValueError(f"corrupt payload: index of '{name}': {err}") from None
            flat_mask = np.zeros(n, dtype=bool)
            flat_mask[positions] = True
        else:
            raise ValueError(f"unknown index kind {kind!r} for '{name}'")
        flat = np.zeros(n, dtype=dtype)
        flat[positions] = vals
        tensors[name] = flat.reshape(shape)
        masks[name] = flat_mask.reshape(shape)
    if vpos != values.size or ipos != index_bytes.size:
        raise ValueError("corrupt payload: trailing bytes after the last tensor")
    return tensors, masks


# --------------------------------------------------------------------------- reporting helpers


def payload_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Σ ``arr.nbytes`` over the payload arrays (header and index included)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def index_kinds(arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Tensor name → index kind used ('bitmap', 'coords', 'golomb', 'dense' or 'raw')."""
    header, _ = _read_header(arrays)
    return dict(zip(header["names"], header["kinds"]))


def tensor_nbytes(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per-tensor accounting: kind, numel, nnz, index bytes and value bytes (header excluded),
    for per-layer byte reports."""
    header, _ = _read_header(arrays)
    vsize = _VALUE_DTYPE[header["value_bits"]].itemsize
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(header["names"]):
        kind = header["kinds"][i]
        out[name] = {
            "kind": kind,
            "numel": math.prod(header["shapes"][i]),
            "nnz": int(header["nnz"][i]),
            "index_bytes": int(header["ilen"][i]),
            "value_bytes": 0 if kind == "raw" else int(header["nnz"][i]) * vsize,
        }
    return out


def shannon_bound_bytes(n: int, k: int) -> float:
    """n·H(k/n)/8 bytes: the entropy bound for saying which k of n positions are kept (DPU's
    S_x(k)·I), with H the binary entropy in bits."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got n={n}, k={k}")
    if k == 0 or k == n:
        return 0.0
    p = k / n
    h = -p * math.log2(p) - (1 - p) * math.log2(1 - p)
    return n * h / 8


# --------------------------------------------------------------------------- Flower adapters


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Wrap the payload arrays in a Flower ``ArrayRecord`` (one ``Array`` each)."""
    return record_from_numpy({name: np.ascontiguousarray(a) for name, a in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_array_record`."""
    return record_to_numpy(record)
