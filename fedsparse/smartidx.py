"""SmartIdx (Wu et al., AAAI 2022): kernel-based selection and its three packages, as an uplink compressor.

Top-k with quantised values spends most of its bytes on indices, one per value. SmartIdx makes the
convolution kernel the unit of selection so that one index serves a whole kernel:

1. **Important entries**: per floating tensor, the k = ``ratio``·n entries of largest |a| of the
   residual-corrected update a (ties to the earliest positions, :func:`fedsparse.masks.topk_mask`).
2. **Kernel rule**: in a convolution weight (ndim 4, kernel size n_k = kh·kw ≥ 2) a kernel — the
   n_k entries w[o, i, :, :] — is *selected* when at least ⌈``kernel_threshold``·n_k⌉ of its entries
   are important. A selected kernel is sent whole (its unimportant entries too).
3. **Packages** (one tensor at a time):

   * **IP**, individual package: the important entries outside selected kernels, and every
     important entry of a tensor without kernels (fully connected layers, 1×1 convolutions, biases):
     one flat position, one value and one sign each.
   * **KP**, kernel package: selected kernels whose sign pattern is shared by fewer than
     ``pattern_min`` selected kernels of the tensor: **one kernel index per kernel**, n_k values and
     n_k signs.
   * **PP**, pattern package: selected kernels grouped by sign pattern (the n_k signs of the kernel),
     for patterns held by at least ``pattern_min`` kernels: per pattern its n_k signs **once** and
     one set of kernel indices; n_k values per kernel.

4. **Values**: with ``value_bits`` = 0 every entry of a package takes one magnitude, the package's
   mean |a| (binary quantisation, as SBC; only signs travel per entry); with ``value_bits`` = b ≥ 1
   the magnitude is one of 2^b uniform levels code·s/(2^b − 1) with s the package's largest |a|.
   One float32 scale per non-empty package of a tensor.
5. **Indices**: each index set (IP positions in [0, n), KP kernel numbers and each pattern's kernel
   numbers in [0, O·I)) is Golomb–Rice coded by :mod:`fedsparse.codec` (its Rice parameter choice
   and bit layout).

Residual error feedback is the :class:`fedsparse.compressors.Compressor` default: e ← a − C(a).

Payload (two Flower arrays):

``"header"`` (uint8)
    ``[4-byte length H][H bytes of JSON][meta][index][raw]``. JSON: ``{"codec": "fedsparse-smartidx",
    "version": 1, "value_bits", "names", "shapes", "dtypes", "meta_len", raw_* entries}``. ``meta``:
    LEB128 varints, per floating tensor ``k_ip, b_ip, len_ip`` and, for a tensor with kernels,
    ``k_kp, b_kp, len_kp, P`` then ``k_p, b_p, len_p`` for each of its P patterns (k: how many
    positions or kernels, b: Rice parameter, len: index bytes). ``index``: the Golomb–Rice streams in
    that order. ``raw``: the non-floating tensors' bytes.
``"values"`` (uint8)
    ``[scales][codes IP][codes KP][codes PP][signs IP][signs KP][signs PP]``: the float32 scales
    (per tensor, per non-empty package in IP, KP, PP order), then each stream bit-packed MSB-first and
    padded to a byte over all tensors: value codes (b bits per sent entry; absent for b = 0), then
    signs (1 = negative): one per IP entry, n_k per KP kernel, n_k per PP pattern.

:func:`package_bytes` splits a payload's bytes by package and part (index, value, sign) — the
appendix's Figure 4 — from the header alone; the parts plus the header overhead are the arrays'
sizes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsparse import codec
from fedsparse.compressors import (
    CFG_EF,
    CFG_RATIO,
    COMPRESSORS,
    FORMAT_VERSION,
    HEADER_KEY,
    SMARTIDX_CODEC,
    VALUES_KEY,
    Compressor,
    Encoded,
    _pack_header,
    _raw_tail,
    _read_header,
    _read_raw,
    _require_keys,
    kept_count,
    pack_codes,
    unpack_codes,
)
from fedsparse.masks import topk_mask

__all__ = [
    "SMARTIDX_CODEC",
    "PACKAGES",
    "PARTS",
    "SmartIdx",
    "TensorPackages",
    "kernel_size",
    "select_packages",
    "smartidx_decode",
    "package_bytes",
]

PACKAGES = ("ip", "kp", "pp")
PARTS = ("index", "value", "sign")
MAX_VALUE_BITS = 8

CFG_KERNEL_THRESHOLD = "smartidx-kernel-threshold"
CFG_PATTERN_MIN = "smartidx-pattern-min"
CFG_VALUE_BITS = "smartidx-value-bits"


def kernel_size(shape: tuple[int, ...] | list[int]) -> int:
    """n_k = kh·kw for a convolution weight (O, I, kh, kw) with kernels of at least two entries;
    0 for every other tensor (they are sent as individual packages only)."""
    if len(shape) != 4:
        return 0
    n_k = int(shape[2]) * int(shape[3])
    return n_k if n_k >= 2 else 0


@dataclass
class TensorPackages:
    """One tensor's selection: IP flat positions, KP kernel numbers, PP (sign pattern, kernel
    numbers) per pattern — all sorted ascending; a pattern is n_k booleans (True = negative)."""

    n_k: int
    ip: np.ndarray
    kp: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    pp: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def sent_entries(self) -> int:
        return int(self.ip.size) + self.n_k * (int(self.kp.size) + sum(int(k.size) for _, k in self.pp))


def select_packages(a: np.ndarray, ratio: float, kernel_threshold: float, pattern_min: int) -> TensorPackages:
    """SmartIdx's selection on one tensor (module docstring, steps 1–3)."""
    shape = np.shape(a)
    flat = np.asarray(a, dtype=np.float32).reshape(-1)
    n = flat.size
    k = kept_count(ratio, n)
    important = topk_mask({"a": torch.from_numpy(np.abs(flat))}, k)["a"].numpy() if n else np.zeros(0, bool)
    n_k = kernel_size(shape)
    if n_k == 0:
        return TensorPackages(0, np.flatnonzero(important).astype(np.int64))
    imp = important.reshape(-1, n_k)
    need = max(1, math.ceil(kernel_threshold * n_k - 1e-9))
    selected = imp.sum(axis=1) >= need
    ip = np.flatnonzero(important & ~np.repeat(selected, n_k)).astype(np.int64)
    kernels = np.flatnonzero(selected).astype(np.int64)
    if kernels.size == 0:
        return TensorPackages(n_k, ip)
    signs = flat.reshape(-1, n_k)[kernels] < 0
    patterns, inverse, counts = np.unique(signs, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    shared = counts >= pattern_min
    kp = kernels[~shared[inverse]]
    pp = [(patterns[p], kernels[inverse == p]) for p in np.flatnonzero(shared)]
    return TensorPackages(n_k, ip, kp, pp)


def _magnitudes(values: np.ndarray, bits: int) -> tuple[np.float32, np.ndarray]:
    """(scale, codes) of one package's |a| (module docstring, step 4); codes empty for bits = 0."""
    mags = np.abs(values.astype(np.float64))
    if bits == 0:
        return np.float32(mags.mean()), np.empty(0, np.uint32)
    scale = np.float32(mags.max())
    top = (1 << bits) - 1
    if scale == 0:
        return scale, np.zeros(mags.size, np.uint32)
    codes = np.clip(np.rint(mags / float(scale) * top), 0, top).astype(np.uint32)
    return scale, codes


def _dequantise(scale: np.float32, codes: np.ndarray, count: int, bits: int) -> np.ndarray:
    if bits == 0:
        return np.full(count, scale, np.float64)
    return codes.astype(np.float64) * (float(scale) / ((1 << bits) - 1))


class _Streams:
    """The payload's byte sections while encoding: meta varints, index bytes, scales, and per
    package the value codes and sign bits."""

    def __init__(self) -> None:
        self.meta: list[int] = []
        self.index: list[np.ndarray] = []
        self.scales: list[np.float32] = []
        self.codes: dict[str, list[np.ndarray]] = {p: [] for p in PACKAGES}
        self.signs: dict[str, list[np.ndarray]] = {p: [] for p in PACKAGES}

    def add_index(self, positions: np.ndarray, universe: int) -> None:
        b, length = codec.golomb_choose(positions, universe)
        data = codec.golomb_encode(positions, b) if positions.size else np.empty(0, np.uint8)
        assert data.size == length
        self.meta += [int(positions.size), b, int(data.size)]
        self.index.append(data)

    def add_values(self, package: str, values: np.ndarray, bits: int) -> None:
        if values.size == 0:
            return
        scale, codes = _magnitudes(values, bits)
        self.scales.append(scale)
        self.codes[package].append(codes)


def _encode_tensor(streams: _Streams, a: np.ndarray, pk: TensorPackages, bits: int) -> None:
    flat = np.asarray(a, dtype=np.float32).reshape(-1)
    streams.add_index(pk.ip, flat.size)
    ip_values = flat[pk.ip]
    streams.add_values("ip", ip_values, bits)
    streams.signs["ip"].append(ip_values < 0)
    if pk.n_k == 0:
        return
    rows = flat.reshape(-1, pk.n_k)
    streams.add_index(pk.kp, rows.shape[0])
    kp_values = rows[pk.kp].reshape(-1)
    streams.add_values("kp", kp_values, bits)
    streams.signs["kp"].append(kp_values < 0)
    streams.meta.append(len(pk.pp))
    for pattern, kernels in pk.pp:
        streams.add_index(kernels, rows.shape[0])
        streams.signs["pp"].append(np.asarray(pattern, dtype=bool))
    pp_values = np.concatenate([rows[k].reshape(-1) for _, k in pk.pp]) if pk.pp else np.empty(0, np.float32)
    streams.add_values("pp", pp_values, bits)


def _pack_bits(parts: list[np.ndarray]) -> np.ndarray:
    return np.packbits(np.concatenate(parts)) if parts else np.empty(0, np.uint8)


def _pack_codes(parts: list[np.ndarray], bits: int) -> np.ndarray:
    if bits == 0 or not parts:
        return np.empty(0, np.uint8)
    return pack_codes(np.concatenate(parts), bits)


def smartidx_encode(
    floats: Mapping[str, np.ndarray],
    raws: Mapping[str, np.ndarray],
    packages: Mapping[str, TensorPackages],
    value_bits: int,
) -> dict[str, np.ndarray]:
    """The payload (module docstring) of ``floats`` with the given selection."""
    streams = _Streams()
    for name, a in floats.items():
        _encode_tensor(streams, a, packages[name], value_bits)
    meta = codec.varint_encode(np.asarray(streams.meta, dtype=np.uint64))
    raw_meta, tail = _raw_tail(raws)
    header = {
        "codec": SMARTIDX_CODEC,
        "version": FORMAT_VERSION,
        "value_bits": int(value_bits),
        "names": list(floats),
        "shapes": [list(x.shape) for x in floats.values()],
        "dtypes": [x.dtype.str for x in floats.values()],
        "meta_len": int(meta.size),
        **raw_meta,
    }
    index = np.concatenate(streams.index) if streams.index else np.empty(0, np.uint8)
    values = b"".join(
        [np.asarray(streams.scales, dtype="<f4").tobytes()]
        + [_pack_codes(streams.codes[p], value_bits).tobytes() for p in PACKAGES]
        + [_pack_bits(streams.signs[p]).tobytes() for p in PACKAGES]
    )
    return {
        HEADER_KEY: _pack_header(header, meta.tobytes(), index.tobytes(), tail),
        VALUES_KEY: np.frombuffer(values, dtype=np.uint8).copy(),
    }


# --------------------------------------------------------------------------------------------
# reading a payload
# --------------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """What the header says: per tensor its index sets (k, b, bytes) and the section sizes."""

    header: dict[str, Any]
    json_len: int
    meta_len: int
    tensors: list[dict[str, Any]]  # per floating tensor: n, n_k, ip / kp (k, b, len), pp [(k, b, len)]
    rest: bytes  # index bytes then raw bytes


def _read_layout(arrays: Mapping[str, np.ndarray]) -> _Layout:
    _require_keys(arrays, SMARTIDX_CODEC, (HEADER_KEY, VALUES_KEY))
    header, rest = _read_header(arrays[HEADER_KEY], SMARTIDX_CODEC)
    bits = header.get("value_bits")
    if not isinstance(bits, int) or not 0 <= bits <= MAX_VALUE_BITS:
        raise ValueError(f"corrupt payload: value_bits={bits!r}; allowed: 0..{MAX_VALUE_BITS}")
    json_len = int.from_bytes(np.asarray(arrays[HEADER_KEY])[:4].tobytes(), "little")
    meta_len = int(header["meta_len"])
    if meta_len > len(rest):
        raise ValueError("truncated payload: the meta section is cut short")
    meta = [int(v) for v in codec.varint_decode(np.frombuffer(rest[:meta_len], np.uint8))]
    pos = 0

    def take(count: int) -> list[int]:
        nonlocal pos
        if pos + count > len(meta):
            raise ValueError("corrupt payload: the meta section ends early")
        pos += count
        return meta[pos - count : pos]

    tensors = []
    for shape in header["shapes"]:
        n, n_k = math.prod(shape), kernel_size(shape)
        entry: dict[str, Any] = {"n": n, "n_k": n_k, "ip": tuple(take(3)), "kp": (0, 0, 0), "pp": []}
        if n_k:
            entry["kp"] = tuple(take(3))
            entry["pp"] = [tuple(take(3)) for _ in range(take(1)[0])]
        tensors.append(entry)
    if pos != len(meta):
        raise ValueError("corrupt payload: trailing entries in the meta section")
    return _Layout(header, json_len, meta_len, tensors, rest[meta_len:])


def _package_counts(t: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Per package (entries sent, sign bits) of one tensor's layout entry."""
    n_k = t["n_k"]
    pp_kernels = sum(k for k, _, _ in t["pp"])
    return {
        "ip": (t["ip"][0], t["ip"][0]),
        "kp": (n_k * t["kp"][0], n_k * t["kp"][0]),
        "pp": (n_k * pp_kernels, n_k * len(t["pp"])),
    }


def _sections(layout: _Layout) -> dict[str, dict[str, int]]:
    """Bytes per package and part, and the counts behind them."""
    bits = layout.header["value_bits"]
    out = {p: {"index": 0, "scales": 0, "entries": 0, "signbits": 0, "kernels": 0} for p in PACKAGES}
    out["pp"]["patterns"] = 0
    for t in layout.tensors:
        out["ip"]["index"] += t["ip"][2]
        out["kp"]["index"] += t["kp"][2]
        out["pp"]["index"] += sum(length for _, _, length in t["pp"])
        out["kp"]["kernels"] += t["kp"][0]
        out["pp"]["kernels"] += sum(k for k, _, _ in t["pp"])
        out["pp"]["patterns"] += len(t["pp"])
        for p, (entries, signbits) in _package_counts(t).items():
            out[p]["entries"] += entries
            out[p]["signbits"] += signbits
            out[p]["scales"] += 4 if entries else 0
    for p in PACKAGES:
        out[p]["codes"] = math.ceil(out[p]["entries"] * bits / 8)
        out[p]["sign"] = math.ceil(out[p]["signbits"] / 8)
    return out


def package_bytes(arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
    """A SmartIdx payload's bytes by package and part — ``{ip,kp,pp}_{index,value,sign}`` (value:
    the package's scales and codes) and ``header`` (length prefix, JSON, meta varints, raw
    tensors) — which sum to the arrays' sizes; plus counts: ``{ip,kp,pp}_entries`` (values sent),
    ``{kp,pp}_kernels`` and ``pp_patterns``."""
    layout = _read_layout(arrays)
    sec = _sections(layout)
    out: dict[str, int] = {}
    for p in PACKAGES:
        out[f"{p}_index"] = sec[p]["index"]
        out[f"{p}_value"] = sec[p]["scales"] + sec[p]["codes"]
        out[f"{p}_sign"] = sec[p]["sign"]
    index_total = sum(sec[p]["index"] for p in PACKAGES)
    out["header"] = 4 + layout.json_len + layout.meta_len + (len(layout.rest) - index_total)
    for p in PACKAGES:
        out[f"{p}_entries"] = sec[p]["entries"]
    out["kp_kernels"], out["pp_kernels"], out["pp_patterns"] = (
        sec["kp"]["kernels"],
        sec["pp"]["kernels"],
        sec["pp"]["patterns"],
    )
    return out


def _take(data: bytes, pos: int, n: int, what: str) -> tuple[bytes, int]:
    if pos + n > len(data):
        raise ValueError(f"truncated payload: {what} is cut short")
    return data[pos : pos + n], pos + n


def smartidx_decode(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A SmartIdx payload → (Δ of the floating tensors, values of the non-floating ones)."""
    layout = _read_layout(arrays)
    bits = layout.header["value_bits"]
    values = np.asarray(arrays[VALUES_KEY])
    if values.dtype != np.uint8 or values.ndim != 1:
        raise ValueError(f"'{VALUES_KEY}' must be a 1-D uint8 array, got {values.dtype} with shape {values.shape}")
    sec = _sections(layout)
    vbytes = values.tobytes()
    n_scales = sum(sec[p]["scales"] for p in PACKAGES) // 4
    raw_scales, vpos = _take(vbytes, 0, 4 * n_scales, "the scales")
    scales = iter(np.frombuffer(raw_scales, dtype="<f4"))
    codes: dict[str, np.ndarray] = {}
    signs: dict[str, np.ndarray] = {}
    for p in PACKAGES:
        chunk, vpos = _take(vbytes, vpos, sec[p]["codes"], f"the {p.upper()} values")
        count = sec[p]["entries"]
        codes[p] = unpack_codes(np.frombuffer(chunk, np.uint8), bits, count) if bits else np.empty(0, np.uint32)
    for p in PACKAGES:
        chunk, vpos = _take(vbytes, vpos, sec[p]["sign"], f"the {p.upper()} signs")
        signs[p] = np.unpackbits(np.frombuffer(chunk, np.uint8), count=sec[p]["signbits"]).astype(bool)
    if vpos != len(vbytes):
        raise ValueError("corrupt payload: trailing bytes after the sign streams")
    cpos = dict.fromkeys(PACKAGES, 0)
    spos = dict.fromkeys(PACKAGES, 0)

    def magnitudes(p: str, count: int) -> np.ndarray:
        if count == 0:
            return np.empty(0, np.float64)
        part = codes[p][cpos[p] : cpos[p] + count] if bits else codes[p]
        cpos[p] += count
        return _dequantise(next(scales), part, count, bits)

    def sign_bits(p: str, count: int) -> np.ndarray:
        out = signs[p][spos[p] : spos[p] + count]
        spos[p] += count
        return np.where(out, -1.0, 1.0)

    index, ipos = layout.rest, 0

    def positions(entry: tuple[int, int, int], universe: int, what: str) -> np.ndarray:
        nonlocal ipos
        k, b, length = entry
        data, ipos = _take(index, ipos, length, f"the index of {what}")
        if k > universe:
            raise ValueError(f"corrupt payload: {what} has {k} positions for {universe}")
        try:
            return codec.golomb_decode(np.frombuffer(data, np.uint8), k, b, universe)
        except ValueError as err:
            raise ValueError(f"corrupt payload: index of {what}: {err}") from None

    floats: dict[str, np.ndarray] = {}
    for name, shape, dtype, t in zip(
        layout.header["names"], layout.header["shapes"], layout.header["dtypes"], layout.tensors
    ):
        flat = np.zeros(t["n"], dtype=np.float64)
        ip = positions(t["ip"], t["n"], f"'{name}' (IP)")
        flat[ip] = sign_bits("ip", ip.size) * magnitudes("ip", ip.size)
        n_k = t["n_k"]
        if n_k:
            rows = flat.reshape(-1, n_k)
            kp = positions(t["kp"], rows.shape[0], f"'{name}' (KP)")
            rows[kp] = (sign_bits("kp", kp.size * n_k) * magnitudes("kp", kp.size * n_k)).reshape(-1, n_k)
            groups = []
            for j, entry in enumerate(t["pp"]):
                kernels = positions(entry, rows.shape[0], f"'{name}' (PP pattern {j})")
                groups.append((sign_bits("pp", n_k), kernels))
            total = sum(k.size for _, k in groups) * n_k
            mags = magnitudes("pp", total).reshape(-1, n_k)
            at = 0
            for pattern, kernels in groups:
                rows[kernels] = pattern[None, :] * mags[at : at + kernels.size]
                at += kernels.size
        floats[name] = flat.astype(np.dtype(dtype)).reshape(shape)
    if ipos != len(index) - sum(header_len for header_len in layout.header["raw_len"]):
        raise ValueError("corrupt payload: index bytes do not end where the raw tensors begin")
    return floats, _read_raw(layout.header, index[ipos:])


# --------------------------------------------------------------------------------------------
# the compressor
# --------------------------------------------------------------------------------------------


class SmartIdx(Compressor):
    """SmartIdx (module docstring) with residual error feedback.

    ``ratio``: fraction of each tensor's entries judged important (top-k by |a|);
    ``kernel_threshold``: fraction of a kernel's entries that must be important for the kernel to be
    selected; ``pattern_min``: selected kernels that must share a sign pattern for a pattern package;
    ``value_bits``: 0 (one mean magnitude per package) or 1..8 bits per value.
    """

    name = "smartidx"

    def __init__(
        self,
        ratio: float = 0.1,
        *,
        kernel_threshold: float = 0.5,
        pattern_min: int = 2,
        value_bits: int = 0,
        error_feedback: bool = True,
    ) -> None:
        super().__init__(error_feedback=error_feedback)
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1]; got {ratio!r}")
        if not 0.0 < float(kernel_threshold) <= 1.0:
            raise ValueError(f"kernel_threshold must lie in (0, 1]; got {kernel_threshold!r}")
        if isinstance(pattern_min, bool) or int(pattern_min) != pattern_min or int(pattern_min) < 2:
            raise ValueError(f"pattern_min must be an integer >= 2; got {pattern_min!r}")
        if isinstance(value_bits, bool) or int(value_bits) != value_bits or not 0 <= int(value_bits) <= MAX_VALUE_BITS:
            raise ValueError(f"value_bits must be an integer in 0..{MAX_VALUE_BITS}; got {value_bits!r}")
        self.ratio = float(ratio)
        self.kernel_threshold = float(kernel_threshold)
        self.pattern_min = int(pattern_min)
        self.value_bits = int(value_bits)

    def _settings(self) -> dict[str, Any]:
        return {
            CFG_RATIO: self.ratio,
            CFG_KERNEL_THRESHOLD: self.kernel_threshold,
            CFG_PATTERN_MIN: self.pattern_min,
            CFG_VALUE_BITS: self.value_bits,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SmartIdx:
        return cls(
            float(config.get(CFG_RATIO, 1.0)),
            kernel_threshold=float(config.get(CFG_KERNEL_THRESHOLD, 0.5)),
            pattern_min=int(config.get(CFG_PATTERN_MIN, 2)),
            value_bits=int(config.get(CFG_VALUE_BITS, 0)),
            error_feedback=bool(config.get(CFG_EF, False)),
        )

    def select(self, floats: Mapping[str, np.ndarray]) -> dict[str, TensorPackages]:
        return {
            name: select_packages(x, self.ratio, self.kernel_threshold, self.pattern_min) for name, x in floats.items()
        }

    def encode(
        self, floats: Mapping[str, np.ndarray], raws: Mapping[str, np.ndarray], seed: int, *, want_sent: bool
    ) -> Encoded:
        packages = self.select(floats)
        payload = smartidx_encode(floats, raws, packages, self.value_bits)
        sent = smartidx_decode(payload)[0] if want_sent else None
        masks = {}
        for name, x in floats.items():
            pk = packages[name]
            flat = np.zeros(x.size, dtype=bool)
            flat[pk.ip] = True
            if pk.n_k:
                rows = flat.reshape(-1, pk.n_k)
                rows[pk.kp] = True
                for _, kernels in pk.pp:
                    rows[kernels] = True
            masks[name] = flat.reshape(x.shape)
        total = sum(x.size for x in floats.values())
        kept = sum(pk.sent_entries() for pk in packages.values()) / total if total else 1.0
        return Encoded(payload, sent, kept, masks)

    def report(self) -> dict[str, Any]:
        return {
            "compress_ratio": self.ratio,
            "smartidx_kernel_threshold": self.kernel_threshold,
            "smartidx_pattern_min": self.pattern_min,
            "smartidx_value_bits": self.value_bits,
        }

    def payload_report(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Per reply: bytes by package and part (summed over the round's replies by the strategy)."""
        return {f"smartidx_{k}": float(v) for k, v in package_bytes(arrays).items()}


COMPRESSORS[SmartIdx.name] = SmartIdx
