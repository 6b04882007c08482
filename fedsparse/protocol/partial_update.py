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
    order), ``pu-local-contribution`` (bool: send −Σ g ⊙ Δw up), plus the base strategy's keys
    (``server-round``, FedProx's ``proximal-mu``).
``arrays``
    for part i, the :mod:`fedsparse.codec` payload as ``"{i}/index"`` and ``"{i}/values"``.
Reply
    the trained model (dense, as FedAvg's) in ``arrays``, plus the local contribution in the
    ArrayRecord :data:`CONTRIBUTION_KEY` when asked for.

Semantics of a part (:func:`apply_part`): ``assign`` writes the decoded values at the decoded
positions (exact float32 values of the deployed model, so any number of rounds merge into one
part); ``add`` adds the decoded (fp16 / 8-bit dequantised) values at the decoded positions, while
tensors stored ``raw`` (biases and other small dense tensors, kept float32) are replaced.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedsparse import codec

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
]

STATE_MODEL = "partial-update-model"
STATE_META = "partial-update-meta"
CONTRIBUTION_KEY = "contribution"
SEMANTICS = ("assign", "add")

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
