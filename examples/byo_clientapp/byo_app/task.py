"""The user's side: a model and a data set that fedsparse knows nothing about.

Here a small CNN and a synthetic 4-class image task (class prototypes plus noise), split across
clients by ``partition-id`` — replace both with your own.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

NUM_CLASSES = 4
IMAGE = 12


class Net(nn.Module):
    """conv → conv → fc → fc: enough layers for FedDIP to prune and FedLUAR to recycle."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * (IMAGE // 4) ** 2, 32)
        self.fc2 = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _samples(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    prototypes = torch.randn(NUM_CLASSES, 1, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    images = prototypes[labels] + 1.5 * torch.randn(n, 1, IMAGE, IMAGE, generator=gen)
    return images, labels


def load_partition(partition_id: int, num_partitions: int, size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """This client's training data (different samples per partition)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} outside 0..{num_partitions - 1}")
    return _samples(size, seed=10_000 + partition_id)


def load_test(size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """A held-out set for the server's central evaluation."""
    return _samples(size, seed=99)


def batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, steps: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` mini-batches drawn with a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        yield images[idx], labels[idx]


def train(
    model: nn.Module, data: Iterator[tuple[torch.Tensor, torch.Tensor]], optimizer: torch.optim.Optimizer
) -> float:
    """Plain SGD steps; the mean training loss."""
    model.train()
    losses = []
    for x, y in data:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses) / max(len(losses), 1)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) on the given set."""
    model.eval()
    logits = model(images)
    return float(nn.functional.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())
