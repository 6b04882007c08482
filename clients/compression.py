"""Client side of the uplink-compression baselines (Top-k + error feedback, Rand-k, FedPAQ) and SNIP.

Every baseline trains like FedAvg's client and then compresses its **update** Δ = w_local − w_global
(floating-point tensors; non-floating tensors such as BN's ``num_batches_tracked`` travel raw, as the
client's value). What the reply carries is the compressed payload — nothing else — so the bytes the
grid meters are the compressed bytes.

Payload formats (two Flower arrays each; every Array costs an npy header and wire framing):

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

The round's config carries every compressor setting (``compress-method``, ``compress-ratio``, ...), so
:func:`compress_update` / :func:`decode_update` work from any ClientApp / ServerApp; state that must
survive rounds (the error-feedback residual) lives in the client's ``context.state``.

SNIP's client (Lee et al. 2019) answers two kinds of train message: ``snip-phase = "saliency"``
(compute |∂L/∂w ⊙ w| at the initial weights on a few local batches and send it) and ``"train"``
(decode the pruned model from the codec payload, train with the pruned weights frozen at zero,
send the kept values back through the codec).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from torch import nn

from clients.local import LocalRound, derive_seed, reply, state_dict_cpu
from clients.registry import register_train_step
from clients.train import optimizer_from_config, train_steps
from fedsparse import codec
from fedsparse.masks import topk_mask

__all__ = [
    "METHODS",
    "RESIDUAL_STATE_KEY",
    "compress_update",
    "decode_update",
    "topk_masks",
    "randk_positions",
    "qsgd_quantize",
    "qsgd_dequantize",
    "pack_codes",
    "unpack_codes",
    "snip_saliency",
    "masked_training",
]

METHODS = ("topk", "randk", "fedpaq")
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
CFG_SNIP_PHASE = "snip-phase"
CFG_SNIP_PRUNABLE = "snip-prunable"
CFG_SNIP_BATCHES = "snip-batches"
#: FedLUAR's config entry naming the arrays the server recycles (clients leave them out).
LUAR_RECYCLED = "luar-recycled"

#: Where a client keeps its error-feedback residual between rounds (``context.state``).
RESIDUAL_STATE_KEY = "compression.residual"

RANDK_CODEC = "fedsparse-randk"
QSGD_CODEC = "fedsparse-qsgd"
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
    for name, shape, dtype, n in zip(header["raw_names"], header["raw_shapes"], header["raw_dtypes"], header["raw_len"]):
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


def _randk_select(
    floats: Mapping[str, np.ndarray], ratio: float, seed: int
) -> tuple[dict[str, np.ndarray], list[int]]:
    masks, ks = {}, []
    for i, (name, x) in enumerate(floats.items()):
        k = kept_count(ratio, x.size)
        flat = np.zeros(x.size, dtype=bool)
        flat[randk_positions(seed, i, x.size, k)] = True
        masks[name] = flat.reshape(x.shape)
        ks.append(k)
    return masks, ks


def _randk_seed_encode(
    floats: Mapping[str, np.ndarray], raws: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], ks: list[int], seed: int
) -> dict[str, np.ndarray]:
    raw_meta, tail = _raw_tail(raws)
    header = {
        "codec": RANDK_CODEC, "version": FORMAT_VERSION, "seed": int(seed),
        "names": list(floats), "shapes": [list(x.shape) for x in floats.values()],
        "dtypes": [x.dtype.str for x in floats.values()], "k": ks, **raw_meta,
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
        raise ValueError(
            f"truncated payload: {data.size} bytes of codes, the header says {count} codes of {bits} bits"
        )
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
        "codec": QSGD_CODEC, "version": FORMAT_VERSION, "levels": int(levels), "bits": bits, "bucket": int(bucket),
        "scope": scope, "names": list(floats), "shapes": [list(x.shape) for x in floats.values()],
        "dtypes": [x.dtype.str for x in floats.values()], "nnorms": nnorms, **raw_meta,
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
# one entry point each way
# --------------------------------------------------------------------------------------------


def compress_update(
    update: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    *,
    residual: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, float]]:
    """Compress a client's update with the method named in the round's config.

    ``update``: Δ for floating tensors; non-floating tensors (the client's values) are sent raw.
    ``residual``: the error-feedback memory e of the floating tensors (missing entries = 0).
    Returns ``(payload arrays, new residual, stats)``. With error feedback the compressor sees
    a = Δ + e and the new residual is a − C(a) (Stich et al. 2018); without it the residual is
    returned unchanged. ``seed`` drives Rand-k's mask and FedPAQ's rounding.
    """
    method = str(config[CFG_METHOD])
    floats, raws = _split_float(update)
    ef = bool(config.get(CFG_EF, False))
    residual = dict(residual or {})
    if ef:
        acc = {k: (x + residual[k]) if k in residual else x.copy() for k, x in floats.items()}
    else:
        acc = dict(floats)
    ratio = float(config.get(CFG_RATIO, 1.0))
    stats: dict[str, float] = {}
    if method == "topk":
        masks = topk_masks(acc, ratio, str(config.get(CFG_SCOPE, "model")))
        payload = codec.encode({**acc, **raws}, masks)
        sent = {k: np.where(masks[k], x, np.zeros((), x.dtype)) for k, x in acc.items()}
    elif method == "randk":
        masks, ks = _randk_select(acc, ratio, seed)
        scale = str(config.get(CFG_RANDK_SCALE, "unbiased"))
        values = {
            k: (x * (x.size / max(kk, 1)) if scale == "unbiased" else x).astype(x.dtype, copy=False)
            for (k, x), kk in zip(acc.items(), ks)
        }
        if str(config.get(CFG_RANDK_INDEX, "seed")) == "seed":
            payload = _randk_seed_encode(values, raws, masks, ks, seed)
        else:
            payload = codec.encode({**values, **raws}, masks)
        sent = {k: np.where(masks[k], x, np.zeros((), x.dtype)) for k, x in values.items()}
    elif method == "fedpaq":
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xFEDA]))
        payload = _fedpaq_encode(
            acc, raws, int(config[CFG_LEVELS]), int(config.get(CFG_BUCKET, 0)), rng, str(config.get(CFG_QSCOPE, "tensor"))
        )
        # what was sent, decoded, is needed only for the error-feedback residual
        sent = _fedpaq_decode(payload)[0] if ef else {}
    else:
        raise ValueError(f"unknown compress-method {method!r}; choose one of: {', '.join(METHODS)}")
    if ef:
        residual = {k: (acc[k] - sent[k]).astype(acc[k].dtype) for k in acc}
    total = sum(x.size for x in acc.values())
    stats["kept-fraction"] = (sum(int(np.count_nonzero(m)) for m in masks.values()) / total) if method != "fedpaq" and total else 1.0
    return payload, residual, stats


def decode_update(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Any baseline's payload → (Δ of the floating tensors, values of the non-floating ones)."""
    if HEADER_KEY in arrays:
        name = codec.parse_header(arrays[HEADER_KEY], HEADER_KEY)[0].get("codec")
        if name == RANDK_CODEC:
            return _randk_seed_decode(arrays)
        if name == QSGD_CODEC:
            return _fedpaq_decode(arrays)
        raise ValueError(f"unsupported payload codec {name!r}; expected {RANDK_CODEC!r} or {QSGD_CODEC!r}")
    tensors, _ = codec.decode(arrays)
    return _split_float(tensors)


def _residual_from_state(context: Context) -> dict[str, np.ndarray]:
    if RESIDUAL_STATE_KEY not in context.state:
        return {}
    record = context.state[RESIDUAL_STATE_KEY]
    return {k: a.numpy() for k, a in record.items()}  # type: ignore[union-attr]


def _client_lr(cfg: Mapping[str, Any], server_round: int, local: LocalRound) -> float:
    """FedLUAR's milestone schedule for the LUAR combinations, the core schedule otherwise."""
    if str(cfg["strategy"]).startswith("fedluar"):
        from strategies.fedluar import luar_round_lr

        return luar_round_lr(cfg, server_round)
    return local.lr


@register_train_step("topk", "randk", "fedpaq", "fedluar-paq")
def compressed_train(msg: Message, context: Context, cfg: Mapping[str, Any]) -> Message:
    """Train like FedAvg's client, then send the compressed update (see the module docstring)."""
    local = LocalRound.from_message(msg, context, cfg)
    config = msg.content["config"]
    global_state = msg.content["arrays"].to_torch_state_dict()
    model = local.model(global_state)
    optimizer = optimizer_from_config(model, _client_lr(cfg, local.server_round, local), cfg)
    stats = train_steps(model, local.batches(), optimizer, proximal_mu=float(config.get("proximal-mu", 0.0)))
    trained = state_dict_cpu(model)
    omit = set(config.get(LUAR_RECYCLED, []))  # type: ignore[arg-type]
    update: dict[str, np.ndarray] = {}
    for name, value in trained.items():
        if name in omit:
            continue
        now = value.numpy()
        update[name] = now - global_state[name].numpy() if now.dtype.kind == "f" else now
    residual = _residual_from_state(context)
    seed = derive_seed("compression", cfg["seed"], local.server_round, local.partition_id) & ((1 << 62) - 1)
    payload, residual, cstats = compress_update(update, config, residual=residual, seed=seed)
    if bool(config.get(CFG_EF, False)):
        context.state[RESIDUAL_STATE_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in residual.items()})
    metrics = {"num-examples": local.num_examples, "train-loss": stats["train-loss"], **cstats}
    return reply(msg, codec.to_array_record(payload), metrics)


