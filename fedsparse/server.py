"""The ServerApp side of a run: the round loop, central evaluation, accounting and results.

The loop is Flower's ``Strategy.start`` protocol (configure_train → send_and_receive →
aggregate_train, then a central evaluation), written out so that it can meter bytes, sample
clients reproducibly, show progress and write the rounds table after every round. Any
``flwr.serverapp.strategy.Strategy`` runs in it unchanged; our strategies also run in
``Strategy.start`` in someone else's deployment.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from clients.train import evaluate
from fedsparse.accounting import Ledger, dense_model_bytes
from fedsparse.clientdata import dataset_for
from fedsparse.config import round_lr
from fedsparse.grid import MeteredGrid, seeded_sampling
from fedsparse.models import build_model
from fedsparse.progress import Progress
from fedsparse.results import RoundsTable, write_outputs
from strategies.registry import build_strategy

log = logging.getLogger("fedsparse")


def initial_model(cfg: Mapping[str, Any]) -> torch.nn.Module:
    """The global model at round 0, initialised from the run's seed."""
    data = dataset_for(cfg)
    torch.manual_seed(int(cfg["seed"]))
    return build_model(str(cfg["model"]), data.num_classes, data.in_channels, data.image_size)


class CentralEvaluator:
    """Evaluates global arrays on the central test set (in the server process)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = cfg
        self.data = dataset_for(cfg)
        self.model = initial_model(cfg)

    def __call__(self, arrays: ArrayRecord) -> tuple[float, float]:
        self.model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        return evaluate(
            self.model,
            self.data.test_images,
            self.data.test_labels,
            self.data.normalize,
            batch_size=int(self.cfg["eval-batch-size"]),
        )


@dataclass
class RunResult:
    rounds: pd.DataFrame
    summary: dict[str, Any]
    arrays: ArrayRecord
    out_dir: Path | None


def _round_report(strategy: Strategy, server_round: int) -> dict[str, Any]:
    """Method-specific columns (sparsity, λ_t, recycled layers, k, ...) if the strategy has any."""
    report = getattr(strategy, "round_report", None)
    return dict(report(server_round)) if callable(report) else {}


def _replies_summary(replies: list[Message]) -> tuple[int, int, float]:
    ok = [m for m in replies if not m.has_error()]
    losses = [
        float(m.content["metrics"]["train-loss"])
        for m in ok
        if "metrics" in m.content and "train-loss" in m.content["metrics"]
    ]
    return len(ok), len(replies) - len(ok), (sum(losses) / len(losses) if losses else math.nan)


def run_server(grid: Grid, cfg: Mapping[str, Any], out_dir: Path | None, *, show_progress: bool = True) -> RunResult:
    """Run every round of ``cfg`` on ``grid`` and write the results to ``out_dir``."""
    started = time.perf_counter()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    metered = MeteredGrid(grid, Ledger(), measure_wire=bool(cfg["wire-bytes"]))
    metered.discover_partitions(expected=int(cfg["num-clients"]))

    arrays = ArrayRecord(initial_model(cfg).state_dict())
    dense = dense_model_bytes(arrays)
    strategy = build_strategy(cfg)
    evaluator = CentralEvaluator(cfg)
    table = RoundsTable(out_dir)
    rounds, eval_every = int(cfg["rounds"]), int(cfg["eval-every"])
    progress = Progress(rounds, enabled=show_progress, label=str(cfg["strategy"]))
    run_id = f"{cfg['strategy']}-{cfg['dataset']}-{cfg['model']}-{cfg['partition']}-s{cfg['seed']}"

    for server_round in range(1, rounds + 1):
        t0 = time.perf_counter()
        metered.current_round = server_round
        # A fresh config each round: Flower's strategies write into it.
        train_config = ConfigRecord({"server-round": server_round})
        with seeded_sampling(int(cfg["seed"]), server_round):
            messages = list(strategy.configure_train(server_round, arrays, train_config, metered))
        replies = metered.in_partition_order(metered.send_and_receive(messages, timeout=float(cfg["round-timeout"])))
        new_arrays, _metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        ok, errors, train_loss = _replies_summary(replies)

        acc = loss = math.nan
        if server_round % eval_every == 0 or server_round == rounds:
            loss, acc = evaluator(arrays)
        totals = metered.ledger.round_totals(server_round)
        row = {
            "run_id": run_id,
            "strategy": cfg["strategy"],
            "seed": cfg["seed"],
            "round": server_round,
            "clients": len(messages),
            "replies": ok,
            "failures": errors + (len(messages) - len(replies)),
            "test_accuracy": acc,
            "test_loss": loss,
            "train_loss": train_loss,
            "lr": round_lr(cfg, server_round),
            **totals,
            "dense_bytes_down": dense * len(messages),
            "dense_bytes_up": dense * ok,
            "round_seconds": time.perf_counter() - t0,
            "elapsed_seconds": time.perf_counter() - started,
            **_round_report(strategy, server_round),
        }
        table.add(row)
        progress.update(table.rows[-1])
    progress.close()

    df = table.frame()
    summary: dict[str, Any] = {}
    if out_dir is not None:
        metered.ledger.messages_frame().to_csv(out_dir / "messages.csv", index=False)
        metered.ledger.layers_frame().to_csv(out_dir / "layer_bytes.csv", index=False)
        final = getattr(strategy, "final_report", None)
        extra = final(out_dir) if callable(final) else None
        summary = write_outputs(out_dir, cfg, df, extra)
    return RunResult(df, summary, arrays, out_dir)


def make_server_app(
    run_config: Mapping[str, Any] | None = None,
    out_dir: Path | None = None,
    sink: list[RunResult] | None = None,
    *,
    show_progress: bool = True,
) -> ServerApp:
    """A ServerApp bound to a resolved config (None: resolve ``context.run_config``).

    ``sink`` receives the :class:`RunResult` (the simulation engine runs the ServerApp in a
    thread of the calling process, so ``fedsparse.simulate`` collects it there).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedsparse.config import resolve_config

        cfg = run_config if run_config is not None else resolve_config(dict(context.run_config))
        target = out_dir
        if target is None:
            target = Path(str(cfg.get("out-dir", "")) or default_out_dir(cfg))
        result = run_server(grid, cfg, target, show_progress=show_progress)
        if sink is not None:
            sink.append(result)

    return app


def default_out_dir(cfg: Mapping[str, Any]) -> Path:
    """runs/<strategy>-<dataset>-<timestamp> under the working directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg['strategy']}-{cfg['dataset']}-{cfg['model']}-{stamp}"


server_app = make_server_app()

__all__ = ["run_server", "make_server_app", "server_app", "RunResult"]
