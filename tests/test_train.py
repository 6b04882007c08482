"""The client optimizer choice (``optimizer`` key): SGD by default, Adam on request."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clients.train import make_optimizer, optimizer_from_config
from fedsparse.config import ConfigError, resolve_config


def test_default_is_sgd_with_the_configured_momentum_and_decay() -> None:
    cfg = resolve_config({"momentum": 0.9, "weight-decay": 1e-4})
    opt = optimizer_from_config(nn.Linear(3, 2), 0.05, cfg)
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.9, 1e-4)


def test_adam_takes_a_different_step_than_sgd() -> None:
    cfg = resolve_config({"optimizer": "adam", "weight-decay": 0.0})
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    start = model.weight.detach().clone()
    opt = optimizer_from_config(model, 1e-3, cfg)
    assert isinstance(opt, torch.optim.Adam)
    (model(torch.randn(8, 4)) ** 2).mean().backward()
    grad = model.weight.grad.detach().clone()
    opt.step()
    # Adam's first step moves every weight by lr·sign(g) (bias-corrected moments), not by lr·g
    assert torch.allclose(start - model.weight.detach(), 1e-3 * grad.sign(), atol=1e-6)


def test_unknown_optimizer_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="optimizer.*sgd.*adam"):
        resolve_config({"optimizer": "rmsprop"})
    with pytest.raises(ValueError, match="'rmsprop'; allowed: sgd, adam"):
        make_optimizer(nn.Linear(2, 2), 0.1, name="rmsprop")


def test_fedluar_refuses_to_keep_adam_momentum() -> None:
    with pytest.raises(ConfigError, match="persist-momentum = true with optimizer = 'adam'"):
        resolve_config({"strategy": "fedluar", "optimizer": "adam", "persist-momentum": True, "momentum": 0.9})
