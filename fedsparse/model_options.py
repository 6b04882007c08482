"""How a model starts and how it is regularised: the run keys ``init`` and ``weight-decay-rule``.

Both exist so that fedsparse can train in a paper's *setting*, not only with its algorithm. The
FedLUAR authors' code (``swblaster/FedLUAR``, TensorFlow/Keras) differs from PyTorch's defaults in
two ways that change the outcome of layer recycling, whose scores are ‖Δ_l‖ / ‖x_l‖:

* **initialisation** — Keras' ``Conv2D`` / ``Dense`` default to Glorot-uniform kernels and zero
  biases, and the reference ResNet-20 starts the second BatchNorm of every residual block with
  γ = 0. PyTorch's default (Kaiming-uniform with a = √5, uniform biases) gives the CNN's fc1 an
  initial norm of 26.1 where Glorot gives 49.8, hence other scores and other recycled layers.
* **weight decay** — the reference sets it per model through Keras ``l2(λ)`` kernel regularisers,
  i.e. a loss term λ‖w‖² on the regularised tensors only (gradient 2λw), and its FEMNIST CNN builds
  the regulariser but never attaches it: no weight decay at all, whatever Table 5 of the paper says.

Both sides use this module: the server builds round 0 with :func:`apply_init` (through
:func:`fedsparse.global_model.initial_model`), clients build their optimizer's parameter groups
with :func:`decay_groups`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

INITS = ("torch", "glorot")
WEIGHT_DECAY_RULES = ("fixed", "fedluar-reference")


@dataclass(frozen=True)
class ReferenceDecay:
    """One model's weight decay in the FedLUAR reference code (``model.py`` / ``config.py``).

    ``keras_l2``: the λ of Keras' ``l2(λ)`` (loss + λ‖w‖², so the torch-equivalent decay is 2λ);
    ``classifier_bias``: whether the last layer's bias is regularised too (ResNet-20's
    ``bias_regularizer``). Kernels (tensors with ndim > 1) are always the regularised ones;
    BatchNorm parameters and other biases never are.
    """

    keras_l2: float
    classifier_bias: bool
    source: str

    @property
    def torch_decay(self) -> float:
        """SGD ``weight_decay`` giving the same gradient as Keras' λ‖w‖² term: 2λ."""
        return 2.0 * self.keras_l2


#: Per-model weight decay of swblaster/FedLUAR, for the models fedsparse shares with it.
#: (WideResNet-28-10, l2 5e-4, and DistilBERT are not models of fedsparse.)
FEDLUAR_REFERENCE_DECAY: dict[str, ReferenceDecay] = {
    "cnn": ReferenceDecay(0.0, False, "model.py `cnn`: the l2 regulariser is built but attached to no layer"),
    "resnet20": ReferenceDecay(
        1e-4, True, "config.py cifar10 weight_decay = 1e-4; model.py `resnet20` kernels + fc bias"
    ),
}


def apply_init(model: nn.Module, init: str) -> nn.Module:
    """Re-initialise ``model`` in place: ``torch`` keeps PyTorch's defaults (the model as built);
    ``glorot`` gives every convolution and linear layer Glorot-uniform (Xavier) weights and zero
    biases, and every residual block's second BatchNorm γ = 0 (the reference ResNet-20's
    ``gamma_initializer='zeros'``). Draws from torch's global generator, like the default init.

    Keras and torch compute Glorot's fans the same way for convolutions (receptive field × channels).
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")
    if init == "torch":
        return model
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for module in model.modules():
        second_bn = getattr(module, "bn2", None)
        if isinstance(second_bn, nn.BatchNorm2d) and hasattr(module, "conv2"):  # a residual block
            nn.init.zeros_(second_bn.weight)
    return model


def _classifier_bias(model: nn.Module) -> str | None:
    """Name of the last linear layer's bias (the classifier's), if it has one."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            last = f"{name}.bias" if name else "bias"
    return last


def reference_decay(model_name: str) -> ReferenceDecay:
    """The reference's decay for ``model_name``; ValueError naming the models it covers."""
    if model_name not in FEDLUAR_REFERENCE_DECAY:
        raise ValueError(
            f"weight-decay-rule = 'fedluar-reference' has no entry for model {model_name!r}; the reference code "
            f"sets it for: {', '.join(FEDLUAR_REFERENCE_DECAY)}"
        )
    return FEDLUAR_REFERENCE_DECAY[model_name]


def decay_groups(model: nn.Module, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Optimizer parameter groups with their weight decay.

    ``weight-decay-rule = fixed``: one group, ``weight-decay`` on every parameter (torch's usual).
    ``fedluar-reference``: the regularised tensors of :data:`FEDLUAR_REFERENCE_DECAY` get 2λ, the
    others 0 (``weight-decay`` itself must then be 0; the configuration check says so).
    """
    rule = str(cfg.get("weight-decay-rule", "fixed"))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if rule == "fixed":
        return [{"params": [p for _, p in params], "weight_decay": float(cfg["weight-decay"])}]
    if rule != "fedluar-reference":
        raise ValueError(f"unknown weight-decay-rule {rule!r}; choose one of: {', '.join(WEIGHT_DECAY_RULES)}")
    ref = reference_decay(str(cfg["model"]))
    bias = _classifier_bias(model) if ref.classifier_bias else None
    decayed = [p for n, p in params if p.ndim > 1 or n == bias]
    plain = [p for n, p in params if not (p.ndim > 1 or n == bias)]
    groups = [{"params": decayed, "weight_decay": ref.torch_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def init_norms(model: nn.Module) -> dict[str, float]:
    """‖w‖ of every parameter (what LUAR's scores divide by at round 1)."""
    with torch.no_grad():
        return {n: float(p.detach().norm()) for n, p in model.named_parameters()}


__all__ = [
    "INITS",
    "WEIGHT_DECAY_RULES",
    "FEDLUAR_REFERENCE_DECAY",
    "ReferenceDecay",
    "apply_init",
    "decay_groups",
    "reference_decay",
    "init_norms",
]
