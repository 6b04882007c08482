"""SGD momentum across rounds on the client side: ``client-momentum = fresh | client | slot``.

* ``fresh`` — a new optimizer every round (nothing to do here);
* ``client`` — each client keeps its own momentum buffers between the rounds it takes part in, as
  an ArrayRecord in its Flower ``context.state`` (never in module globals: the state follows the
  client, not the worker process that happens to run it; the loop's checkpoints mirror it);
* ``slot`` — the server sends the buffers of the client's slot with the train message (the
  :data:`fedsparse.protocol.MOMENTUM_RECORD` ArrayRecord, absent until the slot has one) and the
  client sends its buffers back in its reply (:class:`fedsparse.wrappers.SlotMomentum` keeps them).

A client step that supports the modes calls :func:`load_momentum` after building its optimizer and
:func:`keep_momentum` after training, and passes what the latter returns to
:func:`clients.local.reply`; its :class:`fedsparse.methods.Method` declares ``client_momentum=True``.
:func:`momentum_record` / :func:`restore_momentum` take plain torch objects, for any ClientApp.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message
from torch import nn

from fedsparse.config import client_momentum
from fedsparse.protocol import MOMENTUM_RECORD

#: Where a client keeps its momentum buffers between rounds (``context.state``) under ``client``.
MOMENTUM_STATE_KEY = "fedluar.momentum"  # the name persist-momentum has always used (resumable runs)


def momentum_record(model: nn.Module, optimizer: torch.optim.Optimizer) -> ArrayRecord:
    """The optimizer's momentum buffers keyed by parameter name (CPU copies)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None and id(p) in by_id:
                out[by_id[id(p)]] = buf.detach().cpu().clone()
    return ArrayRecord({name: out[name] for name in by_id.values() if name in out})


def restore_momentum(model: nn.Module, optimizer: torch.optim.Optimizer, record: ArrayRecord) -> int:
    """Load saved momentum buffers into ``optimizer`` (SGD continues from them); returns how many."""
    params = dict(model.named_parameters())
    saved = record.to_torch_state_dict()
    unknown = sorted(set(saved) - set(params))
    if unknown:
        raise ValueError(f"saved momentum for parameters the model does not have: {', '.join(unknown)}")
    for name, buf in saved.items():
        p = params[name]
        if tuple(buf.shape) != tuple(p.shape):
            raise ValueError(f"saved momentum for {name!r} has shape {tuple(buf.shape)}, parameter {tuple(p.shape)}")
        optimizer.state[p]["momentum_buffer"] = buf.to(device=p.device, dtype=p.dtype).clone()
    return len(saved)


def load_momentum(
    msg: Message, context: Context, cfg: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> int:
    """Start ``optimizer`` from the buffers the mode gives this client (its own, or its slot's);
    returns how many buffers were loaded (0: it starts with zero velocity)."""
    mode = client_momentum(cfg)
    if mode == "client" and MOMENTUM_STATE_KEY in context.state:
        return restore_momentum(model, optimizer, context.state[MOMENTUM_STATE_KEY])  # type: ignore[arg-type]  # keep_momentum() stores an ArrayRecord
    if mode == "slot" and MOMENTUM_RECORD in msg.content.array_records:
        return restore_momentum(model, optimizer, msg.content.array_records[MOMENTUM_RECORD])
    return 0


def keep_momentum(
    context: Context, cfg: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> ArrayRecord | None:
    """After training: ``client`` stores the buffers in ``context.state``; ``slot`` returns them for
    the reply (the server keeps them for the slot, the client keeps nothing); ``fresh`` returns None."""
    mode = client_momentum(cfg)
    if mode == "client":
        context.state[MOMENTUM_STATE_KEY] = momentum_record(model, optimizer)
        return None
    if mode == "slot":
        return momentum_record(model, optimizer)
    return None


__all__ = [
    "MOMENTUM_STATE_KEY",
    "momentum_record",
    "restore_momentum",
    "load_momentum",
    "keep_momentum",
]