# --------------------------------------------------------------------------------------------
# SNIP
# --------------------------------------------------------------------------------------------


def snip_saliency(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """SNIP's connection sensitivity |∂L/∂w ⊙ w| of the named parameters (Lee et al. 2019, eq. 6),
    gradients summed over ``batches``, normalised to sum to 1 over all named tensors."""
    params = dict(model.named_parameters())
    names = list(names)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"SNIP: the model has no parameters named {', '.join(unknown)}")
    model.train()
    model.zero_grad(set_to_none=True)
    seen = 0
    for x, y in batches:
        nn.functional.cross_entropy(model(x), y).backward()
        seen += 1
    if seen == 0:
        raise ValueError("SNIP: no batches to compute the saliency on")
    sal = {n: (params[n].grad.detach() * params[n].detach()).abs().cpu() for n in names}  # type: ignore[union-attr]
    model.zero_grad(set_to_none=True)
    total = float(sum(float(s.sum()) for s in sal.values()))
    return {n: (s / total if total > 0 else s) for n, s in sal.items()}


class masked_training:  # noqa: N801 - used as a context manager, reads like a function
    """Within the block, gradients of pruned positions are zeroed (hooks removed on exit), so SGD —
    momentum, weight decay and a proximal term included — keeps pruned weights at exactly zero."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        self.handles = []
        for name, mask in masks.items():
            keep = mask.to(device=params[name].device, dtype=params[name].dtype)
            with torch.no_grad():
                params[name].mul_(keep)
            self.handles.append(params[name].register_hook(lambda g, keep=keep: g * keep))

    def __enter__(self) -> "masked_training":
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


@register_train_step("snip")
def snip_train(msg: Message, context: Context, cfg: Mapping[str, Any]) -> Message:
    """SNIP's client: the saliency round at the initial weights, then masked local training."""
    local = LocalRound.from_message(msg, context, cfg)
    config: ConfigRecord = msg.content["config"]  # type: ignore[assignment]
    prunable = [str(n) for n in config[CFG_SNIP_PRUNABLE]]  # type: ignore[union-attr]
    if str(config.get(CFG_SNIP_PHASE, "train")) == "saliency":
        model = local.model(msg.content["arrays"].to_torch_state_dict())
        batches = itertools.islice(local.batches(), max(1, int(config.get(CFG_SNIP_BATCHES, 1))))  # type: ignore[arg-type]
        sal = snip_saliency(model, batches, prunable)
        return reply(msg, ArrayRecord({n: Array(s.numpy()) for n, s in sal.items()}), {"num-examples": local.num_examples})
    tensors, masks = codec.decode(codec.from_array_record(msg.content["arrays"]))  # type: ignore[arg-type]
    state = {n: torch.from_numpy(np.array(x, copy=True)) for n, x in tensors.items()}
    model = local.model(state)
    keep = {n: torch.from_numpy(np.asarray(masks[n], dtype=bool)) for n in prunable}
    with masked_training(model, keep):
        stats = train_steps(model, local.batches(), local.optimizer(model), proximal_mu=float(config.get("proximal-mu", 0.0)))
    trained = {k: v.numpy() for k, v in state_dict_cpu(model).items()}
    payload = codec.encode(trained, {n: keep[n].numpy() for n in prunable})
    return reply(msg, codec.to_array_record(payload), {"num-examples": local.num_examples, "train-loss": stats["train-loss"]})


