"""Client side of the uplink-compression baselines (Top-k + error feedback, Rand-k, FedPAQ, DGC, SBC) and SNIP.

Every baseline trains like FedAvg's client and then compresses its **update** Δ = w_local − w_global
with the compressor the round's config names (:mod:`fedsparse.compressors`: the compressor classes
and their payload formats, shared with the server). What the reply carries is the compressed
payload — nothing else — so the bytes the grid meters are the compressed bytes. State that must
survive rounds (the error-feedback residual; DGC's momentum u and accumulated velocity v) lives in
the client's ``context.state`` (:func:`fedsparse.compressors.load_memory` / ``store_memory``).

SNIP's client (Lee et al. 2019) answers two kinds of train message (:mod:`fedsparse.protocol.snip`):
``snip-phase = "saliency"`` (compute |∂L/∂w ⊙ w| at the initial weights on a few local batches and
send it) and ``"train"`` (decode the pruned model from the codec payload, train with the pruned
weights frozen at zero, send the kept values back through the codec).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from torch import nn

from clients.local import LocalRound, derive_seed, reply, state_dict_cpu
from clients.train import optimizer_from_config, train_steps
from fedsparse import codec
from fedsparse.arrays import record_to_torch
from fedsparse.compressors import compress_with_memory, load_memory, store_memory
from fedsparse.protocol import OMITTED_ARRAYS
from fedsparse.protocol.fedluar import luar_round_lr
from fedsparse.protocol.snip import CFG_SNIP_BATCHES, CFG_SNIP_PHASE, CFG_SNIP_PRUNABLE

__all__ = ["compressed_train", "snip_saliency", "masked_training", "snip_train"]


def _client_lr(cfg: Mapping[str, Any], server_round: int, local: LocalRound) -> float:
    """FedLUAR's milestone schedule for the LUAR combinations, the core schedule otherwise."""
    if str(cfg["strategy"]).startswith("fedluar"):
        return luar_round_lr(cfg, server_round)
    return local.lr


def compressed_train(msg: Message, context: Context, cfg: Mapping[str, Any]) -> Message:
    """Train like FedAvg's client, then send the compressed update (see the module docstring)."""
    local = LocalRound.from_message(msg, context, cfg)
    config = msg.content["config"]
    global_state = record_to_torch(msg.content["arrays"])
    model = local.model(global_state)
    optimizer = optimizer_from_config(model, _client_lr(cfg, local.server_round, local), cfg)
    stats = train_steps(model, local.batches(), optimizer, proximal_mu=float(config.get("proximal-mu", 0.0)))
    trained = state_dict_cpu(model)
    omit = set(config.get(OMITTED_ARRAYS, []))  # type: ignore[arg-type]  # a list entry
    update: dict[str, np.ndarray] = {}
    for name, value in trained.items():
        if name in omit:
            continue
        now = value.numpy()
        update[name] = now - global_state[name].numpy() if now.dtype.kind == "f" else now
    seed = derive_seed("compression", cfg["seed"], local.server_round, local.partition_id) & ((1 << 62) - 1)
    payload, memory, cstats = compress_with_memory(update, config, load_memory(context.state), seed=seed)
    store_memory(context.state, memory)
    metrics = {"num-examples": local.num_examples, "train-loss": stats["train-loss"], **cstats}
    return reply(msg, codec.to_array_record(payload), metrics)


# --------------------------------------------------------------------------------------------
# SNIP
# --------------------------------------------------------------------------------------------


def snip_saliency(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """SNIP's connection sensitivity |∂L/∂w ⊙ w| of the named parameters (Lee et al. 2019, eq. 6),
    gradients summed over ``batches``, normalised to sum to 1 over all named tensors."""
    params = dict(model.named_parameters())
    names = list(names)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"SNIP: the model has no parameters named {', '.join(unknown)}")
    model.train()
    model.zero_grad(set_to_none=True)
    seen = 0
    for x, y in batches:
        nn.functional.cross_entropy(model(x), y).backward()
        seen += 1
    if seen == 0:
        raise ValueError("SNIP: no batches to compute the saliency on")
    sal = {n: (params[n].grad.detach() * params[n].detach()).abs().cpu() for n in names}  # type: ignore[union-attr]  # backward() set .grad
    model.zero_grad(set_to_none=True)
    total = float(sum(float(s.sum()) for s in sal.values()))
    return {n: (s / total if total > 0 else s) for n, s in sal.items()}


class masked_training:  # noqa: N801 - used as a context manager, reads like a function
    """Within the block, gradients of pruned positions are zeroed (hooks removed on exit), so SGD —
    momentum, weight decay and a proximal term included — keeps pruned weights at exactly zero."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        self.handles = []
        for name, mask in masks.items():
            keep = mask.to(device=params[name].device, dtype=params[name].dtype)
            with torch.no_grad():
                params[name].mul_(keep)
            self.handles.append(params[name].register_hook(lambda g, keep=keep: g * keep))

    def __enter__(self) -> masked_training:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def snip_train(msg: Message, context: Context, cfg: Mapping[str, Any]) -> Message:
    """SNIP's client: the saliency round at the initial weights, then masked local training."""
    local = LocalRound.from_message(msg, context, cfg)
    config: ConfigRecord = msg.content["config"]  # type: ignore[assignment]  # "config" is a ConfigRecord
    prunable = [str(n) for n in config[CFG_SNIP_PRUNABLE]]  # type: ignore[union-attr]  # a list entry
    if str(config.get(CFG_SNIP_PHASE, "train")) == "saliency":
        model = local.model(record_to_torch(msg.content["arrays"]))
        batches = itertools.islice(local.batches(), max(1, int(config.get(CFG_SNIP_BATCHES, 1))))  # type: ignore[arg-type]  # an int entry
        sal = snip_saliency(model, batches, prunable)
        return reply(
            msg, ArrayRecord({n: Array(s.numpy()) for n, s in sal.items()}), {"num-examples": local.num_examples}
        )
    tensors, masks = codec.decode(codec.from_array_record(msg.content["arrays"]))  # type: ignore[arg-type]  # "arrays" is an ArrayRecord
    state = {n: torch.from_numpy(np.array(x, copy=True)) for n, x in tensors.items()}
    model = local.model(state)
    keep = {n: torch.from_numpy(np.asarray(masks[n], dtype=bool)) for n in prunable}
    with masked_training(model, keep):
        stats = train_steps(
            model, local.batches(), local.optimizer(model), proximal_mu=float(config.get("proximal-mu", 0.0))
        )
    trained = {k: v.numpy() for k, v in state_dict_cpu(model).items()}
    payload = codec.encode(trained, {n: keep[n].numpy() for n in prunable})
    return reply(
        msg, codec.to_array_record(payload), {"num-examples": local.num_examples, "train-loss": stats["train-loss"]}
    )
