"""The reply layout both sides of fedavg-signs agree on: encode (client), decode (server).

A client's update Δ (trained weights minus the global model) travels as the *scaled sign* of each
trained tensor, C(Δ) = (‖Δ‖₁ / d) · sign(Δ) (Karimireddy et al., "Error Feedback Fixes SignSGD and
other Gradient Compression Schemes", ICML 2019, without their error feedback), in one ArrayRecord:

``"sign:bits"`` (uint8)
    ``np.packbits`` of ``Δ >= 0`` over every sign-coded tensor, flattened in C order and concatenated
    in the model's order: ⌈d/8⌉ bytes for d sign-coded weights (zeros count as +, the bit has no
    third state). Padding bits of the last byte are 0.
``"sign:scales"`` (float32, one per sign-coded tensor)
    ‖Δ‖₁ / d of each tensor, in the same order: every weight of the tensor moves by ± this much.
any other key: a model array sent as its raw value
    Buffers the client does not train (BatchNorm's running statistics and ``num_batches_tracked``):
    a sign cannot carry them, and a running variance moved by a scaled sign could turn negative.

So the reply costs ⌈d/8⌉ + 4·T bytes of data for T sign-coded tensors (plus Flower's ``.npy``
header per Array, which is why the signs share one Array) instead of 4·d for dense float32.

Which tensors are sign-coded is not written down: it is every array of the model that the reply
does not carry raw, in the model's order. The server knows the model (it sent it), so shapes need
no bytes either. The keys contain ``:``, which no PyTorch state-dict key can.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

SIGNS_KEY = "sign:bits"
SCALES_KEY = "sign:scales"

#: name -> (shape, dtype string) of the model's arrays, in the model's order (fedsparse.validation.spec_of).
Spec = Mapping[str, tuple[tuple[int, ...], str]]


def encode(update: Mapping[str, np.ndarray], raw: Iterable[str] = ()) -> ArrayRecord:
    """The reply's ArrayRecord: ``update`` holds Δ of every trained tensor and the value of every
    array named in ``raw``, in the model's order."""
    raw = set(raw)
    coded = [np.asarray(x).ravel() for n, x in update.items() if n not in raw]
    if any(x.dtype.kind != "f" for x in coded):
        raise ValueError("only floating-point tensors can be sign-coded; send the others raw")
    flat = np.concatenate(coded) if coded else np.zeros(0, np.float32)
    scales = np.array([float(np.abs(x, dtype=np.float64).mean()) if x.size else 0.0 for x in coded], np.float32)
    out = {SIGNS_KEY: Array(np.packbits(flat >= 0)), SCALES_KEY: Array(scales)}
    out.update(
        {n: Array(np.array(update[n], order="C")) for n in update if n in raw}
    )  # ascontiguousarray makes 0-d 1-d
    return ArrayRecord(out)


def payload_nbytes(spec: Spec, raw: Iterable[str] = ()) -> int:
    """Data bytes of a reply for a model ``spec`` (``.npy`` headers and keys not included)."""
    raw = set(raw)
    coded = [math.prod(shape) for n, (shape, _) in spec.items() if n not in raw]
    raw_bytes = sum(math.prod(shape) * np.dtype(dtype).itemsize for n, (shape, dtype) in spec.items() if n in raw)
    return math.ceil(sum(coded) / 8) + 4 * len(coded) + raw_bytes


@dataclass
class SignUpdate:
    """A decoded reply: per sign-coded tensor its ±1 signs (int8, the model's shape) and its scale,
    and the raw arrays as sent."""

    signs: dict[str, np.ndarray]
    scales: dict[str, float]
    raw: dict[str, np.ndarray]

    def tensors(self, spec: Spec) -> dict[str, np.ndarray]:
        """The update as the server applies it: scale · sign per tensor (the model's dtype), raw values as sent."""
        out = {n: (self.scales[n] * s).astype(spec[n][1]) for n, s in self.signs.items()}
        out.update(self.raw)
        return out


def decode(record: ArrayRecord, spec: Spec) -> SignUpdate:
    """Undo :func:`encode` for a model ``spec``; ValueError says what is wrong with the payload."""
    for key, dtype in ((SIGNS_KEY, np.uint8), (SCALES_KEY, np.float32)):
        if key not in record:
            raise ValueError(f"no {key!r} array")
        x = record[key].numpy()
        if x.dtype != dtype or x.ndim != 1:
            raise ValueError(f"{key!r} must be a 1-d {np.dtype(dtype)} array, not {x.dtype} of shape {x.shape}")
    raw = {k: record[k].numpy() for k in record if k not in (SIGNS_KEY, SCALES_KEY)}
    unknown = [k for k in raw if k not in spec]
    if unknown:
        raise ValueError(f"arrays the model does not have: {', '.join(unknown)}")
    coded = [n for n in spec if n not in raw]
    not_float = [n for n in coded if np.dtype(spec[n][1]).kind != "f"]
    if not_float:
        raise ValueError(f"{', '.join(not_float)} cannot be sign-coded (not floating point) and were not sent raw")
    sizes = [math.prod(spec[n][0]) for n in coded]
    packed, scales = record[SIGNS_KEY].numpy(), record[SCALES_KEY].numpy()
    total = sum(sizes)
    if packed.size != math.ceil(total / 8):
        raise ValueError(
            f"{packed.size} bytes of signs for {total} sign-coded weights; expected {math.ceil(total / 8)}"
        )
    if scales.size != len(coded):
        raise ValueError(f"{scales.size} scales for {len(coded)} sign-coded tensors")
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise ValueError("scales must be finite and >= 0 (each is a mean |Δ|)")
    bits = np.unpackbits(packed)
    if bits[total:].any():
        raise ValueError("padding bits after the last sign are set")
    signs = bits[:total].astype(np.int8) * 2 - 1
    offsets = np.cumsum([0, *sizes])
    return SignUpdate(
        signs={n: signs[offsets[i] : offsets[i + 1]].reshape(spec[n][0]) for i, n in enumerate(coded)},
        scales={n: float(scales[i]) for i, n in enumerate(coded)},
        raw=raw,
    )


__all__ = ["SCALES_KEY", "SIGNS_KEY", "SignUpdate", "decode", "encode", "payload_nbytes"]
