"""What a client needs for one round: its data, a model, a device, a seeded generator.

Strategy-specific client steps (FedDIP, LUAR, partial updates, ...) all start from a
:class:`LocalRound`, so batching, seeding and learning-rate decay behave the same for every method.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from clients.train import iterate_batches, optimizer_from_config, pick_device
from fedsparse.clientdata import client_data, dataset_for
from fedsparse.config import round_lr
from fedsparse.models import build_model
from fedsparse.protocol import MOMENTUM_RECORD


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any tuple (Python's hash() is salted per process)."""
    return zlib.crc32(repr(parts).encode()) | (zlib.adler32(repr(parts[::-1]).encode()) << 32)


def seed_torch(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)`` for a client on ``device``.

    On CPU only the CPU generator is seeded: ``torch.manual_seed`` also queues a lazy seeding of
    every CUDA device, and records a stack trace to do it (~0.2 ms of CPU per client message,
    measured), for a device a CPU client never touches. What the CPU generator yields is the same.
    """
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


@lru_cache(maxsize=4)
def _model_template(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return build_model(name, num_classes, in_channels, image_size)


def model_for(cfg: Mapping[str, Any]) -> nn.Module:
    """A model of the configured architecture (one instance reused per process)."""
    data = dataset_for(cfg)
    return _model_template(str(cfg["model"]), data.num_classes, data.in_channels, data.image_size)


@dataclass
class LocalRound:
    """One client's round: configuration, identity, data and training helpers."""

    cfg: Mapping[str, Any]
    partition_id: int
    server_round: int
    images: torch.Tensor
    labels: torch.Tensor
    device: torch.device

    @classmethod
    def from_message(cls, msg: Message, context: Context, cfg: Mapping[str, Any]) -> LocalRound:
        pid = int(context.node_config["partition-id"])
        images, labels = client_data(cfg, pid)
        server_round = int(msg.content["config"]["server-round"]) if "config" in msg.content else 0
        device = pick_device(float(cfg["client-gpus"]) > 0)
        seed_torch(derive_seed("torch", cfg["seed"], server_round, pid), device)
        return cls(cfg, pid, server_round, images, labels, device)

    @property
    def num_examples(self) -> int:
        return len(self.labels)

    @property
    def lr(self) -> float:
        return round_lr(self.cfg, max(self.server_round, 1))

    def model(self, state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """The process's model instance, loaded with ``state`` and moved to the device."""
        model = model_for(self.cfg)
        if state is not None:
            model.load_state_dict(state, strict=True)
        return model.to(self.device)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(
            derive_seed("batches", self.cfg["seed"], self.server_round, self.partition_id)
        )
        return iterate_batches(
            self.images,
            self.labels,
            int(self.cfg["batch-size"]),
            gen,
            dataset_for(self.cfg).normalize,
            epochs=int(self.cfg["local-epochs"]),
            steps=int(self.cfg["local-steps"]),
            device=self.device,
        )

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return optimizer_from_config(model, self.lr, self.cfg)


def state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict on CPU (what goes into an ArrayRecord)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def reply(
    msg: Message, arrays: ArrayRecord, metrics: Mapping[str, int | float], momentum: ArrayRecord | None = None
) -> Message:
    """A train reply in the layout Flower's strategies expect (``arrays`` + ``metrics``), plus the
    client's momentum buffers under ``client-momentum = slot`` (:mod:`clients.momentum`)."""
    records: dict[str, Any] = {"arrays": arrays, "metrics": MetricRecord(dict(metrics))}
    if momentum is not None:
        records[MOMENTUM_RECORD] = momentum
    return Message(content=RecordDict(records), reply_to=msg)
