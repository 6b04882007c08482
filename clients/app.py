"""fedsparse's ClientApp (Flower Message API).

``app`` reads its settings from the run config (``flwr run .`` fills it from
``[tool.flwr.app.config]`` and ``--run-config``); :func:`make_client_app` binds a resolved config
instead, which is how ``fedsparse run`` / ``fedsparse.simulate`` launch the simulation engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsparse.checkpoint import restore_client_state, save_client_state
from fedsparse.failures import attack, failure_for, inject, poison, received_model
from fedsparse.grid import PARTITION_QUERY
from fedsparse.methods import train_step


def _threads(cfg: Mapping[str, Any]) -> None:
    """One actor per `client-cpus` cores: give torch exactly that many threads."""
    torch.set_num_threads(max(1, int(float(cfg["client-cpus"]))))


def make_client_app(run_config: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp bound to ``run_config`` (None: use ``context.run_config``, resolved)."""
    app = ClientApp()
    resolved: dict[str, Any] = {}

    def config_of(context: Context) -> Mapping[str, Any]:
        if run_config is not None:
            return run_config
        if not resolved:
            from fedsparse.config import resolve_config

            resolved.update(resolve_config(dict(context.run_config)))
        return resolved

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        ask = msg.content["config"].get("query", "") if "config" in msg.content else ""
        if ask != PARTITION_QUERY:
            raise ValueError(f"unknown query {ask!r}; this ClientApp answers {PARTITION_QUERY!r}")
        pid = int(context.node_config.get("partition-id", -1))
        content = RecordDict({"partition": MetricRecord({"partition-id": pid})})
        return Message(content=content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = config_of(context)
        _threads(cfg)
        server_round = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
        pid = int(context.node_config.get("partition-id", -1))
        inject(cfg, server_round, pid)  # fail-clients: raise or stall (tests)
        restore_client_state(cfg, context, server_round)  # a resumed run: state mirrored before the stop
        scaling = failure_for(cfg, server_round, pid) == "scale"
        received = received_model(cfg, msg) if scaling else None  # before training touches it
        out = train_step(str(cfg["strategy"]))(msg, context, cfg)
        save_client_state(cfg, context, server_round)  # checkpoint-every > 0: mirror context.state
        out = attack(cfg, server_round, pid, out, received, context.state)  # fail-clients ...:scale|inflate
        return poison(cfg, server_round, pid, out)  # fail-clients ...:nan (tests)

    return app


app = make_client_app()

__all__ = ["app", "make_client_app"]
