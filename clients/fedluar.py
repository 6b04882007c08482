"""FedLUAR's client step: train every layer, reply without the layers the server recycles.

The round's config names the recycled arrays (``luar-recycled``, a list of state-dict keys; absent
when nothing is recycled). The client trains the whole model as usual — plain SGD with momentum and
weight decay, FedProx's proximal term when the config carries ``proximal-mu`` — and then leaves
those arrays out of its reply: they are not in the message at all, so they cost no uplink bytes.

SGD momentum across rounds follows the general ``client-momentum`` key (``persist-momentum = true``
is its older alias for ``client``): :mod:`clients.momentum`. The authors' reference keeps one
optimizer per worker *slot*, never reset — ``client-momentum = "slot"`` — not one per client.

The reusable pieces (:func:`omit_arrays`; :func:`momentum_record` and :func:`restore_momentum`, now
in :mod:`clients.momentum` and re-exported here) take plain torch objects, for use from any ClientApp.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message

from clients.local import LocalRound, reply, state_dict_cpu
from clients.momentum import MOMENTUM_STATE_KEY, keep_momentum, load_momentum, momentum_record, restore_momentum
from clients.train import optimizer_from_config, train_steps
from fedsparse.arrays import record_to_torch
from fedsparse.protocol.fedluar import RECYCLED_CONFIG_KEY, luar_round_lr

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


def fedluar_train(msg: Message, context: Context, cfg: Mapping[str, Any]) -> Message:
    local = LocalRound.from_message(msg, context, cfg)
    model = local.model(record_to_torch(msg.content["arrays"]))
    config = msg.content["config"]
    optimizer = optimizer_from_config(model, luar_round_lr(cfg, local.server_round), cfg)
    load_momentum(msg, context, cfg, model, optimizer)
    stats = train_steps(model, local.batches(), optimizer, proximal_mu=float(config.get("proximal-mu", 0.0)))
    momentum = keep_momentum(context, cfg, model, optimizer)
    recycled: list[str] = list(config.get(RECYCLED_CONFIG_KEY, []))  # type: ignore[arg-type]  # a list entry
    arrays = omit_arrays(state_dict_cpu(model), recycled)
    metrics = {"num-examples": local.num_examples, "train-loss": stats["train-loss"]}
    return reply(msg, arrays, metrics, momentum)
