"""FedDIP's message layout, shared by :mod:`strategies.feddip` and :mod:`clients.feddip`.

Downlink: ``arrays`` is the pruned global model packed by :mod:`fedsparse.codec` (kept values and a
bitmap / coordinate index per prunable tensor; the positions it kept *are* the round's mask) and
``config`` carries λ_τ, the names of the prunable tensors, whether the uplink is sparse this round
and FedProx's μ for FedDIP+Prox. Uplink: the trained model through the same codec — only the mask's
entries in a sparse-uplink round — and ``metrics`` (with :data:`METRIC_REG_RATIO`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from fedsparse import codec

CONFIG_LAMBDA = "feddip-lambda"
CONFIG_PRUNABLE = "feddip-prunable"
CONFIG_SPARSE_UPLINK = "feddip-sparse-uplink"
CONFIG_PROXIMAL_MU = "proximal-mu"  # the same key Flower's FedProx sends
#: reply metric: per prunable tensor (``feddip-prunable`` order), λ over the norm of the rest of the
#: gradient, averaged over the client's steps (how much the regulariser steers training)
METRIC_REG_RATIO = "reg-grad-ratio"
#: the metrics of a FedDIP reply besides num-examples: the loss with λ's penalty, without it, and
#: the regulariser's share of the gradient per layer
REPLY_METRICS = ("train-loss", "ce-loss", METRIC_REG_RATIO)


def decode_payload(record: ArrayRecord) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(every tensor, dense; the kept-position mask of each sparse one) of a codec-packed record."""
    return codec.decode(codec.from_array_record(record))


__all__ = [
    "REPLY_METRICS",
    "CONFIG_LAMBDA",
    "CONFIG_PRUNABLE",
    "CONFIG_SPARSE_UPLINK",
    "CONFIG_PROXIMAL_MU",
    "METRIC_REG_RATIO",
    "decode_payload",
]
