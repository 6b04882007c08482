"""FedDIP's client: decode the pruned global model, train with dynamic pruning + error feedback, reply.

The downlink is a :mod:`fedsparse.codec` payload; the client's mask is the set of positions the
codec kept for each prunable tensor (Algorithm 1, line 10) — taken from the index (bitmap or
coordinates), not from the values, so a kept weight that happens to be 0.0 stays kept. The names of
the prunable tensors, λ_τ, whether the uplink is sparse and FedProx's μ come in the round's
ConfigRecord (the layout is :mod:`fedsparse.protocol.feddip`).

Two layers, so that a user's own ClientApp can reuse them:

* :func:`feddip_client_round` — plain torch + Flower records: (arrays, config, model, batches,
  optimizer factory) → (reply ArrayRecord, training stats). No fedsparse data loading.
* :func:`feddip_train_step` — our ClientApp's train step (registered for ``strategy = "feddip"``),
  which adds this project's client data, seeding and learning-rate schedule via ``LocalRound``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from torch import Tensor, nn

from clients.feddip_step import feddip_train
from clients.local import LocalRound, reply, state_dict_cpu
from fedsparse import codec
from fedsparse.protocol import OMITTED_ARRAYS
from fedsparse.protocol.feddip import (
    CONFIG_LAMBDA,
    CONFIG_PROXIMAL_MU,
    CONFIG_PRUNABLE,
    CONFIG_SPARSE_UPLINK,
    METRIC_REG_RATIO,
    decode_payload,
)

__all__ = ["decode_global", "encode_update", "feddip_client_round", "feddip_train_step", "feddip_luar_train"]


def decode_global(record: ArrayRecord, prunable: Sequence[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The global model as a torch state dict, and the boolean masks of the ``prunable`` tensors."""
    tensors, masks = decode_payload(record)
    missing = [n for n in prunable if n not in tensors]
    if missing:
        raise ValueError(f"the downlink lacks the prunable tensors {missing}; it carries {sorted(tensors)}")
    state = {n: torch.from_numpy(np.array(x, copy=True)) for n, x in tensors.items()}
    return state, {n: torch.from_numpy(np.array(masks[n], dtype=bool, copy=True)) for n in prunable}


def encode_update(state: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None) -> ArrayRecord:
    """The reply's arrays: the named tensors through the codec, masked tensors sparse.

    ``masks=None`` sends every tensor dense (still as the codec's two arrays).
    """
    tensors = {n: t.detach().cpu().numpy() for n, t in state.items()}
    keep = {} if masks is None else {n: m.detach().cpu().numpy().astype(bool) for n, m in masks.items()}
    return codec.to_array_record(codec.encode(tensors, keep))


def feddip_client_round(
    arrays: ArrayRecord,
    config: ConfigRecord | Mapping[str, Any],
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    device: torch.device | str = "cpu",
) -> tuple[ArrayRecord, dict[str, float]]:
    """One FedDIP client round, usable from any ClientApp.

    Loads the decoded global model into ``model`` (strict), trains it with
    :func:`clients.feddip_step.feddip_train` at λ = ``config["feddip-lambda"]`` (and
    ``config["proximal-mu"]`` when present), and encodes the reply: the prunable tensors masked by
    the round's mask when ``config["feddip-sparse-uplink"]`` (nested masks), dense otherwise.
    """
    prunable = [str(n) for n in config[CONFIG_PRUNABLE]]
    state, masks = decode_global(arrays, prunable)
    model.load_state_dict(state, strict=True)
    model.to(device)
    mu = float(config.get(CONFIG_PROXIMAL_MU, 0.0))
    stats = feddip_train(
        model,
        masks,
        batches,
        make_optimizer(model),
        lambda_t=float(config[CONFIG_LAMBDA]),
        proximal_mu=mu,
        global_params=state if mu > 0 else None,
        device=device,
    )
    sparse_up = bool(config.get(CONFIG_SPARSE_UPLINK, True))
    update = encode_update(state_dict_cpu(model), masks if sparse_up else None)
    return update, stats


def train_metrics(num_examples: int, stats: Mapping[str, Any]) -> dict[str, Any]:
    """The reply's metrics: example count, losses, and the regulariser's gradient share per layer
    (:data:`fedsparse.protocol.feddip.METRIC_REG_RATIO`, in the order of ``feddip-prunable``)."""
    return {
        "num-examples": num_examples,
        "train-loss": stats["loss"],
        "ce-loss": stats["ce-loss"],
        METRIC_REG_RATIO: [float(r) for r in stats["reg-grad-ratio"]],
    }


def feddip_train_step(msg: Message, context: Context, cfg: Mapping[str, Any]) -> Message:
    """fedsparse's ClientApp step for FedDIP (and its variants FedDP, DPF, FedDIP+Prox)."""
    local = LocalRound.from_message(msg, context, cfg)
    model = local.model()
    update, stats = feddip_client_round(
        msg.content["arrays"], msg.content["config"], model, local.batches(), local.optimizer, local.device
    )
    metrics = train_metrics(local.num_examples, stats)
    return reply(msg, update, metrics)


# --------------------------------------------------------------------------------------------
# combination: FedDIP with a LUAR-recycled uplink
# --------------------------------------------------------------------------------------------


def feddip_luar_train(msg: Message, context: Context, cfg: Mapping[str, Any]) -> Message:
    """FedDIP's client round (:func:`feddip_client_round`, step by step with its own
    public pieces), except that the tensors named in ``luar-recycled`` are left out of the reply."""
    local = LocalRound.from_message(msg, context, cfg)
    config = msg.content["config"]
    prunable = [str(n) for n in config[CONFIG_PRUNABLE]]  # type: ignore[union-attr]  # a list entry
    state, masks = decode_global(msg.content["arrays"], prunable)  # type: ignore[arg-type]  # "arrays" is an ArrayRecord
    model = local.model(state)
    mu = float(config.get(CONFIG_PROXIMAL_MU, 0.0))
    stats = feddip_train(
        model,
        masks,
        local.batches(),
        local.optimizer(model),
        lambda_t=float(config[CONFIG_LAMBDA]),
        proximal_mu=mu,
        global_params=state if mu > 0 else None,
        device=local.device,
    )
    omit = set(config.get(OMITTED_ARRAYS, []))
    unknown = sorted(omit - set(state))
    if unknown:
        raise ValueError(f"the server recycles arrays this model does not have: {', '.join(unknown)}")
    trained = {k: v for k, v in state_dict_cpu(model).items() if k not in omit}
    sparse_up = bool(config.get(CONFIG_SPARSE_UPLINK, True))
    update = encode_update(trained, {n: m for n, m in masks.items() if n not in omit} if sparse_up else None)
    metrics = train_metrics(local.num_examples, stats)
    return reply(msg, update, metrics)
