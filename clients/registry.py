"""Which client step answers a train message, by strategy name.

Strategies that change what travels (FedDIP's sparse model, LUAR's omitted layers, partial
updates) register their client step here; every other strategy (FedAvg, FedProx, FedAdam, ...)
uses the standard step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flwr.app import Context, Message

TrainStep = Callable[[Message, Context, Mapping[str, Any]], Message]
_STEPS: dict[str, TrainStep] = {}


def register_train_step(*strategy_names: str) -> Callable[[TrainStep], TrainStep]:
    """Decorator: use this function as the client step of the named strategies."""

    def deco(fn: TrainStep) -> TrainStep:
        for name in strategy_names:
            _STEPS[name] = fn
        return fn

    return deco


def train_step_for(strategy: str) -> TrainStep:
    """The client step of ``strategy`` (the standard one when it registered none)."""
    _load_steps()
    from clients.standard import standard_train

    return _STEPS.get(strategy, standard_train)


def _load_steps() -> None:
    """Import the modules that register client steps (kept lazy: they import torch models)."""
    import importlib

    for module in ("clients.standard", "clients.feddip", "clients.fedluar", "clients.partial_update", "clients.compression"):
        importlib.import_module(module)
