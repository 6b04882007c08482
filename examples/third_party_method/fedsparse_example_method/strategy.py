"""fedavg-signs, server side: FedAvg whose clients send the scaled sign of their update.

Each round is FedAvg's (sample clients, send the dense global model); each client replies with
C(Δᵢ) = (‖Δᵢ‖₁/d)·sign(Δᵢ) per trained tensor (:mod:`.protocol`: one bit per weight, one float32
per tensor), and the server applies the weighted mean of the scaled signs with a server step size η
(``sign-server-lr``)::

    w ← w + η · Σᵢ ρᵢ · sᵢ · sign(Δᵢ),    ρᵢ = nᵢ / Σⱼ nⱼ (num-examples)

Buffers that are not trained (BatchNorm's statistics) come raw and are averaged as FedAvg does.

Why η: the scaled sign never has a larger ℓ2 norm than the update it replaces — ‖C(Δ)‖₂ = ‖Δ‖₁/√d,
between ‖Δ‖₂/√d and ‖Δ‖₂ — so η > 1 can give back what the compression shrank. Beyond √d of a
tensor it cannot be compensation any more: η‖C(Δ)‖₂ > ‖Δ‖₂ for *every* update of that tensor. The
cross-check :func:`check_server_lr` rejects such an η for the model's smallest trained tensor.

Everything fedsparse needs is the :data:`METHOD` declaration at the bottom, named in this package's
pyproject.toml under ``[project.entry-points."fedsparse.methods"]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAvg

from fedsparse.config import ConfigError, Key
from fedsparse.hooks import MethodHooks
from fedsparse.methods import ErrorCase, Method, sampling_kwargs
from fedsparse.protocol import single_array_record
from fedsparse.validation import ArraySpec, check_arrays, spec_of
from fedsparse_example_method import protocol

NAME = "fedavg-signs"

#: The method's one configuration key (fedsparse adds it to its schema: `fedsparse config --section fedavg-signs`).
KEYS: dict[str, Key] = {
    "sign-server-lr": Key(
        1.0,
        "fedavg-signs: server step size η on the averaged scaled signs (w ← w + η·Σρᵢ·sᵢ·sign(Δᵢ))",
        minimum=0.0,
        exclusive_minimum=True,
    ),
}


def model_layout(cfg: Mapping[str, Any]) -> tuple[dict[str, int], list[str]]:
    """(size of every trained tensor, names of the arrays that are not trained) of the configured
    model, built on the meta device (shapes only, no memory) as fedsparse's own checks do.

    Clients sign-code the trained tensors and send the others (BatchNorm's statistics) raw."""
    import torch

    from fedsparse.data.info import dataset_info
    from fedsparse.models import build_model

    info = dataset_info(str(cfg["dataset"]))
    with torch.device("meta"):
        model = build_model(str(cfg["model"]), info.num_classes, info.in_channels, info.image_size)
    trained = {n: p.numel() for n, p in model.named_parameters()}
    return trained, [n for n in model.state_dict() if n not in trained]


def check_server_lr(cfg: Mapping[str, Any]) -> None:
    """η ≤ √d of the smallest trained tensor: above it the server step amplifies every update of
    that tensor beyond the client's own (see the module docstring)."""
    trained, _ = model_layout(cfg)
    name, size = min(trained.items(), key=lambda item: item[1])
    bound = math.sqrt(size)
    if float(cfg["sign-server-lr"]) > bound:
        raise ConfigError(
            f"sign-server-lr = {cfg['sign-server-lr']!r} exceeds √{size} = {bound:.4g} for {cfg['model']}'s smallest "
            f"trained tensor {name!r}: every scaled-sign update of it would be applied larger than the client's own "
            f"update; allowed: 0 < sign-server-lr <= {bound:.4g}"
        )


class FedAvgSigns(FedAvg, MethodHooks):
    """FedAvg with scaled-sign uplink (see the module docstring).

    Parameters
    ----------
    server_lr : η, the server step on the averaged scaled signs (> 0).
    raw_arrays : the model's arrays that clients send raw, not sign-coded (its untrained buffers).
    **fedavg_kwargs : Flower FedAvg's arguments (sampling, ``weighted_by_key``, ...).

    Works in Flower's own ``Strategy.start`` too, with any ClientApp whose train step is
    :func:`fedsparse_example_method.client.sign_train`.
    """

    def __init__(self, server_lr: float = 1.0, *, raw_arrays: Iterable[str] = (), **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0; got {server_lr!r}")
        self.server_lr = float(server_lr)
        self.raw_arrays = frozenset(raw_arrays)
        self._global: dict[str, np.ndarray] | None = None  # the model sent this round
        self._spec: ArraySpec | None = None  # the model's arrays (round 1's: the clients' dtypes)
        #: round → sign agreement |Σᵢ ρᵢ sign(Δᵢ)| averaged over the sign-coded weights (1: unanimous, 0: split)
        self.agreement: dict[int, float] = {}

    # ------------------------------------------------------------------ Flower Strategy
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's dense downlink; remember the model the replies' updates are relative to."""
        self._global = {k: np.array(a.numpy(), copy=True) for k, a in arrays.items()}
        if self._spec is None:
            self._spec = spec_of(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """w + η · weighted mean of the scaled signs; raw buffers averaged (integers rounded)."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if self._global is None or self._spec is None:
            raise AggregationError("aggregate_train called before configure_train: the round's global model is unknown")
        # num-examples: a number (fedsparse's reply screen and Flower's checks above made sure)
        weights = [float(next(iter(m.content.metric_records.values()))[self.weighted_by_key]) for m in valid]  # type: ignore[arg-type]  # a number, see above
        total = sum(weights)
        if not total > 0:
            raise AggregationError(f"replies' {self.weighted_by_key!r} sum to {total}; cannot weight the average")
        shapes = {name: shape for name, (shape, _) in self._spec.items()}
        step = {n: np.zeros(shapes[n]) for n in shapes if n not in self.raw_arrays}  # Σ ρᵢ sᵢ sign(Δᵢ)
        vote = {n: np.zeros(shapes[n]) for n in step}  # Σ ρᵢ sign(Δᵢ)
        raw = {n: np.zeros(shapes[n]) for n in self.raw_arrays}  # Σ ρᵢ vᵢ
        for msg, w in zip(valid, weights):
            rho = w / total
            update = protocol.decode(msg.content.array_records[self.arrayrecord_key], self._spec)
            if set(update.raw) != self.raw_arrays:  # fedsparse's screen rejects these; Strategy.start does not
                raise AggregationError(
                    f"reply from node {msg.metadata.src_node_id} sends {sorted(update.raw)} raw, expected {sorted(self.raw_arrays)}"
                )
            for name, sign in update.signs.items():
                step[name] += (rho * update.scales[name]) * sign
                vote[name] += rho * sign
            for name, value in update.raw.items():
                raw[name] += rho * value
        new: dict[str, np.ndarray] = {}
        for name, x in self._global.items():
            if name in raw:
                new[name] = (np.rint(raw[name]) if x.dtype.kind in "iub" else raw[name]).astype(x.dtype)
            else:
                new[name] = (x.astype(np.float64) + self.server_lr * step[name]).astype(x.dtype)
        numel = sum(v.size for v in vote.values())
        self.agreement[server_round] = sum(float(np.abs(v).sum()) for v in vote.values()) / numel if numel else math.nan
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in new.items()}), metrics  # 0-d stays 0-d

    # ------------------------------------------------------------------ fedsparse hooks
    def validate_reply(self, server_round: int, msg: Message) -> str | None:
        """fedsparse's reply screen: one ArrayRecord that decodes (bit count, scales finite and
        ≥ 0, padding clear) to exactly the model's arrays, shapes and dtypes."""
        record = single_array_record(msg, self.arrayrecord_key)
        if isinstance(record, str):
            return record
        if self._spec is None:
            return "a reply before any train round was configured"
        try:
            update = protocol.decode(record, self._spec)
        except ValueError as err:
            return f"the sign payload does not decode ({err})"
        if set(update.raw) != self.raw_arrays:
            return f"arrays sent raw: {sorted(update.raw)}; expected the untrained ones, {sorted(self.raw_arrays)}"
        return check_arrays(update.tensors(self._spec), self._spec, what="decoded array", ordered=False)

    def round_report(self, server_round: int) -> dict[str, Any]:
        """``sign_agreement``: how much the round's clients agreed on the direction of each weight."""
        return {"sign_agreement": self.agreement.get(server_round, math.nan)}

    def final_report(self, out_dir: Path) -> dict[str, Any]:
        """The mean agreement over the run's aggregated rounds (resumed runs included: it is state)."""
        values = [v for v in self.agreement.values() if not math.isnan(v)]
        return {"mean_sign_agreement": sum(values) / len(values) if values else math.nan}

    def state_dict(self) -> dict[str, Any]:
        """The agreement history: what :meth:`final_report` needs from rounds before a resume."""
        return {"agreement": dict(self.agreement)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.agreement = {int(k): float(v) for k, v in dict(state.get("agreement", {})).items()}


def build(cfg: Mapping[str, Any]) -> FedAvgSigns:
    """The strategy from a resolved run configuration."""
    _, untrained = model_layout(cfg)
    return FedAvgSigns(float(cfg["sign-server-lr"]), raw_arrays=untrained, **sampling_kwargs(cfg))


METHOD = Method(
    name=NAME,
    summary="FedAvg with scaled-sign uplink (1 bit per weight + 1 float per tensor; example plug-in)",
    build=build,
    client_step="fedsparse_example_method.client:sign_train",
    keys=KEYS,
    checks=(check_server_lr,),
    error_cases=(
        ErrorCase("fedavg-signs: server step above √d of the smallest trained tensor", {"sign-server-lr": 10.0}),
    ),
)

__all__ = ["KEYS", "METHOD", "NAME", "FedAvgSigns", "build", "check_server_lr", "model_layout"]
