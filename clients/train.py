"""Reusable local training and evaluation steps (plain PyTorch, no Flower).

Usable from any ClientApp: our own (``clients.app``) and a user's. Data stay uint8 in memory and
are normalised per batch, so a client costs no float copy of its partition.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from fedsparse.model_options import decay_groups

Normalize = Callable[[torch.Tensor], torch.Tensor]


def pick_device(want_gpu: bool) -> torch.device:
    """CUDA when asked for and present, else CPU."""
    return torch.device("cuda") if want_gpu and torch.cuda.is_available() else torch.device("cpu")


def iterate_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    normalize: Normalize,
    *,
    epochs: int = 1,
    steps: int = 0,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches: ``steps`` batches if steps > 0 (reshuffling at every pass), else
    ``epochs`` full passes. The order depends only on ``generator``, so runs are reproducible."""
    n = len(labels)
    if n == 0:
        return
    total = steps if steps > 0 else epochs * math.ceil(n / batch_size)
    done = 0
    while done < total:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            if done >= total:
                return
            idx = order[start : start + batch_size]
            yield normalize(images[idx]).to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)
            done += 1


OPTIMIZERS = ("sgd", "adam")


def make_optimizer(
    model: nn.Module, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, name: str = "sgd"
) -> torch.optim.Optimizer:
    """The client optimizer: SGD (what FedDIP, FedLUAR and the baselines use) or Adam (what deep
    partial updating trains with; ``momentum`` does not apply to it).

    A new optimizer every round: clients are stateless unless a method keeps state on purpose
    (``client-momentum``: :mod:`clients.momentum`)."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer = {name!r}; allowed: {', '.join(OPTIMIZERS)}")


def optimizer_from_config(model: nn.Module, lr: float, cfg: Mapping[str, object]) -> torch.optim.Optimizer:
    """``make_optimizer`` with the run configuration's ``optimizer``, ``momentum`` and ``weight-decay``.

    With ``weight-decay-rule = fedluar-reference`` the decay is set per parameter group as the FedLUAR
    reference code sets it for the model (:func:`fedsparse.model_options.decay_groups`)."""
    name = str(cfg.get("optimizer", "sgd"))
    if str(cfg.get("weight-decay-rule", "fixed")) == "fixed":
        return make_optimizer(model, lr, float(cfg["momentum"]), float(cfg["weight-decay"]), name)
    groups = decay_groups(model, cfg)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(cfg["momentum"]))
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"optimizer = {name!r}; allowed: {', '.join(OPTIMIZERS)}")


def proximal_term(model: nn.Module, global_params: Mapping[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's μ/2 · ‖w − w_global‖² over the trainable parameters."""
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, param in model.named_parameters():
        total = total + (param - global_params[name]).pow(2).sum()
    return 0.5 * mu * total


def snapshot_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters (the round's starting point, for FedProx)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train_steps(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    proximal_mu: float = 0.0,
    global_params: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Cross-entropy SGD over ``batches``; optional FedProx term. Returns mean loss and counts."""
    model.train()
    if proximal_mu > 0 and global_params is None:
        global_params = snapshot_params(model)
    loss_sum, steps, seen = 0.0, 0, 0
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if proximal_mu > 0:
            loss = loss + proximal_term(model, global_params, proximal_mu)  # type: ignore[arg-type]  # set above when proximal_mu > 0
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach())
        steps += 1
        seen += len(y)
    return {"train-loss": loss_sum / max(steps, 1), "num-steps": steps, "num-samples-seen": seen}


# The central evaluation lives in the core (the ServerApp runs it); re-exported for ClientApps.
