"""The uplink of one partial-update reply for each ``local-metric`` (issue 15, item 7), measured.

One real client (MNIST / MLP 2×512, partition 3 of 50 IID, one local epoch of SGD, lr 0.05 — the
settings of experiments/configs/partial-mnist-mlp.toml) trains round 1 through fedsparse's client
step; the reply's ArrayRecords are serialised and counted (``array_record_bytes``) exactly as the
round loop counts them. Prints, per k and metric, the model bytes, the extra (contribution) bytes
and the uplink ratio against the model alone (FedAvg's reply)::

    FEDSPARSE_DATA=... python -m experiments.measure_pu_uplink
"""

from __future__ import annotations

import random

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from experiments.run_suite_in_process import InProcessGrid
from fedsparse.accounting import array_record_bytes
from fedsparse.config import resolve_config
from fedsparse.server import initial_model
from strategies.partial_update import LOCAL_METRICS, PartialUpdate

CONFIG = "experiments/configs/partial-mnist-mlp.toml"


def main() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    for k in (0.005, 0.05):
        for metric in LOCAL_METRICS:
            cfg = resolve_config(CONFIG, {"local-metric": metric, "update-ratio": k, "num-clients": 50})
            grid = InProcessGrid(dict(cfg))
            grid.contexts = {103: grid.contexts[103]}  # one client: partition 3
            base = FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)
            strat = PartialUpdate(base, update_ratio=k, local_metric=metric)
            random.seed(0)
            init = ArrayRecord(initial_model(cfg).state_dict())
            msgs = list(strat.configure_train(1, init, ConfigRecord({"server-round": 1}), grid))
            (reply,) = grid.send_and_receive(msgs)
            model = sum(array_record_bytes(reply.content["arrays"]).values())
            extra = sum(
                sum(array_record_bytes(rec).values())
                for name, rec in reply.content.array_records.items()
                if name != "arrays"
            )
            print(
                f"| {k} | {metric} | {model} | {extra} | {(model + extra) / model:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
