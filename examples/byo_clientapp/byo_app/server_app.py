"""The user's ServerApp: their model and evaluation, a fedsparse strategy, Flower's own loop.

``Strategy.start`` is Flower's round loop; fedsparse's strategies are ordinary Flower strategies,
so picking one is the only change to a stock ServerApp. Wrapping the grid in
:class:`fedsparse.grid.MeteredGrid` is optional: it records the payload and exact wire size of
every train message (``messages.csv``).
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

from byo_app.task import Net, evaluate, load_test
from fedsparse.grid import MeteredGrid
from strategies.feddip import FedDIP
from strategies.fedluar import LUAR
from strategies.partial_update import PartialUpdate

app = ServerApp()


def make_strategy(run: dict, num_rounds: int) -> Strategy:
    """FedAvg, FedDIP, FedLUAR or partial-update broadcast, with the same client sampling."""
    sampling = {"fraction_train": float(run["fraction-train"]), "fraction_evaluate": 0.0}
    name = str(run["strategy"])
    if name == "fedavg":
        return FedAvg(**sampling)
    if name == "feddip":
        return FedDIP(
            total_rounds=num_rounds,
            target_sparsity=float(run["target-sparsity"]),
            lambda_max=float(run["lambda-max"]),
            seed=int(run["seed"]),
            **sampling,
        )
    if name == "fedluar":
        return LUAR(FedAvg(**sampling), int(run["recycled-layers"]), seed=int(run["seed"]))
    if name == "partial-update":
        # the first round sends the dense model (our clients cannot rebuild it from a seed)
        return PartialUpdate(
            FedAvg(**sampling),
            update_ratio=float(run["update-ratio"]),
            contribution="global",
            initial_sync="dense",
            seed=int(run["seed"]),
        )
    raise ValueError(f"unknown strategy {name!r}; choose one of: fedavg, feddip, fedluar, partial-update")


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = dict(context.run_config)
    num_rounds = int(run["num-server-rounds"])
    metered = MeteredGrid(grid)
    test_images, test_labels = load_test()
    model = Net()
    history: list[dict] = []

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, test_images, test_labels)
        history.append({"round": server_round, "loss": loss, "accuracy": acc})
        metered.current_round = server_round + 1  # label the next round's messages
        return MetricRecord({"loss": loss, "accuracy": acc})

    make_strategy(run, num_rounds).start(
        grid=metered,
        initial_arrays=ArrayRecord(Net().state_dict()),
        num_rounds=num_rounds,
        train_config=ConfigRecord(),
        evaluate_fn=central_evaluate,
    )

    if run.get("out-dir"):
        out = Path(str(run["out-dir"]))
        out.mkdir(parents=True, exist_ok=True)
        metered.ledger.messages_frame().to_csv(out / "messages.csv", index=False)
        (out / "result.json").write_text(json.dumps({"strategy": run["strategy"], "history": history}, indent=2))