# --------------------------------------------------------------------------------------------
# combination: FedDIP with a LUAR-recycled uplink
# --------------------------------------------------------------------------------------------


@register_train_step("feddip-luar")
def feddip_luar_train(msg: Message, context: Context, cfg: Mapping[str, Any]) -> Message:
    """FedDIP's client round (:func:`clients.feddip.feddip_client_round`, step by step with its own
    public pieces), except that the tensors named in ``luar-recycled`` are left out of the reply."""
    from clients.feddip import CONFIG_LAMBDA, CONFIG_PRUNABLE, CONFIG_PROXIMAL_MU, CONFIG_SPARSE_UPLINK, decode_global, encode_update
    from clients.feddip_step import feddip_train

    local = LocalRound.from_message(msg, context, cfg)
    config = msg.content["config"]
    prunable = [str(n) for n in config[CONFIG_PRUNABLE]]  # type: ignore[union-attr]
    state, masks = decode_global(msg.content["arrays"], prunable)  # type: ignore[arg-type]
    model = local.model(state)
    mu = float(config.get(CONFIG_PROXIMAL_MU, 0.0))  # type: ignore[union-attr]
    stats = feddip_train(
        model, masks, local.batches(), local.optimizer(model), lambda_t=float(config[CONFIG_LAMBDA]),  # type: ignore[index]
        proximal_mu=mu, global_params=state if mu > 0 else None, device=local.device,
    )
    omit = set(config.get(LUAR_RECYCLED, []))  # type: ignore[union-attr]
    unknown = sorted(omit - set(state))
    if unknown:
        raise ValueError(f"the server recycles arrays this model does not have: {', '.join(unknown)}")
    trained = {k: v for k, v in state_dict_cpu(model).items() if k not in omit}
    sparse_up = bool(config.get(CONFIG_SPARSE_UPLINK, True))  # type: ignore[union-attr]
    update = encode_update(trained, {n: m for n, m in masks.items() if n not in omit} if sparse_up else None)
    metrics = {"num-examples": local.num_examples, "train-loss": stats["loss"], "ce-loss": stats["ce-loss"]}
    return reply(msg, update, metrics)
