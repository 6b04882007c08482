"""fedavg-signs, client side: train like FedAvg's client, send the scaled sign of the update.

fedsparse's ClientApp calls :func:`sign_train` for every train message of a run whose ``strategy``
is ``fedavg-signs`` (``Method.client_step`` names it); it is imported only where clients run. The
local round — data, seeded batches, the round's learning rate, the device — is fedsparse's own
:class:`clients.local.LocalRound`, so the only thing this method changes is what goes back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message

from clients.local import LocalRound, reply, state_dict_cpu
from clients.train import train_steps
from fedsparse.protocol import ARRAYS_KEY, NUM_EXAMPLES
from fedsparse_example_method import protocol


def sign_train(msg: Message, context: Context, cfg: Mapping[str, Any]) -> Message:
    """Train locally, then reply with the scaled sign of Δ = w_local − w_global per trained tensor
    (untrained buffers, e.g. BatchNorm's statistics, go raw: :mod:`.protocol`)."""
    local = LocalRound.from_message(msg, context, cfg)
    global_state = msg.content.array_records[ARRAYS_KEY].to_torch_state_dict()
    model = local.model(global_state)
    stats = train_steps(model, local.batches(), local.optimizer(model))
    trained = {name for name, _ in model.named_parameters()}
    update = {
        name: (value - global_state[name]).numpy() if name in trained else value.numpy()
        for name, value in state_dict_cpu(model).items()
    }
    payload = protocol.encode(update, raw=[name for name in update if name not in trained])
    return reply(msg, payload, {NUM_EXAMPLES: local.num_examples, "train-loss": stats["train-loss"]})
