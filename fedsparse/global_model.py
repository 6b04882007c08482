"""The global model: its initialisation at round 0 and its central evaluation.

Both belong to the core because both sides need them: the ServerApp builds round 0 and evaluates
every round's model on the test set; a partial-update client rebuilds round 0 from the seed to
check the server's digest without receiving it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from fedsparse.arrays import record_to_torch
from fedsparse.clientdata import dataset_for
from fedsparse.model_options import apply_init
from fedsparse.models import build_model

Normalize = Callable[[torch.Tensor], torch.Tensor]


def initial_model(cfg: Mapping[str, Any]) -> torch.nn.Module:
    """The global model at round 0, initialised from the run's seed as ``init`` says (PyTorch's
    defaults, or Glorot as the FedLUAR authors' Keras models: :mod:`fedsparse.model_options`)."""
    data = dataset_for(cfg)
    torch.manual_seed(int(cfg["seed"]))
    model = build_model(str(cfg["model"]), data.num_classes, data.in_channels, data.image_size)
    return apply_init(model, str(cfg.get("init", "torch")))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    normalize: Normalize,
    *,
    batch_size: int = 1000,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``model`` on uint8 ``images``."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, len(labels)
    for start in range(0, n, batch_size):
        x = normalize(images[start : start + batch_size]).to(device)
        y = labels[start : start + batch_size].to(device)
        out = model(x)
        loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    return loss_sum / max(n, 1), correct / max(n, 1)


class CentralEvaluator:
    """Evaluates global arrays on the central test set (in the server process)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = cfg
        self.data = dataset_for(cfg)
        self.model = initial_model(cfg)

    def __call__(self, arrays: ArrayRecord) -> tuple[float, float]:
        self.model.load_state_dict(record_to_torch(arrays), strict=True)
        return evaluate(
            self.model,
            self.data.test_images,
            self.data.test_labels,
            self.data.normalize,
            batch_size=int(self.cfg["eval-batch-size"]),
        )


__all__ = ["initial_model", "evaluate", "CentralEvaluator"]
