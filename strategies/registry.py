"""Strategy registry: configuration name → a Flower ``Strategy`` built from the run config.

Every entry is a real ``flwr.serverapp.strategy.Strategy``; the same objects work in a
SuperLink deployment with ``strategy.start(...)``. Strategy modules register themselves here and
add their configuration keys to :data:`fedsparse.config.SCHEMA`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

Builder = Callable[[Mapping[str, Any]], Strategy]


@dataclass(frozen=True)
class StrategySpec:
    name: str
    build: Builder
    summary: str


_REGISTRY: dict[str, StrategySpec] = {}
# Modules whose import registers more strategies (kept here so the list is in one place).
_STRATEGY_MODULES: tuple[str, ...] = (
    "strategies.feddip",
    "strategies.fedluar",
    "strategies.partial_update",
    "strategies.compression",
    "strategies.snip",
)


def register_strategy(name: str, summary: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``build(cfg) -> Strategy`` under ``name``."""

    def deco(build: Builder) -> Builder:
        _REGISTRY[name] = StrategySpec(name, build, summary)
        return build

    return deco


def _load() -> None:
    for module in _STRATEGY_MODULES:
        importlib.import_module(module)


def strategy_names() -> list[str]:
    _load()
    return list(_REGISTRY)


def build_strategy(cfg: Mapping[str, Any]) -> Strategy:
    """The configured strategy; unknown names list what is available."""
    _load()
    name = str(cfg["strategy"])
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name].build(cfg)


def sampling_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """FedAvg-family sampling arguments: exactly `clients-per-round` of `num-clients` each round,
    no federated evaluation (the global model is evaluated centrally)."""
    n, k = int(cfg["num-clients"]), int(cfg["clients-per-round"])
    return {
        "fraction_train": k / n,
        "min_train_nodes": k,
        "min_available_nodes": n,
        "fraction_evaluate": 0.0,
    }


@register_strategy("fedavg", "FedAvg (McMahan et al., 2017): dense model both ways")
def _fedavg(cfg: Mapping[str, Any]) -> Strategy:
    return FedAvg(**sampling_kwargs(cfg))


@register_strategy("fedprox", "FedProx (Li et al., 2020): FedAvg plus a proximal term mu on clients")
def _fedprox(cfg: Mapping[str, Any]) -> Strategy:
    return FedProx(proximal_mu=float(cfg["proximal-mu"]), **sampling_kwargs(cfg))
