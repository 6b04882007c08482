"""fedsparse: communication-efficient federated learning on Flower.

``fedsparse.simulate(config)`` runs one configuration on Flower's simulation engine and returns
the rounds table (a pandas DataFrame). Heavy imports (torch, flwr, ray) happen on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["simulate", "resolve_config", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "simulate":
        from fedsparse.simulation import simulate

        return simulate
    if name == "resolve_config":
        from fedsparse.config import resolve_config

        return resolve_config
    raise AttributeError(name)
