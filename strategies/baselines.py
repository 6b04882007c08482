"""The baselines every method is compared with: Flower's own FedAvg and FedProx, unchanged.

They are declared as methods like any other (entry points in ``pyproject.toml``); their clients run
the standard local step (:func:`clients.standard.standard_train`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from fedsparse.methods import Method, sampling_kwargs
from fedsparse.protocol import STANDARD_REPLY_METRICS


def build_fedavg(cfg: Mapping[str, Any]) -> Strategy:
    """Flower's FedAvg with the run's client sampling."""
    return FedAvg(**sampling_kwargs(cfg))


def build_fedprox(cfg: Mapping[str, Any]) -> Strategy:
    """Flower's FedProx (μ = ``proximal-mu``) with the run's client sampling."""
    return FedProx(proximal_mu=float(cfg["proximal-mu"]), **sampling_kwargs(cfg))


FEDAVG = Method(
    name="fedavg",
    summary="FedAvg (McMahan et al., 2017): dense model both ways",
    build=build_fedavg,
    client_step="clients.standard:standard_train",
    plain_model_reply=True,
    client_momentum=True,
    reply_metrics=STANDARD_REPLY_METRICS,
)
FEDPROX = Method(
    name="fedprox",
    summary="FedProx (Li et al., 2020): FedAvg plus a proximal term mu on clients",
    build=build_fedprox,
    client_step="clients.standard:standard_train",
    plain_model_reply=True,
    client_momentum=True,
    reply_metrics=STANDARD_REPLY_METRICS,
)

__all__ = ["FEDAVG", "FEDPROX", "build_fedavg", "build_fedprox"]
