"""Uplink compressors as objects, and the payload formats they write (both sides use them).

One class per compressor — :class:`TopK`, :class:`RandK`, :class:`QSGD` (FedPAQ's quantiser),
:class:`DGC` (Deep Gradient Compression), :class:`SBC` (Sparse Binary Compression) — behind one
contract, :class:`Compressor`, in the shape of ``torch.nn.utils.prune`` (one class per
method, a registry by name): what the clients are told each round (:meth:`Compressor.round_config`,
rebuilt on the client by :func:`compressor_from_config`), how an update is encoded
(:meth:`Compressor.encode`) and how any payload decodes (:func:`decode_update`: every format names
itself in its header). Error feedback is composition, not a compressor of its own:
:func:`compress_update` adds the residual before encoding and keeps what was not sent.
What a client keeps between rounds is a :class:`ClientMemory` (the residual, and DGC's momentum);
:func:`compress_with_memory` is the general client entry point, :func:`load_memory` /
:func:`store_memory` keep the memory in a Flower ``context.state``.

Every compressor compresses the **update** Δ = w_local − w_global of the floating-point tensors;
non-floating tensors (BN's ``num_batches_tracked``) travel raw, as the client's value. Payload
formats (two Flower arrays each; every Array costs an npy header and wire framing):

* **Top-k** (Stich et al. 2018; Aji & Heafield 2017) and **Rand-k with sent indices**: the project's
  sparse codec (:mod:`fedsparse.codec`): kept values as float32 + a bitmap or varint coordinate
  index per tensor, whichever is smaller (measured).
* **Rand-k with a shared seed** (Konečný et al. 2016, "random mask" updates): ``"header"`` (uint8:
  4-byte length, JSON with the mask seed and per-tensor k, then the raw bytes of non-float tensors)
  + ``"values"`` (float32). No index bytes: the server regenerates the positions from the seed.
* **FedPAQ** (Reisizadeh et al. 2020) with the QSGD quantiser (Alistarh et al. 2017): ``"header"``
  (uint8: 4-byte length, JSON, one float32 norm per bucket — per tensor by default, or one for the
  whole update with ``quant-scope = "model"`` — then raw bytes)
  + ``"levels"`` (uint8, bit-packed codes: each coordinate is ``sign·ξ + s`` ∈ [0, 2s] stored in
  b = ⌈log2(2s+1)⌉ bits).
* **DGC** (Lin et al. 2018): Top-k of the momentum-corrected accumulation, written by the sparse
  codec exactly as Top-k's payload (the server cannot tell them apart, and need not).
* **SBC** (Sattler et al. 2019): per tensor, the positions of the kept side and one mean.
  ``"header"`` (uint8: 4-byte length, JSON ``{"codec": "fedsparse-sbc", "version": 1, "index":
  {…}}`` whose ``index`` is the sparse codec's own header of the positions, then the codec's index
  bytes — bitmap / varint coordinates / whatever the codec picks, by measured size — and the raw
  bytes of non-float tensors) + ``"values"`` (float32: **one** signed mean per floating tensor).
  The positions are coded by :func:`fedsparse.codec.encode` itself (its values are not sent), so
  the index kinds are always the codec's.

Adding a compressor is one class here with a ``name``, registered in :data:`COMPRESSORS`.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import RecordDict

from fedsparse import codec
from fedsparse.arrays import record_from_numpy, record_to_numpy
from fedsparse.masks import topk_mask

__all__ = [
    "Compressor",
    "TopK",
    "RandK",
    "QSGD",
    "DGC",
    "SBC",
    "ClientMemory",
    "COMPRESSORS",
    "METHODS",
    "QUANT_SCOPES",
    "RESIDUAL_STATE_KEY",
    "MOMENTUM_STATE_KEY",
    "compressor_from_config",
    "compress_update",
    "compress_with_memory",
    "load_memory",
    "store_memory",
    "dgc_warmup_ratio",
    "dgc_client_clip",
    "clip_by_norm",
    "sbc_select",
    "decode_update",
    "topk_masks",
    "randk_positions",
    "qsgd_quantize",
    "qsgd_dequantize",
    "pack_codes",
    "unpack_codes",
    "code_bits",
    "kept_count",
]

QUANT_SCOPES = ("tensor", "model")

# Round-config entries the server sends (same spelling as the run-config keys they come from).
CFG_METHOD = "compress-method"
CFG_RATIO = "compress-ratio"
CFG_SCOPE = "topk-scope"
CFG_EF = "error-feedback"
CFG_RANDK_SCALE = "randk-scale"
CFG_RANDK_INDEX = "randk-index"
CFG_LEVELS = "quant-levels"
CFG_BUCKET = "quant-bucket"
CFG_QSCOPE = "quant-scope"
CFG_DGC_SCOPE = "dgc-scope"
CFG_DGC_MOMENTUM = "dgc-momentum"
CFG_DGC_MASKING = "dgc-momentum-masking"
#: DGC's per-client clipping threshold of the round (not a run-config key: the server derives it
#: from ``dgc-clip-norm`` and the number of clients it sampled, see :func:`dgc_client_clip`).
CFG_DGC_CLIP = "dgc-client-clip"

#: Where a client keeps its error-feedback residual between rounds (``context.state``).
RESIDUAL_STATE_KEY = "compression.residual"
#: Where a client keeps DGC's momentum u between rounds (``context.state``).
MOMENTUM_STATE_KEY = "compression.momentum"

RANDK_CODEC = "fedsparse-randk"
QSGD_CODEC = "fedsparse-qsgd"
SBC_CODEC = "fedsparse-sbc"
SMARTIDX_CODEC = "fedsparse-smartidx"
HEADER_KEY = "header"
VALUES_KEY = "values"
LEVELS_KEY = "levels"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def kept_count(ratio: float, n: int) -> int:
    """k = round_half_up(ratio·n), at least 1 (for n > 0) and at most n."""
    if n == 0:
        return 0
    return min(n, max(1, int(math.floor(float(ratio) * n + 0.5))))


def _pack_header(header: Mapping[str, Any], *tail: bytes) -> np.ndarray:
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return np.frombuffer(len(head).to_bytes(4, "little") + head + b"".join(tail), dtype=np.uint8).copy()


def _read_header(blob: np.ndarray, codec_name: str) -> tuple[dict[str, Any], bytes]:
    """The JSON header of a ``header`` array (the sparse codec's layout, :func:`codec.parse_header`),
    checked to name ``codec_name`` at this format version, and the bytes after it."""
    header, rest = codec.parse_header(blob, HEADER_KEY)
    if header.get("codec") != codec_name or header.get("version") != FORMAT_VERSION:
        raise ValueError(f"unsupported payload: codec={header.get('codec')!r} version={header.get('version')!r}")
    return header, rest.tobytes()


def _split_float(tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    floats = {k: np.asarray(v) for k, v in tensors.items() if np.asarray(v).dtype.kind == "f"}
    raws = {k: np.asarray(v) for k, v in tensors.items() if np.asarray(v).dtype.kind != "f"}
    return floats, raws


def _raw_tail(raws: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], bytes]:
    """Header entries and bytes of the non-float tensors (sent as the client's values)."""
    parts = [np.ascontiguousarray(v).tobytes() for v in raws.values()]
    meta = {
        "raw_names": list(raws),
        "raw_shapes": [list(v.shape) for v in raws.values()],
        "raw_dtypes": [v.dtype.str for v in raws.values()],
        "raw_len": [len(p) for p in parts],
    }
    return meta, b"".join(parts)


def _read_raw(header: Mapping[str, Any], tail: bytes) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for name, shape, dtype, n in zip(
        header["raw_names"], header["raw_shapes"], header["raw_dtypes"], header["raw_len"]
    ):
        out[name] = np.frombuffer(tail[pos : pos + n], dtype=np.dtype(dtype)).reshape(shape).copy()
        pos += n
    if pos != len(tail):
        raise ValueError("corrupt payload: trailing bytes after the raw tensors")
    return out


# --------------------------------------------------------------------------------------------
# Top-k (by absolute value)
# --------------------------------------------------------------------------------------------


def topk_masks(tensors: Mapping[str, np.ndarray], ratio: float, scope: str = "model") -> dict[str, np.ndarray]:
    """Boolean masks of the entries with the largest |x|: k = round(ratio·n) of them.

    ``scope = "model"``: one top-k over all tensors pooled (the update is one vector, as in Stich et
    al.); ``"tensor"``: every tensor keeps its own ratio. Ties go to the earliest positions.
    """
    if scope not in ("model", "tensor"):
        raise ValueError(f"unknown topk scope {scope!r}; choose one of: model, tensor")
    scores = {k: torch.from_numpy(np.abs(np.asarray(v, dtype=np.float32)).copy()) for k, v in tensors.items()}
    if not scores:
        return {}
    if scope == "model":
        k = kept_count(ratio, sum(s.numel() for s in scores.values()))
        chosen = topk_mask(scores, k)
    else:
        chosen = {}
        for name, s in scores.items():
            chosen.update(topk_mask({name: s}, kept_count(ratio, s.numel())))
    return {k: m.numpy() for k, m in chosen.items()}


# --------------------------------------------------------------------------------------------
# Rand-k
# --------------------------------------------------------------------------------------------


def randk_positions(seed: int, index: int, n: int, k: int) -> np.ndarray:
    """The k of n flat positions (sorted) Rand-k keeps for tensor number ``index``: a function of
    (seed, index) alone, so the server regenerates them from the seed in the payload."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x5EED]))
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


def _randk_select(floats: Mapping[str, np.ndarray], ratio: float, seed: int) -> tuple[dict[str, np.ndarray], list[int]]:
    masks, ks = {}, []
    for i, (name, x) in enumerate(floats.items()):
        k = kept_count(ratio, x.size)
        flat = np.zeros(x.size, dtype=bool)
        flat[randk_positions(seed, i, x.size, k)] = True
        masks[name] = flat.reshape(x.shape)
        ks.append(k)
    return masks, ks


def _randk_seed_encode(
    floats: Mapping[str, np.ndarray],
    raws: Mapping[str, np.ndarray],
    masks: Mapping[str, np.ndarray],
    ks: list[int],
    seed: int,
) -> dict[str, np.ndarray]:
    raw_meta, tail = _raw_tail(raws)
    header = {
        "codec": RANDK_CODEC,
        "version": FORMAT_VERSION,
        "seed": int(seed),
        "names": list(floats),
        "shapes": [list(x.shape) for x in floats.values()],
        "dtypes": [x.dtype.str for x in floats.values()],
        "k": ks,
        **raw_meta,
    }
    values = [np.asarray(x).reshape(-1)[masks[n].reshape(-1)].astype(np.float32) for n, x in floats.items()]
    return {
        HEADER_KEY: _pack_header(header, tail),
        VALUES_KEY: np.concatenate(values) if values else np.empty(0, np.float32),
    }


def _require_keys(arrays: Mapping[str, np.ndarray], codec_name: str, keys: tuple[str, ...]) -> None:
    """A payload holds exactly its codec's arrays: a missing one cannot decode, an extra one would
    be ignored by the decoder yet counted on the wire (a foreign or tampered payload)."""
    if set(arrays) != set(keys):
        raise ValueError(f"a {codec_name} payload holds exactly the arrays {list(keys)}, got {sorted(arrays)}")


def _randk_seed_decode(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    _require_keys(arrays, RANDK_CODEC, (HEADER_KEY, VALUES_KEY))
    header, tail = _read_header(arrays[HEADER_KEY], RANDK_CODEC)
    values = np.asarray(arrays[VALUES_KEY])
    if values.dtype != np.float32:
        raise ValueError(f"'{VALUES_KEY}' must be float32, got {values.dtype}")
    out, pos = {}, 0
    for i, (name, shape, dtype, k) in enumerate(zip(header["names"], header["shapes"], header["dtypes"], header["k"])):
        n = math.prod(shape)
        flat = np.zeros(n, dtype=np.dtype(dtype))
        vals = values[pos : pos + k]
        if vals.size != k:
            raise ValueError(f"truncated payload: values of '{name}' are cut short")
        flat[randk_positions(header["seed"], i, n, k)] = vals
        out[name] = flat.reshape(shape)
        pos += k
    if pos != values.size:
        raise ValueError("corrupt payload: trailing values after the last tensor")
    return out, _read_raw(header, tail)


# --------------------------------------------------------------------------------------------
# QSGD stochastic quantisation (FedPAQ's quantiser)
# --------------------------------------------------------------------------------------------


def code_bits(levels: int) -> int:
    """Bits per coordinate for codes in [0, 2s]: ⌈log2(2s + 1)⌉."""
    return max(1, math.ceil(math.log2(2 * int(levels) + 1)))


def qsgd_quantize(
    x: np.ndarray, levels: int, rng: np.random.Generator, bucket: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """QSGD's Q_s of a flat vector: returns (codes in [0, 2s] as uint32, float32 norms per bucket).

    Coordinate i of bucket B: u = s·|x_i| / ‖x_B‖₂, ξ = ⌊u⌋ + Bernoulli(u − ⌊u⌋), code = sign(x_i)·ξ + s.
    E[ξ] = u, so :func:`qsgd_dequantize` (‖x_B‖·sign·ξ/s) is unbiased. The norm is rounded to float32
    (what is sent) *before* u is computed, so the estimate is unbiased for the decoded norm too.
    ``bucket = 0`` uses one norm for the whole vector (per tensor, as FedPAQ uses it).
    """
    s = int(levels)
    if s < 1:
        raise ValueError(f"levels (s) must be >= 1; got {levels!r}")
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    n = flat.size
    if n == 0:
        return np.empty(0, np.uint32), np.empty(0, np.float32)
    if not np.isfinite(flat).all():
        raise ValueError("cannot quantise NaN or inf")
    size = n if bucket <= 0 else int(bucket)
    nb = math.ceil(n / size)
    pad = np.zeros(nb * size)
    pad[:n] = flat
    blocks = pad.reshape(nb, size)
    norms = np.linalg.norm(blocks, axis=1).astype(np.float32)
    # The decoder multiplies by the float32 norm: make sure it is >= every |x_i| of its bucket.
    too_small = norms.astype(np.float64) < np.abs(blocks).max(axis=1)
    norms[too_small] = np.nextafter(norms[too_small], np.float32(np.inf))
    scale = np.where(norms > 0, s / np.where(norms > 0, norms.astype(np.float64), 1.0), 0.0)
    u = np.minimum(np.abs(blocks) * scale[:, None], s)
    low = np.floor(u)
    xi = low + (rng.random(u.shape) < (u - low))
    codes = (np.sign(blocks) * xi + s).reshape(-1)[:n]
    return codes.astype(np.uint32), norms


def qsgd_dequantize(codes: np.ndarray, norms: np.ndarray, levels: int, n: int, bucket: int = 0) -> np.ndarray:
    """Inverse map of :func:`qsgd_quantize` (float64): ‖x_B‖ · (code − s) / s."""
    s = int(levels)
    if n == 0:
        return np.empty(0)
    size = n if bucket <= 0 else int(bucket)
    per = np.repeat(norms.astype(np.float64), size)[:n]
    return per * (codes.astype(np.float64) - s) / s


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Bit-pack unsigned codes (< 2**bits) into bytes, most significant bit first."""
    codes = np.asarray(codes, dtype=np.uint32)
    if codes.size and int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code does not fit in {bits} bits")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    matrix = ((codes[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(matrix.reshape(-1))


def unpack_codes(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` codes of ``bits`` bits each."""
    data = np.asarray(data, dtype=np.uint8)
    if data.size != math.ceil(count * bits / 8):
        raise ValueError(f"truncated payload: {data.size} bytes of codes, the header says {count} codes of {bits} bits")
    flat = np.unpackbits(data, count=count * bits)
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.uint32)).astype(np.uint32)
    return flat.reshape(count, bits).astype(np.uint32) @ weights


def _fedpaq_encode(
    floats: Mapping[str, np.ndarray],
    raws: Mapping[str, np.ndarray],
    levels: int,
    bucket: int,
    rng: np.random.Generator,
    scope: str = "tensor",
) -> dict[str, np.ndarray]:
    """QSGD over each tensor (``scope = "tensor"``) or over the whole update as one vector
    (``"model"``, FedPAQ's Q(x) on x ∈ R^p); ``bucket`` > 0 splits either into buckets."""
    if scope not in QUANT_SCOPES:
        raise ValueError(f"unknown quantisation scope {scope!r}; choose one of: {', '.join(QUANT_SCOPES)}")
    bits = code_bits(levels)
    all_codes, all_norms, nnorms = [], [], []
    if scope == "model":
        vectors = [np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in floats.values()])] if floats else []
    else:
        vectors = list(floats.values())
    for x in vectors:
        codes, norms = qsgd_quantize(x, levels, rng, bucket)
        all_codes.append(codes)
        all_norms.append(norms)
        nnorms.append(int(norms.size))
    raw_meta, tail = _raw_tail(raws)
    header = {
        "codec": QSGD_CODEC,
        "version": FORMAT_VERSION,
        "levels": int(levels),
        "bits": bits,
        "bucket": int(bucket),
        "scope": scope,
        "names": list(floats),
        "shapes": [list(x.shape) for x in floats.values()],
        "dtypes": [x.dtype.str for x in floats.values()],
        "nnorms": nnorms,
        **raw_meta,
    }
    norms = np.concatenate(all_norms).astype("<f4") if all_norms else np.empty(0, "<f4")
    codes = np.concatenate(all_codes) if all_codes else np.empty(0, np.uint32)
    return {HEADER_KEY: _pack_header(header, norms.tobytes(), tail), LEVELS_KEY: pack_codes(codes, bits)}


def _fedpaq_decode(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    _require_keys(arrays, QSGD_CODEC, (HEADER_KEY, LEVELS_KEY))
    if np.asarray(arrays[LEVELS_KEY]).dtype != np.uint8:
        raise ValueError(f"'{LEVELS_KEY}' must hold bit-packed uint8 codes, got {np.asarray(arrays[LEVELS_KEY]).dtype}")
    header, rest = _read_header(arrays[HEADER_KEY], QSGD_CODEC)
    total_norms = sum(header["nnorms"])
    norms = np.frombuffer(rest[: 4 * total_norms], dtype="<f4")
    if norms.size != total_norms:
        raise ValueError("truncated payload: fewer norms than the header says")
    sizes = [math.prod(s) for s in header["shapes"]]
    codes = unpack_codes(arrays[LEVELS_KEY], header["bits"], sum(sizes))
    levels, bucket = header["levels"], header["bucket"]
    if header.get("scope", "tensor") == "model":
        flat = qsgd_dequantize(codes, norms, levels, sum(sizes), bucket) if sizes else np.empty(0)
        pieces = np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []
    else:
        pieces, cpos, npos = [], 0, 0
        for n, nn_ in zip(sizes, header["nnorms"]):
            pieces.append(qsgd_dequantize(codes[cpos : cpos + n], norms[npos : npos + nn_], levels, n, bucket))
            cpos += n
            npos += nn_
    out = {
        name: vals.astype(np.dtype(dtype)).reshape(shape)
        for name, shape, dtype, vals in zip(header["names"], header["shapes"], header["dtypes"], pieces)
    }
    return out, _read_raw(header, rest[4 * total_norms :])


# --------------------------------------------------------------------------------------------
# SBC: the kept side's positions and one mean per tensor
# --------------------------------------------------------------------------------------------


def sbc_select(x: np.ndarray, k: int) -> tuple[np.ndarray, np.float32]:
    """Sparse Binary Compression of one tensor (Sattler et al. 2019, Algorithm 1).

    The k largest positive entries and the k most negative ones (fewer where the tensor has fewer of
    that sign; ties go to the earliest positions); μ₊ and μ₋ the mean magnitudes of the two sets.
    Keeps the side with the larger mean (μ₊ ≥ μ₋ keeps the positive one, as the paper's ``≥``) and
    returns ``(mask, value)``: the kept side's positions and +μ₊ or −μ₋ as float32, the one value
    every kept position takes. A tensor with no non-zero entry gives an empty mask and 0.
    """
    shape = np.shape(x)
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    sides: list[tuple[float, np.ndarray | None]] = []
    for sign in (1.0, -1.0):
        signed = sign * flat
        kk = min(int(k), int(np.count_nonzero(signed > 0)))
        if kk == 0:
            sides.append((0.0, None))
            continue
        chosen = topk_mask({"x": torch.from_numpy(np.where(signed > 0, signed, 0.0))}, kk)["x"].numpy()
        sides.append((float(signed[chosen].mean()), chosen))
    (mu_pos, pos), (mu_neg, neg) = sides
    if pos is not None and (neg is None or mu_pos >= mu_neg):
        return pos.reshape(shape), np.float32(mu_pos)
    if neg is not None:
        return neg.reshape(shape), np.float32(-mu_neg)
    return np.zeros(shape, dtype=bool), np.float32(0.0)


def _sbc_encode(
    floats: Mapping[str, np.ndarray],
    raws: Mapping[str, np.ndarray],
    masks: Mapping[str, np.ndarray],
    values: list[np.float32],
) -> dict[str, np.ndarray]:
    """The SBC payload (module docstring): the positions coded by the sparse codec — its
    ``index`` array, whose values (placeholders) are not sent — and one float32 per float tensor."""
    placeholders = {name: np.zeros(x.shape, x.dtype) for name, x in floats.items()}
    index = codec.encode({**placeholders, **raws}, masks)[codec.INDEX_KEY]
    inner, rest = codec.parse_header(index, codec.INDEX_KEY)
    header = {"codec": SBC_CODEC, "version": FORMAT_VERSION, "index": inner}
    return {HEADER_KEY: _pack_header(header, rest.tobytes()), VALUES_KEY: np.asarray(values, dtype="<f4").reshape(-1)}


def _sbc_decode(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    _require_keys(arrays, SBC_CODEC, (HEADER_KEY, VALUES_KEY))
    header, rest = _read_header(arrays[HEADER_KEY], SBC_CODEC)
    inner = header.get("index")
    if not isinstance(inner, dict) or inner.get("value_bits") != 32:
        raise ValueError("corrupt payload: the SBC header holds no sparse-codec index header")
    means = np.asarray(arrays[VALUES_KEY])
    if means.dtype != np.float32 or means.ndim != 1:
        raise ValueError(f"'{VALUES_KEY}' must be a 1-D float32 array, got {means.dtype} with shape {means.shape}")
    float_at = [i for i, kind in enumerate(inner["kinds"]) if kind != "raw"]
    if means.size != len(float_at):
        raise ValueError(f"corrupt payload: {means.size} means for {len(float_at)} floating tensors")
    # the codec decodes the positions (and the raw tensors) given placeholder values
    placeholders = np.zeros(sum(int(inner["nnz"][i]) for i in float_at), dtype=np.float32)
    tensors, masks = codec.decode({codec.INDEX_KEY: _pack_header(inner, rest), codec.VALUES_KEY: placeholders})
    floats, raws = {}, {}
    names = inner["names"]
    for j, i in enumerate(float_at):
        name = names[i]
        floats[name] = np.where(masks[name], means[j], np.float32(0)).astype(tensors[name].dtype)
    for i, name in enumerate(names):
        if inner["kinds"][i] == "raw":
            if tensors[name].dtype.kind == "f":
                raise ValueError(f"corrupt payload: floating tensor '{name}' sent raw (SBC sends positions and a mean)")
            raws[name] = tensors[name]
    return floats, raws


# --------------------------------------------------------------------------------------------
# the compressors
# --------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    """One encoded update: the payload, what the server will decode (for error feedback; None when
    not asked for), the fraction of entries kept (1.0 for a quantiser, which keeps them all) and,
    for a sparsifier, the positions sent (DGC's momentum masking needs them)."""

    payload: dict[str, np.ndarray]
    sent: dict[str, np.ndarray] | None
    kept_fraction: float
    masks: dict[str, np.ndarray] | None = None


@dataclass
class ClientMemory:
    """What a client keeps between the rounds it takes part in, per floating tensor name.

    ``residual``: the error-feedback memory e (for DGC the accumulated velocity v, which is the same
    thing: what was accumulated and not yet sent). ``momentum``: DGC's velocity u (empty for every
    other compressor, and for DGC with ``momentum = 0``). A missing entry is zero.
    """

    residual: dict[str, np.ndarray] = field(default_factory=dict)
    momentum: dict[str, np.ndarray] = field(default_factory=dict)


def _kept_fraction(masks: Mapping[str, np.ndarray], total: int) -> float:
    return (sum(int(np.count_nonzero(m)) for m in masks.values()) / total) if total else 1.0


class Compressor(ABC):
    """One uplink compressor (see the module docstring).

    ``error_feedback``: clients keep the unsent part a − C(a) and add it to their next update.
    """

    name: ClassVar[str]

    def __init__(self, *, error_feedback: bool = False) -> None:
        self.error_feedback = bool(error_feedback)

    def round_config(self) -> dict[str, Any]:
        """The settings every train message carries (the clients rebuild the compressor from them)."""
        return {CFG_METHOD: self.name, CFG_EF: self.error_feedback, **self._settings()}

    @abstractmethod
    def _settings(self) -> dict[str, Any]:
        """This compressor's own round-config entries, in a fixed order (they are counted bytes)."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: Mapping[str, Any]) -> Compressor:
        """The compressor a round config describes (the inverse of :meth:`round_config`)."""

    @abstractmethod
    def encode(
        self, floats: Mapping[str, np.ndarray], raws: Mapping[str, np.ndarray], seed: int, *, want_sent: bool
    ) -> Encoded:
        """Encode the floating tensors ``floats`` (raws travel as they are); ``seed`` drives any
        randomness. ``want_sent``: also return the decoded floats (error feedback needs them)."""

    @abstractmethod
    def report(self) -> dict[str, Any]:
        """Its settings as ``rounds.csv`` columns."""

    def payload_report(self, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Figures measured on one reply's payload that the server sums over a round's replies
        into ``rounds.csv`` columns (SmartIdx: bytes by package). Default: none."""
        return {}

    # -- per round (server side) and between rounds (client side); defaults: plain error feedback

    def for_round(self, server_round: int, num_clients: int) -> Compressor:
        """The compressor the clients of round ``server_round`` run, ``num_clients`` of them sampled.

        The server calls it after sampling and sends the result's :meth:`round_config`, so a
        schedule lives on the server alone. Default: this compressor, every round.
        """
        return self

    @property
    def keeps_momentum(self) -> bool:
        """Whether clients keep more than the residual between rounds (:attr:`ClientMemory.momentum`)."""
        return False

    def prepare(
        self, floats: Mapping[str, np.ndarray], memory: ClientMemory
    ) -> tuple[dict[str, np.ndarray], ClientMemory]:
        """The vector to encode from this round's update Δ and the client's memory, and the memory
        to :meth:`settle` after encoding. Error feedback: a = Δ + e; otherwise Δ."""
        if not self.error_feedback:
            return dict(floats), memory
        e = memory.residual
        return {k: (x + e[k]) if k in e else x.copy() for k, x in floats.items()}, memory

    def settle(self, acc: Mapping[str, np.ndarray], encoded: Encoded, memory: ClientMemory) -> ClientMemory:
        """The memory after sending. Error feedback: e ← a − C(a) for the tensors sent (a tensor left
        out of this update, e.g. one FedLUAR recycles, keeps its residual)."""
        if not self.error_feedback:
            return memory
        if encoded.sent is None:
            raise RuntimeError(f"{self.name}: error feedback needs what was sent")
        kept = {k: (acc[k] - encoded.sent[k]).astype(acc[k].dtype) for k in acc}
        return ClientMemory({**memory.residual, **kept}, memory.momentum)


class TopK(Compressor):
    """Top-k by magnitude over the whole update (``scope = "model"``) or per tensor."""

    name = "topk"
    SCOPES = ("model", "tensor")

    def __init__(self, ratio: float = 0.1, scope: str = "model", *, error_feedback: bool = True) -> None:
        super().__init__(error_feedback=error_feedback)
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1]; got {ratio!r}")
        if scope not in self.SCOPES:
            raise ValueError(f"unknown topk_scope {scope!r}; choose one of: {', '.join(self.SCOPES)}")
        self.ratio, self.scope = float(ratio), scope

    def _settings(self) -> dict[str, Any]:
        return {CFG_RATIO: self.ratio, CFG_SCOPE: self.scope}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TopK:
        return cls(
            float(config.get(CFG_RATIO, 1.0)),
            str(config.get(CFG_SCOPE, "model")),
            error_feedback=bool(config.get(CFG_EF, False)),
        )

    def encode(
        self, floats: Mapping[str, np.ndarray], raws: Mapping[str, np.ndarray], seed: int, *, want_sent: bool
    ) -> Encoded:
        masks = topk_masks(floats, self.ratio, self.scope)
        payload = codec.encode({**floats, **raws}, masks)
        sent = {k: np.where(masks[k], x, np.zeros((), x.dtype)) for k, x in floats.items()}
        return Encoded(payload, sent, _kept_fraction(masks, sum(x.size for x in floats.values())), masks)

    def report(self) -> dict[str, Any]:
        return {"compress_ratio": self.ratio}


class RandK(Compressor):
    """Rand-k: k random positions per tensor, scaled by n/k (unbiased) or not; the positions
    regenerated from a seed in the payload (``index = "seed"``) or sent through the sparse codec."""

    name = "randk"
    SCALES = ("unbiased", "none")
    INDEX = ("seed", "codec")

    def __init__(
        self, ratio: float = 0.1, scale: str = "unbiased", index: str = "seed", *, error_feedback: bool = False
    ) -> None:
        super().__init__(error_feedback=error_feedback)
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1]; got {ratio!r}")
        if scale not in self.SCALES:
            raise ValueError(f"unknown randk_scale {scale!r}; choose one of: {', '.join(self.SCALES)}")
        if index not in self.INDEX:
            raise ValueError(f"unknown randk_index {index!r}; choose one of: {', '.join(self.INDEX)}")
        if self.error_feedback and scale == "unbiased":
            raise ValueError(
                "Rand-k error feedback needs randk_scale='none' (the residual of a scaled estimate diverges)"
            )
        self.ratio, self.scale, self.index = float(ratio), scale, index

    def _settings(self) -> dict[str, Any]:
        return {CFG_RATIO: self.ratio, CFG_RANDK_SCALE: self.scale, CFG_RANDK_INDEX: self.index}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RandK:
        return cls(
            float(config.get(CFG_RATIO, 1.0)),
            str(config.get(CFG_RANDK_SCALE, "unbiased")),
            str(config.get(CFG_RANDK_INDEX, "seed")),
            error_feedback=False,
        )._with_feedback(bool(config.get(CFG_EF, False)))

    def _with_feedback(self, on: bool) -> RandK:
        self.error_feedback = on  # the server validated the combination; a client follows it
        return self

    def encode(
        self, floats: Mapping[str, np.ndarray], raws: Mapping[str, np.ndarray], seed: int, *, want_sent: bool
    ) -> Encoded:
        masks, ks = _randk_select(floats, self.ratio, seed)
        values = {
            k: (x * (x.size / max(kk, 1)) if self.scale == "unbiased" else x).astype(x.dtype, copy=False)
            for (k, x), kk in zip(floats.items(), ks)
        }
        if self.index == "seed":
            payload = _randk_seed_encode(values, raws, masks, ks, seed)
        else:
            payload = codec.encode({**values, **raws}, masks)
        sent = {k: np.where(masks[k], x, np.zeros((), x.dtype)) for k, x in values.items()}
        return Encoded(payload, sent, _kept_fraction(masks, sum(x.size for x in floats.values())))

    def report(self) -> dict[str, Any]:
        return {"compress_ratio": self.ratio}


class QSGD(Compressor):
    """FedPAQ's quantiser: QSGD with s levels per tensor (or over the whole update), one float32
    norm per bucket of ``bucket`` coordinates (0 = per quantised vector)."""

    name = "fedpaq"

    def __init__(
        self, levels: int = 8, bucket: int = 0, scope: str = "tensor", *, error_feedback: bool = False
    ) -> None:
        super().__init__(error_feedback=error_feedback)
        if scope not in QUANT_SCOPES:
            raise ValueError(f"unknown quant_scope {scope!r}; choose one of: {', '.join(QUANT_SCOPES)}")
        if int(levels) < 1 or int(bucket) < 0:
            raise ValueError(f"levels must be >= 1 and bucket >= 0; got levels={levels!r}, bucket={bucket!r}")
        self.levels, self.bucket, self.scope = int(levels), int(bucket), scope

    def _settings(self) -> dict[str, Any]:
        return {CFG_LEVELS: self.levels, CFG_BUCKET: self.bucket, CFG_QSCOPE: self.scope}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> QSGD:
        return cls(
            int(config[CFG_LEVELS]),
            int(config.get(CFG_BUCKET, 0)),
            str(config.get(CFG_QSCOPE, "tensor")),
            error_feedback=bool(config.get(CFG_EF, False)),
        )

    def encode(
        self, floats: Mapping[str, np.ndarray], raws: Mapping[str, np.ndarray], seed: int, *, want_sent: bool
    ) -> Encoded:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xFEDA]))
        payload = _fedpaq_encode(floats, raws, self.levels, self.bucket, rng, self.scope)
        # what was sent, decoded, is needed only for the error-feedback residual
        sent = _fedpaq_decode(payload)[0] if want_sent else None
        return Encoded(payload, sent, 1.0)

    def report(self) -> dict[str, Any]:
        return {"quant_levels": self.levels, "quant_bits": code_bits(self.levels)}


# --------------------------------------------------------------------------------------------
# DGC: momentum correction, local clipping, momentum factor masking, warm-up
# --------------------------------------------------------------------------------------------


def dgc_warmup_ratio(ratio: float, warmup_rounds: int, server_round: int) -> float:
    """DGC's sparsity warm-up: rounds t = 1 … W keep the fraction ratio^(t/(W+1)) of the entries —
    the sparsity rises exponentially from 0 toward the target — then ``ratio`` from round W + 1 on.

    With the paper's target (0.1 % kept) and W = 4 this is 25.1 %, 6.3 %, 1.6 %, 0.40 % kept, i.e. the
    paper's 75 %, 93.75 %, 98.4375 %, 99.6 % sparsity, then 99.9 %. ``warmup_rounds = 0``: no warm-up.
    """
    if warmup_rounds <= 0 or server_round > warmup_rounds or server_round < 1:
        return float(ratio)
    return float(ratio) ** (server_round / (warmup_rounds + 1))


def dgc_client_clip(clip_norm: float, num_clients: int) -> float:
    """The L2 threshold each client clips its update Δ at, for a threshold ``clip_norm`` on the
    round's aggregated update and ``num_clients`` clients (0 = no clipping).

    DGC clips node k's gradient G^k at N^(-1/2)·thr, where G = Σ_k G^k is the aggregate and each
    G^k carries the 1/N of the mean (the paper's algorithm divides by N·b). Here the
    aggregate is the average Σ ρ_i Δ_i with ρ_i ≈ 1/N, so client i's share is Δ_i/N and
    ‖Δ_i/N‖ ≤ N^(-1/2)·thr is ‖Δ_i‖ ≤ √N·thr.
    """
    if clip_norm <= 0 or num_clients <= 0:
        return 0.0
    return float(clip_norm) * math.sqrt(num_clients)


def clip_by_norm(floats: Mapping[str, np.ndarray], threshold: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the tensors together so that their joint L2 norm is at most ``threshold`` (as
    ``torch.nn.utils.clip_grad_norm_``; 0 = no clipping). Returns (tensors, the factor applied);
    tensors within the bound are returned unchanged (factor 1)."""
    if threshold <= 0:
        return dict(floats), 1.0
    norm = math.sqrt(sum(float(np.sum(np.square(x, dtype=np.float64))) for x in floats.values()))
    if norm <= threshold:
        return dict(floats), 1.0
    factor = threshold / norm
    return {k: (x * factor).astype(x.dtype, copy=False) for k, x in floats.items()}, factor


class DGC(TopK):
    """Deep Gradient Compression (Lin et al., ICLR 2018) on the client's update.

    Each round a client takes part in, with Δ its local update (w_local − w_global, the quantity
    every compressor here compresses — the paper's per-iteration gradient becomes the round's update):

    1. local clipping: Δ ← Δ·min(1, τ/‖Δ‖₂), τ = ``client_clip`` (0 = off);
    2. momentum correction: u ← m·u + Δ, v ← v + u (m = ``momentum``; 0 gives v ← v + Δ, i.e.
       Top-k with error feedback);
    3. send Top-k of v (per tensor by default, as the paper's Algorithm 1 selects per layer);
    4. v ← v ⊙ ¬mask (the residual: what was not sent), and with ``momentum_masking``
       u ← u ⊙ ¬mask (momentum factor masking).

    u and v live in the client's :class:`ClientMemory` (v as the residual). The payload is Top-k's.

    Server-side settings, not sent: ``warmup_rounds`` (the exponential sparsity warm-up,
    :func:`dgc_warmup_ratio`) and ``clip_norm`` (the threshold on the aggregate, turned into the
    per-client ``client_clip`` by :func:`dgc_client_clip`). :meth:`for_round` makes the round's
    compressor from them: that one carries the round's ratio and τ, and no schedule.
    """

    name = "dgc"

    def __init__(  # noqa: PLR0913 - one knob per paper technique
        self,
        ratio: float = 0.001,
        scope: str = "tensor",
        *,
        momentum: float = 0.9,
        momentum_masking: bool = True,
        clip_norm: float = 0.0,
        warmup_rounds: int = 0,
        client_clip: float = 0.0,
    ) -> None:
        super().__init__(ratio, scope, error_feedback=True)
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must lie in [0, 1); got {momentum!r}")
        for what, value in (("clip_norm", clip_norm), ("client_clip", client_clip)):
            if not (math.isfinite(float(value)) and float(value) >= 0.0):
                raise ValueError(f"{what} must be a finite number >= 0 (0 = no clipping); got {value!r}")
        if int(warmup_rounds) < 0:
            raise ValueError(f"warmup_rounds must be >= 0; got {warmup_rounds!r}")
        self.momentum = float(momentum)
        self.momentum_masking = bool(momentum_masking)
        self.clip_norm = float(clip_norm)
        self.warmup_rounds = int(warmup_rounds)
        self.client_clip = float(client_clip)

    def _settings(self) -> dict[str, Any]:
        return {
            CFG_RATIO: self.ratio,
            CFG_DGC_SCOPE: self.scope,
            CFG_DGC_MOMENTUM: self.momentum,
            CFG_DGC_MASKING: self.momentum_masking,
            CFG_DGC_CLIP: self.client_clip,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DGC:
        return cls(
            float(config.get(CFG_RATIO, 1.0)),
            str(config.get(CFG_DGC_SCOPE, "tensor")),
            momentum=float(config.get(CFG_DGC_MOMENTUM, 0.0)),
            momentum_masking=bool(config.get(CFG_DGC_MASKING, True)),
            client_clip=float(config.get(CFG_DGC_CLIP, 0.0)),
        )

    def for_round(self, server_round: int, num_clients: int) -> DGC:
        """The round's compressor: the warm-up's ratio and the per-client clipping threshold."""
        client_clip = dgc_client_clip(self.clip_norm, num_clients) if self.clip_norm > 0 else self.client_clip
        return DGC(
            dgc_warmup_ratio(self.ratio, self.warmup_rounds, server_round),
            self.scope,
            momentum=self.momentum,
            momentum_masking=self.momentum_masking,
            client_clip=client_clip,
        )

    @property
    def keeps_momentum(self) -> bool:
        return self.momentum > 0

    def prepare(
        self, floats: Mapping[str, np.ndarray], memory: ClientMemory
    ) -> tuple[dict[str, np.ndarray], ClientMemory]:
        """Clip Δ, then u ← m·u + Δ and v ← v + u; encode v."""
        delta, _ = clip_by_norm(floats, self.client_clip)
        if self.momentum > 0:
            old = memory.momentum
            u = {k: (self.momentum * old[k] + d) if k in old else d.copy() for k, d in delta.items()}
            momentum = {**old, **u}
        else:
            u, momentum = delta, memory.momentum
        e = memory.residual
        v = {k: (e[k] + x) if k in e else x.copy() for k, x in u.items()}
        return v, ClientMemory(memory.residual, momentum)

    def settle(self, acc: Mapping[str, np.ndarray], encoded: Encoded, memory: ClientMemory) -> ClientMemory:
        """v ← v − sent (zero where sent); with momentum masking u ← 0 where sent."""
        memory = super().settle(acc, encoded, memory)
        if self.momentum > 0 and self.momentum_masking:
            if encoded.masks is None:
                raise RuntimeError("DGC's momentum masking needs the positions sent")
            masked = {
                k: np.where(encoded.masks[k], np.zeros((), u.dtype), u)
                for k, u in memory.momentum.items()
                if k in encoded.masks
            }
            memory = ClientMemory(memory.residual, {**memory.momentum, **masked})
        return memory

    def report(self) -> dict[str, Any]:
        return {"compress_ratio": self.ratio, "dgc_client_clip": self.client_clip}


# --------------------------------------------------------------------------------------------
# SBC
# --------------------------------------------------------------------------------------------


class SBC(Compressor):
    """Sparse Binary Compression (Sattler et al. 2019): per floating tensor, the k = ``ratio``·n
    largest positive and k most negative entries of the (residual-corrected) update, the side with
    the larger mean magnitude kept as positions plus that one mean (:func:`sbc_select`). With error
    feedback (default, as the paper) the unsent part stays in the residual: e ← a − C(a)."""

    name = "sbc"

    def __init__(self, ratio: float = 0.01, *, error_feedback: bool = True) -> None:
        super().__init__(error_feedback=error_feedback)
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1]; got {ratio!r}")
        self.ratio = float(ratio)

    def _settings(self) -> dict[str, Any]:
        return {CFG_RATIO: self.ratio}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SBC:
        return cls(float(config.get(CFG_RATIO, 1.0)), error_feedback=bool(config.get(CFG_EF, False)))

    def encode(
        self, floats: Mapping[str, np.ndarray], raws: Mapping[str, np.ndarray], seed: int, *, want_sent: bool
    ) -> Encoded:
        masks: dict[str, np.ndarray] = {}
        values: list[np.float32] = []
        sent: dict[str, np.ndarray] = {}
        for name, x in floats.items():
            mask, value = sbc_select(x, kept_count(self.ratio, x.size))
            masks[name] = mask
            values.append(value)
            sent[name] = np.where(mask, value, np.float32(0)).astype(x.dtype)  # as the server decodes it
        payload = _sbc_encode(floats, raws, masks, values)
        return Encoded(payload, sent, _kept_fraction(masks, sum(x.size for x in floats.values())), masks)

    def report(self) -> dict[str, Any]:
        return {"compress_ratio": self.ratio}


#: Every compressor by the name clients see in ``compress-method``. SmartIdx, in its own module
#: :mod:`fedsparse.smartidx`, registers itself here when that module is imported
#: (:func:`compressor_from_config` imports it).
COMPRESSORS: dict[str, type[Compressor]] = {c.name: c for c in (TopK, RandK, QSGD, DGC, SBC)}
METHODS = (*COMPRESSORS, "smartidx")


def compressor_from_config(config: Mapping[str, Any]) -> Compressor:
    """The compressor a round's config names (``compress-method``) with its settings."""
    method = str(config[CFG_METHOD])
    _register_smartidx()
    if method not in COMPRESSORS:
        raise ValueError(f"unknown compress-method {method!r}; choose one of: {', '.join(COMPRESSORS)}")
    return COMPRESSORS[method].from_config(config)


# --------------------------------------------------------------------------------------------
# one entry point each way
# --------------------------------------------------------------------------------------------


def compress_with_memory(
    update: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    memory: ClientMemory | None = None,
    *,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], ClientMemory, dict[str, float]]:
    """Compress a client's update with the compressor the round's config names, using and updating
    what the client keeps between rounds.

    ``update``: Δ for floating tensors; non-floating tensors (the client's values) are sent raw.
    ``memory``: the client's :class:`ClientMemory` (None: a client's first round).
    Returns ``(payload arrays, new memory, stats)``: the compressor's :meth:`~Compressor.prepare`
    turns Δ and the memory into the vector it encodes (Δ + e with error feedback; DGC's v),
    :meth:`~Compressor.settle` the memory after (e ← a − C(a); DGC's masking). ``seed`` drives
    Rand-k's mask and FedPAQ's rounding.
    """
    return _compress(compressor_from_config(config), update, memory or ClientMemory(), seed)


def _compress(
    compressor: Compressor, update: Mapping[str, np.ndarray], memory: ClientMemory, seed: int
) -> tuple[dict[str, np.ndarray], ClientMemory, dict[str, float]]:
    floats, raws = _split_float(update)
    acc, memory = compressor.prepare(floats, memory)
    encoded = compressor.encode(acc, raws, seed, want_sent=compressor.error_feedback)
    memory = compressor.settle(acc, encoded, memory)
    return encoded.payload, memory, {"kept-fraction": encoded.kept_fraction}


def compress_update(
    update: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    *,
    residual: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    """Compress a client's update with the compressor the round's config names (the residual-only
    form of :func:`compress_with_memory`).

    ``update``: Δ for floating tensors; non-floating tensors (the client's values) are sent raw.
    ``residual``: the error-feedback memory e of the floating tensors (missing entries = 0).
    Returns ``(payload arrays, new residual, stats)``. With error feedback the compressor sees
    a = Δ + e and the new residual is a − C(a) (Stich et al. 2018); without it the residual is
    returned unchanged. ``seed`` drives Rand-k's mask and FedPAQ's rounding. A compressor that keeps
    a momentum too (DGC with momentum > 0) needs :func:`compress_with_memory`.
    """
    compressor = compressor_from_config(config)
    if compressor.keeps_momentum:
        raise ValueError(f"{compressor.name} keeps a momentum between rounds: use compress_with_memory")
    payload, memory, stats = _compress(compressor, update, ClientMemory(dict(residual or {})), seed)
    return payload, memory.residual, stats


def load_memory(state: RecordDict) -> ClientMemory:
    """A client's :class:`ClientMemory` from its Flower ``context.state`` (empty the first time)."""

    def read(key: str) -> dict[str, np.ndarray]:
        if key not in state:
            return {}
        return record_to_numpy(state[key])  # type: ignore[arg-type]  # an ArrayRecord

    return ClientMemory(read(RESIDUAL_STATE_KEY), read(MOMENTUM_STATE_KEY))


def store_memory(state: RecordDict, memory: ClientMemory) -> None:
    """Keep ``memory`` in ``context.state``: the residual under :data:`RESIDUAL_STATE_KEY`, DGC's
    momentum under :data:`MOMENTUM_STATE_KEY`; an empty part is not stored."""
    for key, part in ((RESIDUAL_STATE_KEY, memory.residual), (MOMENTUM_STATE_KEY, memory.momentum)):
        if part:
            state[key] = record_from_numpy({k: np.ascontiguousarray(v) for k, v in part.items()})


def decode_update(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Any compressor's payload → (Δ of the floating tensors, values of the non-floating ones)."""
    if HEADER_KEY in arrays:
        name = codec.parse_header(arrays[HEADER_KEY], HEADER_KEY)[0].get("codec")
        if name == RANDK_CODEC:
            return _randk_seed_decode(arrays)
        if name == QSGD_CODEC:
            return _fedpaq_decode(arrays)
        if name == SBC_CODEC:
            return _sbc_decode(arrays)
        if name == SMARTIDX_CODEC:
            from fedsparse.smartidx import smartidx_decode

            return smartidx_decode(arrays)
        raise ValueError(
            f"unsupported payload codec {name!r}; expected {RANDK_CODEC!r}, {QSGD_CODEC!r}, {SBC_CODEC!r} "
            f"or {SMARTIDX_CODEC!r}"
        )
    tensors, _ = codec.decode(arrays)
    return _split_float(tensors)


def _register_smartidx() -> None:
    """SmartIdx lives in :mod:`fedsparse.smartidx`, which builds on this module's Compressor and
    payload helpers; importing it registers it in :data:`COMPRESSORS` (a no-op once done)."""
    import fedsparse.smartidx  # noqa: F401


def __getattr__(name: str) -> Any:
    """``fedsparse.compressors.SmartIdx``, loaded on first use (see :func:`_register_smartidx`)."""
    if name == "SmartIdx":
        from fedsparse.smartidx import SmartIdx

        return SmartIdx
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
