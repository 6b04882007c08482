"""The partial-update broadcast's message layout and patch semantics (deep partial updating).

Shared by :mod:`strategies.partial_update` (which builds patches and updates the deployed model
with :func:`apply_part`) and :mod:`clients.partial_update` (which applies them to its held copy with
:func:`patch_held_model`): one function on both sides is why client copies and the server's model
agree bit for bit.

``config``
    ``pu-base-version`` (int; −1: no base, the patch is the whole model),
    ``pu-target-version`` (int), ``pu-target-hash`` (str, :func:`model_digest` of the result),
    ``pu-from-seed`` (bool: rebuild version 0 from the run's seed first; ``pu-init-hash`` is its
    digest), ``pu-parts`` (list of ``"assign"`` / ``"add"``, one per codec payload, applied in
    order), ``pu-local-contribution`` (bool: send −Σ g ⊙ Δw up) with ``pu-local-metric`` (how:
    ``dense`` float32, ``8bit`` one codec payload quantised to 8 bits, ``top2k`` a codec payload of
    the client's ``pu-local-topk`` largest entries), ``pu-train-mask`` (which weights the client
    may change: ``none`` all; ``seed`` RPU's random per-tensor mask, rebuilt from ``pu-mask-seed``
    and ``pu-mask-ratio`` by :func:`random_layer_masks`; ``part`` the partial-set positions of
    patch part ``pu-mask-part``, DPU's sparse fine-tuning), ``pu-train-steps`` (local steps for a
    masked round; 0: the run's own), plus the base strategy's keys (``server-round``, FedProx's
    ``proximal-mu``).
``arrays``
    for part i, the :mod:`fedsparse.codec` payload as ``"{i}/index"`` and ``"{i}/values"``.
Reply
    the trained model (dense, as FedAvg's) in ``arrays``, plus the local contribution in the
    ArrayRecord :data:`CONTRIBUTION_KEY` when asked for. In a masked round (``pu-train-mask`` not
    ``none``) ``arrays`` holds, for each tensor of the partial set, only the values at the mask's
    positions (1-D float32, C order; :func:`masked_values`), and the other tensors whole: the
    server knows the mask, so no index travels up.

Semantics of a part (:func:`apply_part`): ``assign`` writes the decoded values at the decoded
positions (exact float32 values of the deployed model, so any number of rounds merge into one
part); ``add`` adds the decoded (fp16 / 8-bit dequantised) values at the decoded positions, while
tensors stored ``raw`` (biases and other small dense tensors, kept float32) are replaced.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedsparse import codec
from fedsparse.masks import topk_mask

__all__ = [
    "Arrays",
    "STATE_MODEL",
    "STATE_META",
    "CONTRIBUTION_KEY",
    "SEMANTICS",
    "PatchError",
    "model_digest",
    "partial_names",
    "apply_part",
    "pack_parts",
    "unpack_parts",
    "patch_held_model",
    "TRAIN_MASKS",
    "LOCAL_METRICS_SENT",
    "num_updated",
    "random_layer_masks",
    "training_masks",
    "masked_values",
    "encode_contribution",
    "decode_contribution",
]

STATE_MODEL = "partial-update-model"
STATE_META = "partial-update-meta"
CONTRIBUTION_KEY = "contribution"
SEMANTICS = ("assign", "add")
TRAIN_MASKS = ("none", "seed", "part")
LOCAL_METRICS_SENT = ("dense", "8bit", "top2k")

Arrays = dict[str, np.ndarray]


class PatchError(RuntimeError):
    """A patch that cannot be applied to the copy this client holds (version or digest mismatch)."""


# --------------------------------------------------------------------------- model identity


def model_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """A 64-bit digest (hex) of named arrays: names, dtypes, shapes and exact bytes, in name order.

    Server and clients compare digests to prove that a client's patched copy equals the deployed
    model bit for bit.
    """
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(arrays):
        arr = np.asarray(arrays[name], order="C")
        h.update(name.encode())
        h.update(arr.dtype.str.encode())
        h.update(repr(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def partial_names(arrays: Mapping[str, Any]) -> list[str]:
    """The partial set: floating-point tensors with ndim > 1 (conv / linear weights), in order.

    Biases, normalisation parameters and buffers (ndim ≤ 1) and non-float tensors are always sent
    dense.
    """
    out = []
    for name, value in arrays.items():
        if isinstance(value, torch.Tensor):
            is_float, ndim = value.is_floating_point(), value.ndim
        else:
            arr = np.asarray(value)
            is_float, ndim = arr.dtype.kind == "f", arr.ndim
        if is_float and ndim > 1:
            out.append(name)
    return out


# --------------------------------------------------------------------------- patches


def apply_part(held: Mapping[str, np.ndarray], payload: Mapping[str, np.ndarray], semantics: str) -> Arrays:
    """Apply one codec payload to ``held`` and return the new arrays (``held`` is not modified).

    ``assign``: decoded values overwrite the held ones at the decoded positions (whole tensors for
    ``dense`` / ``raw`` kinds). ``add``: decoded values are added (float32 + float32) at the decoded
    positions, except ``raw`` tensors, which are replaced. A tensor the payload does not name is
    unchanged. Names the held model lacks are accepted only with ``assign`` and a whole tensor
    (this is how a dense patch builds a model from nothing).
    """
    if semantics not in SEMANTICS:
        raise PatchError(f"unknown patch semantics {semantics!r}; expected one of: {', '.join(SEMANTICS)}")
    kinds = codec.index_kinds(payload)
    tensors, masks = codec.decode(payload)
    out = dict(held)
    for name, kind in kinds.items():
        dec = tensors[name]
        whole = kind in ("dense", "raw")
        if name not in held:
            if semantics == "assign" and whole:
                out[name] = dec.copy()
                continue
            raise PatchError(f"the patch changes tensor {name!r}, which the held model does not have")
        cur = np.asarray(held[name])
        if dec.shape != cur.shape or dec.dtype != cur.dtype:
            raise PatchError(
                f"the patch's tensor {name!r} is {dec.dtype}{list(dec.shape)}, the held one {cur.dtype}{list(cur.shape)}"
            )
        if kind == "raw" or (semantics == "assign" and whole):
            out[name] = dec.copy()
            continue
        mask = masks[name]
        new = cur.copy()
        if semantics == "assign":
            new[mask] = dec[mask]
        else:
            new[mask] = cur[mask] + dec[mask]
        out[name] = new
    return out


def pack_parts(parts: Iterable[Mapping[str, np.ndarray]]) -> ArrayRecord:
    """Codec payloads → one ArrayRecord with keys ``"{i}/index"`` and ``"{i}/values"``."""
    record = ArrayRecord()
    for i, payload in enumerate(parts):
        for key, arr in payload.items():
            record[f"{i}/{key}"] = Array(np.asarray(arr, order="C"))
    return record


def unpack_parts(record: ArrayRecord, count: int) -> list[dict[str, np.ndarray]]:
    """Inverse of :func:`pack_parts` for ``count`` parts."""
    parts = []
    for i in range(count):
        keys = {codec.INDEX_KEY, codec.VALUES_KEY}
        missing = [f"{i}/{k}" for k in keys if f"{i}/{k}" not in record]
        if missing:
            raise PatchError(f"the patch lacks arrays {sorted(missing)} (it has {sorted(record.keys())})")
        parts.append({k: record[f"{i}/{k}"].numpy() for k in keys})
    return parts


def patch_held_model(
    held: Mapping[str, np.ndarray] | None,
    held_version: int,
    config: Mapping[str, Any],
    record: ArrayRecord,
    initial_model_fn: Callable[[], Mapping[str, np.ndarray]] | None = None,
    *,
    who: str = "this client",
) -> tuple[Arrays, int]:
    """Bring the held copy to the server's target version; return (arrays, target version).

    Refuses (``PatchError``) a patch whose base version is not the held version, a seed rebuild that
    does not reproduce the server's initial model, and a result whose digest differs from the
    server's deployed model. ``initial_model_fn`` returns version 0 for ``pu-from-seed`` patches.
    """
    base = int(config["pu-base-version"])
    target = int(config["pu-target-version"])
    semantics = [str(s) for s in config.get("pu-parts", [])]
    if bool(config.get("pu-from-seed", False)):
        if initial_model_fn is None:
            raise PatchError(
                f"the server asks {who} to rebuild the initial model from the run's seed, but no "
                'initial_model_fn was given; run the strategy with initial-sync = "dense"'
            )
        start: Mapping[str, np.ndarray] = dict(initial_model_fn())
        want, got = str(config.get("pu-init-hash", "")), model_digest(start)
        if want and want != got:
            raise PatchError(
                f"the model {who} rebuilt from the seed (digest {got}) differs from the server's initial "
                f'model (digest {want}); run with initial-sync = "dense"'
            )
        if base != 0:
            raise PatchError(f"a seed rebuild gives version 0, but the patch starts from version {base}")
    elif base < 0:
        start = {}
    else:
        if held is None:
            raise PatchError(
                f"the server sends the change since version {base} of the deployed model, but {who} "
                "holds no copy (its state was lost?); the server must send the dense model"
            )
        if held_version != base:
            raise PatchError(
                f"{who} holds version {held_version} of the deployed model, but the server's patch "
                f"starts from version {base}; refusing to apply it (the server must send the change "
                f"since version {held_version}, or the dense model)"
            )
        start = held
    arrays: Arrays = dict(start)
    for sem, payload in zip(semantics, unpack_parts(record, len(semantics)), strict=True):
        arrays = apply_part(arrays, payload, sem)
    want = str(config.get("pu-target-hash", ""))
    if want:
        got = model_digest(arrays)
        if got != want:
            raise PatchError(
                f"after patching from version {base} to {target}, {who}'s copy (digest {got}) differs "
                f"from the server's deployed model (digest {want})"
            )
    return arrays, target


# --------------------------------------------------------------------------- masked rounds


def num_updated(ratio: float, total: int) -> int:
    """k·I rounded half up, at least 1 when k > 0 (and at most I)."""
    return min(total, max(1 if ratio > 0 else 0, int(math.floor(ratio * total + 0.5))))


def random_layer_masks(shapes: Mapping[str, tuple[int, ...]], ratio: float, seed: int) -> dict[str, np.ndarray]:
    """RPU's mask, chosen before training: in every tensor (in ``shapes``' order) a uniformly
    random :func:`num_updated` (ratio, n) of its n positions, from one torch generator seeded with
    ``seed``. Server and clients call this with the same arguments, so a seed in the round's
    config is the whole mask (8 bytes instead of an index)."""
    gen = torch.Generator().manual_seed(int(seed))
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        chosen = torch.randperm(n, generator=gen)[: num_updated(ratio, n)].numpy()
        flat = np.zeros(n, dtype=bool)
        flat[chosen] = True
        out[name] = flat.reshape(shape)
    return out


def training_masks(
    config: Mapping[str, Any], record: ArrayRecord, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray] | None:
    """The positions of the partial set (``shapes``) a client may change this round, or None
    (all). ``seed``: RPU's random mask; ``part``: the partial-set positions of patch part
    ``pu-mask-part`` (tensors that part does not name: none)."""
    kind = str(config.get("pu-train-mask", "none"))
    if kind not in TRAIN_MASKS:
        raise PatchError(f"unknown pu-train-mask {kind!r}; expected one of: {', '.join(TRAIN_MASKS)}")
    if kind == "none":
        return None
    if kind == "seed":
        return random_layer_masks(shapes, float(config["pu-mask-ratio"]), int(config["pu-mask-seed"]))
    part = int(config["pu-mask-part"])
    (payload,) = unpack_parts(record, part + 1)[part:]
    kinds = codec.index_kinds(payload)
    _, masks = codec.decode(payload)
    out = {}
    for name, shape in shapes.items():
        if name in masks and kinds[name] not in ("dense", "raw"):
            out[name] = masks[name].astype(bool)
        else:
            out[name] = np.zeros(shape, dtype=bool)
    return out


def masked_values(arrays: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray]) -> Arrays:
    """A masked round's reply: the values at the mask's positions (1-D, C order) for the masked
    tensors, the other tensors whole. The inverse is ``w[mask] = values`` on the server."""
    return {
        k: (np.ascontiguousarray(np.asarray(v)[masks[k]]) if k in masks else np.asarray(v)) for k, v in arrays.items()
    }


def encode_contribution(contrib: Mapping[str, np.ndarray], metric: str, topk: int = 0) -> ArrayRecord:
    """The client's local contribution as it travels up: ``dense`` float32 arrays by name;
    ``8bit`` one codec payload with 8-bit values; ``top2k`` one codec payload (float32) of the
    ``topk`` largest entries pooled over the partial set."""
    if metric == "dense":
        return ArrayRecord({n: Array(np.asarray(c, dtype=np.float32, order="C")) for n, c in contrib.items()})
    if metric == "8bit":
        return pack_parts([codec.encode({n: np.asarray(c, np.float32) for n, c in contrib.items()}, {}, 8)])
    if metric == "top2k":
        masks = topk_mask({n: torch.as_tensor(np.asarray(c, np.float32)) for n, c in contrib.items()}, int(topk))
        return pack_parts(
            [
                codec.encode(
                    {n: np.asarray(c, np.float32) for n, c in contrib.items()},
                    {n: m.numpy() for n, m in masks.items()},
                    32,
                )
            ]
        )
    raise PatchError(f"unknown local metric {metric!r}; expected one of: {', '.join(LOCAL_METRICS_SENT)}")


def decode_contribution(
    record: ArrayRecord, metric: str, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_contribution`: float64 arrays of ``shapes`` (zeros where a
    ``top2k`` payload kept nothing). Raises ValueError on a payload of the wrong layout."""
    if metric == "dense":
        arrays = {k: a.numpy() for k, a in record.items()}
    else:
        (payload,) = unpack_parts(record, 1)
        if set(record.keys()) != {f"0/{codec.INDEX_KEY}", f"0/{codec.VALUES_KEY}"}:
            raise ValueError(f"a {metric} contribution is one codec payload; found arrays {sorted(record.keys())}")
        arrays, _ = codec.decode(payload)
    if set(arrays) != set(shapes):
        raise ValueError(f"the contribution names {sorted(arrays)}, expected the partial set {sorted(shapes)}")
    out = {}
    for name, shape in shapes.items():
        arr = np.asarray(arrays[name])
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"contribution {name!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"contribution {name!r} is not finite")
        out[name] = arr.astype(np.float64)
    return out
