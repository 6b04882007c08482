"""Methods built by composing others: no class is changed, each piece is used as it is.

* ``fedluar-paq`` — FedLUAR's layer recycling (:class:`strategies.fedluar.LUAR`) around FedPAQ's
  uplink (:class:`strategies.compression.UplinkCompression` with the QSGD compressor), the FedLUAR
  paper's Table 4: recycled layers are not sent at all, the others are quantised.
* ``feddip-luar`` — LUAR around FedDIP (:class:`strategies.feddip.FedDIP`): clients leave LUAR's
  recycled layers out of their sparse FedDIP uplink.
* DPU + 8-bit values is ``strategy = "partial-update"`` with ``value-bits = 8`` (no new code).

The composition works through two protocol facts and one hook, nothing else: LUAR names the arrays
clients leave out in the round's config (:data:`fedsparse.protocol.OMITTED_ARRAYS`); the base
strategy honours that name when it screens and aggregates its own payloads; and LUAR passes every
model it returns through the base's :meth:`~fedsparse.hooks.MethodHooks.constrain` (FedDIP's masks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedsparse.config import Config, ConfigError
from fedsparse.methods import ErrorCase, Method
from fedsparse.protocol import COMPRESSED_REPLY_METRICS
from fedsparse.protocol.feddip import REPLY_METRICS
from fedsparse.protocol.fedluar import luar_round_lr, parse_milestones
from strategies.compression import build_uplink
from strategies.feddip import build_feddip
from strategies.fedluar import LUAR, model_layers


def check_combination(cfg: Config) -> None:
    """What the combinations do not support, and δ within the model's recyclable layers."""
    name = cfg["strategy"]
    if cfg["luar-base"] != "fedavg":
        wrapped = "FedPAQ" if name == "fedluar-paq" else "FedDIP"
        raise ConfigError(f"luar-base = {cfg['luar-base']!r}: {name} wraps {wrapped}; allowed: 'fedavg' (ignored)")
    if name == "feddip-luar":
        if parse_milestones(str(cfg["luar-lr-milestones"])):
            raise ConfigError(
                "luar-lr-milestones is not used by feddip-luar (its clients follow FedDIP's lr schedule); allowed: ''"
            )
        s0, sp = float(cfg["initial-sparsity"]), float(cfg["target-sparsity"])
        if not s0 <= sp < 1.0:
            raise ConfigError(
                f"initial-sparsity = {s0!r}, target-sparsity = {sp!r}; allowed: 0 <= initial-sparsity <= target-sparsity < 1"
            )
    try:
        layers = model_layers(cfg)
    except ValueError:
        return
    if int(cfg["recycled-layers"]) > len(layers):
        raise ConfigError(
            f"recycled-layers = {cfg['recycled-layers']} exceeds the {len(layers)} recyclable layers of "
            f"{cfg['model']}; allowed: 0 .. {len(layers)}"
        )


def build_fedluar_paq(cfg: Mapping[str, Any]) -> Strategy:
    """LUAR around FedPAQ's uplink."""
    return LUAR(
        build_uplink(cfg, "fedpaq"),
        int(cfg["recycled-layers"]),
        layers=model_layers(cfg),
        seed=int(cfg["seed"]),
        client_lr=(lambda t: luar_round_lr(cfg, t)) if parse_milestones(str(cfg["luar-lr-milestones"])) else None,
    )


def build_feddip_luar(cfg: Mapping[str, Any]) -> Strategy:
    """LUAR around FedDIP, built from the same keys as ``strategy = "feddip"``."""
    return LUAR(build_feddip(cfg), int(cfg["recycled-layers"]), layers=model_layers(cfg), seed=int(cfg["seed"]))


FEDLUAR_PAQ = Method(
    name="fedluar-paq",
    summary="FedLUAR over FedPAQ (Kim et al. 2025, Table 4): recycled layers are not sent, the others QSGD-quantised",
    build=build_fedluar_paq,
    client_step="clients.compression:compressed_train",
    reply_metrics=COMPRESSED_REPLY_METRICS,
    uses=("fedpaq", "fedluar"),
    checks=(check_combination,),
    error_cases=(
        ErrorCase("fedluar-paq: momentum persistence", {"persist-momentum": True, "momentum": 0.9}),
        ErrorCase("fedluar-paq: another base", {"luar-base": "fedadam"}),
        ErrorCase("fedluar-paq: more recycled layers than the model has", {"recycled-layers": 6}),
    ),
)

FEDDIP_LUAR = Method(
    name="feddip-luar",
    codec_model_reply=True,
    reply_metrics=REPLY_METRICS,
    summary="FedDIP with a LUAR-recycled uplink: clients leave FedLUAR's recycled layers out of their sparse replies",
    build=build_feddip_luar,
    client_step="clients.feddip:feddip_luar_train",
    uses=("feddip", "fedluar"),
    checks=(check_combination,),
    error_cases=(
        ErrorCase("feddip-luar: lr milestones", {"luar-lr-milestones": "10"}),
        ErrorCase("feddip-luar: initial above target sparsity", {"initial-sparsity": 0.8, "target-sparsity": 0.5}),
    ),
)

__all__ = ["FEDLUAR_PAQ", "FEDDIP_LUAR", "build_fedluar_paq", "build_feddip_luar", "check_combination"]
