"""The standard client step: load the global model, train locally, send the whole model back.

This is FedAvg's client; FedProx adds the proximal term when the server's config carries
``proximal-mu`` (Flower's FedProx puts it there every round). SGD momentum follows
``client-momentum`` (:mod:`clients.momentum`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message

from clients.local import LocalRound, reply, state_dict_cpu
from clients.momentum import keep_momentum, load_momentum
from clients.train import train_steps
from fedsparse.arrays import record_from_torch, record_to_torch


def standard_train(msg: Message, context: Context, cfg: Mapping[str, Any]) -> Message:
    local = LocalRound.from_message(msg, context, cfg)
    model = local.model(record_to_torch(msg.content["arrays"]))
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    optimizer = local.optimizer(model)
    load_momentum(msg, context, cfg, model, optimizer)
    stats = train_steps(model, local.batches(), optimizer, proximal_mu=mu)
    momentum = keep_momentum(context, cfg, model, optimizer)
    metrics = {"num-examples": local.num_examples, "train-loss": stats["train-loss"]}
    return reply(msg, record_from_torch(state_dict_cpu(model)), metrics, momentum)
