"""FedLUAR's client step: train every layer, reply without the layers the server recycles.

The round's config names the recycled arrays (``luar-recycled``, a list of state-dict keys; absent
when nothing is recycled). The client trains the whole model as usual — plain SGD with momentum and
weight decay, FedProx's proximal term when the config carries ``proximal-mu`` — and then leaves
those arrays out of its reply: they are not in the message at all, so they cost no uplink bytes.

With ``persist-momentum = true`` each client keeps its optimizer's momentum buffers across the
rounds it takes part in (the authors' reference code keeps its optimizer), stored as an ArrayRecord
in the client's Flower ``context.state`` — never in module globals, so it follows the client, not
the worker process that happens to run it.

The reusable pieces (:func:`omit_arrays`, :func:`momentum_record`, :func:`restore_momentum`) take
plain torch objects, for use from any ClientApp.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message
from torch import nn

from clients.local import LocalRound, reply, state_dict_cpu
from clients.train import optimizer_from_config, train_steps
from fedsparse.arrays import record_to_torch
from fedsparse.protocol.fedluar import RECYCLED_CONFIG_KEY, luar_round_lr

#: Where a client keeps its momentum buffers between rounds (``context.state``).
MOMENTUM_STATE_KEY = "fedluar.momentum"

__all__ = ["fedluar_train", "omit_arrays", "momentum_record", "restore_momentum", "MOMENTUM_STATE_KEY"]


def omit_arrays(state: Mapping[str, torch.Tensor], recycled: Iterable[str]) -> ArrayRecord:
    """The reply's ArrayRecord: ``state`` without the recycled arrays (model order kept).

    A name the model does not have means client and server disagree on the model: ValueError.
    """
    omit = set(recycled)
    unknown = sorted(omit - set(state))
    if unknown:
        raise ValueError(f"the server recycles arrays this model does not have: {', '.join(unknown)}")
    return ArrayRecord({k: v for k, v in state.items() if k not in omit})


def momentum_record(model: nn.Module, optimizer: torch.optim.Optimizer) -> ArrayRecord:
    """The optimizer's momentum buffers keyed by parameter name (CPU copies)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None and id(p) in by_id:
                out[by_id[id(p)]] = buf.detach().cpu().clone()
    return ArrayRecord(out)


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


def fedluar_train(msg: Message, context: Context, cfg: Mapping[str, Any]) -> Message:
    local = LocalRound.from_message(msg, context, cfg)
    model = local.model(record_to_torch(msg.content["arrays"]))
    config = msg.content["config"]
    optimizer = optimizer_from_config(model, luar_round_lr(cfg, local.server_round), cfg)
    persist = bool(cfg["persist-momentum"])
    if persist and MOMENTUM_STATE_KEY in context.state:
        restore_momentum(model, optimizer, context.state[MOMENTUM_STATE_KEY])  # type: ignore[arg-type]  # momentum_record() stores an ArrayRecord
    stats = train_steps(model, local.batches(), optimizer, proximal_mu=float(config.get("proximal-mu", 0.0)))
    if persist:
        context.state[MOMENTUM_STATE_KEY] = momentum_record(model, optimizer)
    recycled: list[str] = list(config.get(RECYCLED_CONFIG_KEY, []))  # type: ignore[arg-type]  # a list entry
    arrays = omit_arrays(state_dict_cpu(model), recycled)
    metrics = {"num-examples": local.num_examples, "train-loss": stats["train-loss"]}
    return reply(msg, arrays, metrics)
