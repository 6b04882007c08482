"""Client side of the partial-update broadcast (deep partial updating, DPU, in federated learning).

A client keeps a copy of the **deployed model** in its Flower ``context.state`` together with that
copy's version number. Each train message carries a *patch* that brings the copy from the version
the server believes the client holds (``pu-base-version``) to the current deployed version
(``pu-target-version``); the client applies it, checks the result against the server's digest,
trains from it, and replies with its trained model (dense, as in FedAvg) plus, for the ``local`` and
``combined`` contributions, the accumulated −Σ_q g_q ⊙ Δw_q of its local steps.

The message layout and the semantics of a patch are :mod:`fedsparse.protocol.partial_update`, which
the server uses too: one :func:`~fedsparse.protocol.partial_update.apply_part` on both sides is why
client copies and the server's model agree bit for bit.

The pieces are plain numpy / torch and usable from any ClientApp: :func:`patch_held_model`,
:func:`load_held` / :func:`store_held`, :func:`train_with_local_contribution`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from torch import nn

from clients.local import LocalRound, reply, state_dict_cpu
from clients.train import proximal_term, snapshot_params, train_steps
from fedsparse.arrays import record_from_torch
from fedsparse.global_model import initial_model
from fedsparse.protocol.partial_update import (
    CONTRIBUTION_KEY,
    STATE_META,
    STATE_MODEL,
    Arrays,
    PatchError,
    apply_part,
    model_digest,
    pack_parts,
    partial_names,
    patch_held_model,
    unpack_parts,
)

__all__ = [
    "PatchError",
    "model_digest",
    "apply_part",
    "pack_parts",
    "unpack_parts",
    "patch_held_model",
    "load_held",
    "store_held",
    "partial_names",
    "train_with_local_contribution",
    "partial_update_train",
]

# --------------------------------------------------------------------------- context state


def load_held(context: Context) -> tuple[Arrays | None, int]:
    """The copy of the deployed model kept in ``context.state`` and its version (None, −1 if none)."""
    state = context.state
    if STATE_MODEL not in state.array_records or STATE_META not in state.config_records:
        return None, -1
    arrays = {k: a.numpy() for k, a in state.array_records[STATE_MODEL].items()}
    return arrays, int(state.config_records[STATE_META]["version"])


def store_held(context: Context, arrays: Mapping[str, np.ndarray], version: int) -> None:
    """Keep ``arrays`` (version ``version``) in ``context.state`` for the next rounds."""
    context.state[STATE_MODEL] = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})
    context.state[STATE_META] = ConfigRecord({"version": int(version)})


# --------------------------------------------------------------------------- local training


def train_with_local_contribution(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    names: Iterable[str],
    *,
    proximal_mu: float = 0.0,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Local training (as :func:`clients.train.train_steps`) that also accumulates DPU's local
    contribution c_l = −Σ_q g(w^{q−1}) ⊙ Δw^q (paper eq. 9) for the named parameters.

    g is the gradient of the step's loss (``param.grad``), Δw the change ``optimizer.step()`` made,
    so momentum, weight decay and the optimizer itself are accounted for as they act: under plain
    SGD c_l = lr·Σ g², under Adam (``optimizer = "adam"``, as the paper) −Σ g ⊙ Adam's step. Returns (stats, contributions on CPU,
    float32).
    """
    params = dict(model.named_parameters())
    tracked = [(n, params[n]) for n in names if n in params]
    contrib = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in tracked}
    global_params = snapshot_params(model) if proximal_mu > 0 else None
    model.train()
    loss_sum, steps, seen = 0.0, 0, 0
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if proximal_mu > 0:
            loss = loss + proximal_term(model, global_params, proximal_mu)  # type: ignore[arg-type]  # set when proximal_mu > 0
        loss.backward()
        before = [p.detach().clone() for _, p in tracked]
        optimizer.step()
        with torch.no_grad():
            for (name, p), old in zip(tracked, before):
                if p.grad is not None:
                    contrib[name] -= (p.grad * (p.detach() - old)).float()
        loss_sum += float(loss.detach())
        steps += 1
        seen += len(y)
    stats = {"train-loss": loss_sum / max(steps, 1), "num-steps": steps, "num-samples-seen": seen}
    return stats, {n: c.cpu() for n, c in contrib.items()}


def _seed_initial_model(cfg: Mapping[str, Any]) -> Callable[[], Arrays]:
    """Version 0 rebuilt exactly as the ServerApp builds it (:func:`fedsparse.global_model.initial_model`)."""

    def build() -> Arrays:
        with torch.random.fork_rng(devices=[]):
            model = initial_model(cfg)
        return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}

    return build


def partial_update_train(msg: Message, context: Context, cfg: Mapping[str, Any]) -> Message:
    """Patch the held copy to the deployed model, train from it, reply with the trained model
    (dense) and, when asked, the local contribution."""
    config = msg.content["config"]
    pid = int(context.node_config.get("partition-id", -1))
    held, held_version = load_held(context)
    arrays, version = patch_held_model(
        held, held_version, config, msg.content["arrays"], _seed_initial_model(cfg), who=f"client {pid}"
    )
    store_held(context, arrays, version)

    local = LocalRound.from_message(msg, context, cfg)
    model = local.model({k: torch.tensor(v) for k, v in arrays.items()})
    mu = float(config.get("proximal-mu", 0.0))
    optimizer = local.optimizer(model)
    content_extra: dict[str, ArrayRecord] = {}
    if bool(config.get("pu-local-contribution", False)):
        names = partial_names(dict(model.named_parameters()))
        stats, contrib = train_with_local_contribution(model, local.batches(), optimizer, names, proximal_mu=mu)
        content_extra[CONTRIBUTION_KEY] = ArrayRecord({n: Array(c.numpy()) for n, c in contrib.items()})
    else:
        stats = train_steps(model, local.batches(), optimizer, proximal_mu=mu)
    metrics = {
        "num-examples": local.num_examples,
        "train-loss": stats["train-loss"],
        "partition-id": pid,
        "pu-version": version,
    }
    out = reply(msg, record_from_torch(state_dict_cpu(model)), metrics)
    for key, record in content_extra.items():
        out.content[key] = record
    return out
