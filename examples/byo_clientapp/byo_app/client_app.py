"""The user's ClientApp: their model and data, fedsparse's client-side pieces for the method.

What differs between the methods is a few lines in ``train``:

* FedAvg: load the global model, train, send the whole model back.
* FedDIP: :func:`clients.feddip.feddip_client_round` decodes the pruned global model (a
  :mod:`fedsparse.codec` payload), trains with dynamic pruning and error feedback at the round's
  λ, and encodes the sparse reply.
* FedLUAR: train as usual, then :func:`clients.fedluar.omit_arrays` leaves out the layers the
  server recycles this round (named in the config under ``luar-recycled``).
* partial-update broadcast: the downlink is a patch to the copy of the deployed model the client
  keeps in ``context.state``; :func:`clients.partial_update.patch_held_model` applies it (and
  checks the result against the server's digest), and the client reports the version it now holds.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from byo_app.task import Net, batches, load_partition, train
from clients.feddip import feddip_client_round
from clients.fedluar import omit_arrays
from clients.partial_update import load_held, patch_held_model, store_held
from strategies.fedluar import RECYCLED_CONFIG_KEY

app = ClientApp()


@app.train()
def train_step(msg: Message, context: Context) -> Message:
    run = context.run_config
    pid, parts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    images, labels = load_partition(pid, parts)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    data = batches(images, labels, int(run["batch-size"]), int(run["local-steps"]), seed=1000 * server_round + pid)
    model = Net()

    def make_optimizer(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=float(run["lr"]), momentum=0.9)

    extra = {}
    if run["strategy"] == "feddip":
        # the whole FedDIP client: decode the sparse global model, train with pruning, encode
        arrays, stats = feddip_client_round(msg.content["arrays"], config, model, data, make_optimizer)
        loss = stats["loss"]
    elif run["strategy"] == "partial-update":
        # patch the held copy of the deployed model to the server's version, keep it, train from it
        held, held_version = load_held(context)
        deployed, version = patch_held_model(held, held_version, config, msg.content["arrays"])
        store_held(context, deployed, version)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in deployed.items()})
        loss = train(model, data, make_optimizer(model))
        arrays = ArrayRecord(model.state_dict())
        extra = {"partition-id": pid, "pu-version": version}  # what the server needs to patch next time
    else:
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loss = train(model, data, make_optimizer(model))
        # FedLUAR: leave the recycled layers out of the reply (FedAvg: nothing is recycled)
        arrays = omit_arrays(model.state_dict(), list(config.get(RECYCLED_CONFIG_KEY, [])))

    metrics = MetricRecord({"num-examples": len(labels), "train-loss": loss, **extra})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
