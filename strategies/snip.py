"""SNIP one-shot pruning at initialisation (Lee, Ajanthan & Torr, "SNIP: Single-shot Network Pruning
based on Connection Sensitivity", ICLR 2019), federated, with a static mask at the target sparsity.

Before the first round's training, the strategy asks the round's sampled clients for SNIP's
connection sensitivity of the initial weights, s_j = |∂L/∂w_j · w_j| (normalised to sum to 1, summed
over ``snip-batches`` local mini-batches; Lee et al. use one batch), averages the clients' saliencies
weighted by their example counts, and keeps the (1 − ``target-sparsity``) fraction of the prunable
weights (conv / linear weights, pooled over the model, as in the paper) with the largest saliency.
That mask never changes. From then on the model travels sparse both ways through
:mod:`fedsparse.codec` (kept values + bitmap/varint index), clients train with pruned weights frozen
at zero (:class:`clients.compression.masked_training`), and the server averages the sparse models.

The saliency exchange is a real pair of messages sent from ``configure_train`` of round 1 (dense
initial model down, dense saliency of the prunable tensors up); the grid meters it, so its bytes are
part of round 1's figures. Where the paper computes the saliency on one batch of the (centralised)
training set, here it is computed on the clients' own data: the server holds none.

Works in ``Strategy.start`` in any deployment whose ClientApp runs :func:`clients.compression.snip_train`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAvg

from clients import compression as cc
from fedsparse import codec
from fedsparse.config import SCHEMA, Config, ConfigError, Key, cross_check, register_keys
from fedsparse.masks import global_magnitude_masks, prunable_names
from strategies.registry import register_strategy, sampling_kwargs

try:  # ``target-sparsity`` means the same for FedDIP (its s_p): share its definition when present
    import strategies.feddip  # noqa: F401
except ImportError:  # pragma: no cover - FedDIP absent
    pass
if "target-sparsity" not in SCHEMA:  # pragma: no cover - only without FedDIP
    register_keys("snip", {"target-sparsity": Key(0.9, "sparsity of the pruned model (prunable weights)", minimum=0.0, maximum=1.0)})
register_keys(
    "snip",
    {
        "snip-batches": Key(1, "SNIP: local mini-batches each client sums its saliency over (paper: 1)", minimum=1),
    },
)


@cross_check
def _check_snip(cfg: Config) -> None:
    if cfg["strategy"] != "snip":
        return
    if not float(cfg["target-sparsity"]) < 1.0:
        raise ConfigError(f"target-sparsity = {cfg['target-sparsity']!r} prunes every weight; allowed: 0 <= target-sparsity < 1")


def _weighted_mean(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    acc = np.zeros(arrays[0].shape, dtype=np.float64)
    for x, w in zip(arrays, weights):
        acc += w * np.asarray(x, dtype=np.float64)
    dtype = arrays[0].dtype
    return (np.rint(acc) if dtype.kind in "iub" else acc).astype(dtype)


class SNIP(FedAvg):
    """Federated SNIP (see the module docstring).

    Parameters
    ----------
    target_sparsity : fraction of the prunable weights pruned, 0 ≤ s < 1.
    saliency_batches : mini-batches per client for the saliency (sent to clients as ``snip-batches``).
    exclude_shortcuts : keep ResNet 1×1 shortcut convolutions dense (:func:`fedsparse.masks.prunable_names`).
    saliency_timeout : seconds to wait for the saliency replies (None: wait for all).
    """

    def __init__(
        self,
        target_sparsity: float = 0.9,
        *,
        saliency_batches: int = 1,
        exclude_shortcuts: bool = True,
        saliency_timeout: float | None = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if not 0.0 <= float(target_sparsity) < 1.0:
            raise ValueError(f"target_sparsity must lie in [0, 1); got {target_sparsity!r}")
        if int(saliency_batches) < 1:
            raise ValueError(f"saliency_batches must be >= 1; got {saliency_batches!r}")
        self.target_sparsity = float(target_sparsity)
        self.saliency_batches = int(saliency_batches)
        self.exclude_shortcuts = bool(exclude_shortcuts)
        self.saliency_timeout = saliency_timeout
        self.masks: dict[str, np.ndarray] | None = None
        self.prunable: list[str] = []
        self.saliency_clients = 0
        self._global: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------ the one-shot mask
    def _compute_masks(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> None:
        self.prunable = prunable_names(arrays.to_torch_state_dict(), exclude_shortcuts=self.exclude_shortcuts)
        if not self.prunable:
            raise ValueError("SNIP found no prunable tensors (conv/linear weights with ndim > 1) in the model")
        ask = ConfigRecord(
            {
                **dict(config.items()),
                cc.CFG_SNIP_PHASE: "saliency",
                cc.CFG_SNIP_PRUNABLE: list(self.prunable),
                cc.CFG_SNIP_BATCHES: self.saliency_batches,
            }
        )
        messages = list(super().configure_train(server_round, arrays, ask, grid))
        replies = [m for m in grid.send_and_receive(messages, timeout=self.saliency_timeout) if not m.has_error()]
        if not replies:
            raise RuntimeError("SNIP: no client answered the saliency request; cannot build the mask")
        weights = [float(next(iter(m.content.metric_records.values()))[self.weighted_by_key]) for m in replies]
        total = sum(weights)
        saliency = {}
        for name in self.prunable:
            parts = [np.asarray(m.content[self.arrayrecord_key][name].numpy(), dtype=np.float64) for m in replies]
            saliency[name] = torch.from_numpy(sum((w / total) * p for w, p in zip(weights, parts)))
        masks = global_magnitude_masks(saliency, self.target_sparsity)
        self.masks = {n: m.numpy().copy() for n, m in masks.items()}
        self.saliency_clients = len(replies)

    def _masked(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.masks is not None
        return {
            n: np.ascontiguousarray(np.where(self.masks[n], x, np.zeros((), x.dtype)) if n in self.masks else x)
            for n, x in tensors.items()
        }

    # ------------------------------------------------------------------ Flower Strategy
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """On the first call compute the mask; then send the pruned model through the codec."""
        if self.masks is None:
            self._compute_masks(server_round, arrays, config, grid)
        assert self.masks is not None
        self._global = self._masked({k: a.numpy() for k, a in arrays.items()})
        payload = codec.encode(self._global, {n: self.masks[n] for n in self.prunable})
        round_config = ConfigRecord(
            {**dict(config.items()), cc.CFG_SNIP_PHASE: "train", cc.CFG_SNIP_PRUNABLE: list(self.prunable)}
        )
        return super().configure_train(server_round, codec.to_array_record(payload), round_config, grid)

    def validate_reply(self, server_round: int, msg: Message) -> str | None:
        """fedsparse's reply screen: the codec payload decodes to the model's arrays, finite, and
        nothing outside the mask is set."""
        from strategies.compression import check_decoded

        records = msg.content.array_records
        if list(records) != [self.arrayrecord_key]:
            return f"expected exactly one ArrayRecord named {self.arrayrecord_key!r}, found {sorted(records)}"
        try:
            tensors, _ = codec.decode(codec.from_array_record(records[self.arrayrecord_key]))
        except (ValueError, KeyError, TypeError) as err:
            return f"the sparse model does not decode ({err})"
        if self._global is None or self.masks is None:
            return None
        problem = check_decoded(tensors, {k: (x.shape, x.dtype.str) for k, x in self._global.items()})
        if problem is None:
            outside = [n for n in self.prunable if np.any(tensors[n][~self.masks[n]])]
            if outside:
                return f"weights outside the SNIP mask are set in {', '.join(outside)}"
        return problem

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the sparse models, average them (weighted), keep the mask; return the dense model."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if self._global is None:
            raise AggregationError("aggregate_train called before configure_train")
        decoded, weights = [], []
        for msg in valid:
            tensors, _ = codec.decode(codec.from_array_record(msg.content[self.arrayrecord_key]))
            if set(tensors) != set(self._global):
                raise AggregationError(
                    f"reply from node {msg.metadata.src_node_id} carries {sorted(tensors)}, expected {sorted(self._global)}"
                )
            decoded.append(tensors)
            weights.append(float(next(iter(msg.content.metric_records.values()))[self.weighted_by_key]))
        total = sum(weights)
        rho = [w / total for w in weights]
        self._global = self._masked({n: _weighted_mean([d[n] for d in decoded], rho) for n in self._global})
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return ArrayRecord({n: Array(x) for n, x in self._global.items()}), metrics

    # ------------------------------------------------------------------ reports and state
    def measured_sparsity(self) -> float:
        """Fraction of exact zeros over the prunable tensors of the global model."""
        if self._global is None or not self.prunable:
            return math.nan
        zeros = sum(int(np.count_nonzero(self._global[n] == 0)) for n in self.prunable)
        return zeros / sum(self._global[n].size for n in self.prunable)

    def mask_sparsity(self) -> float:
        if self.masks is None:
            return math.nan
        total = sum(m.size for m in self.masks.values())
        return 1.0 - sum(int(m.sum()) for m in self.masks.values()) / total

    def round_report(self, server_round: int) -> dict[str, Any]:
        return {"sparsity": self.measured_sparsity(), "mask_sparsity": self.mask_sparsity()}

    def layer_table(self) -> list[dict[str, Any]]:
        """Per prunable tensor: size, kept weights and sparsity of the SNIP mask."""
        if self.masks is None:
            return []
        return [
            {"layer": n, "numel": int(self.masks[n].size), "kept": int(self.masks[n].sum()),
             "sparsity": 1.0 - float(self.masks[n].mean())}
            for n in self.prunable
        ]

    def final_report(self, out_dir: str | Path) -> dict[str, Any]:
        """``snip_layer_sparsity.csv`` and the headline sparsity figures."""
        import pandas as pd

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(self.layer_table()).to_csv(out_dir / "snip_layer_sparsity.csv", index=False)
        return {
            "final_sparsity": self.measured_sparsity(),
            "final_mask_sparsity": self.mask_sparsity(),
            "snip_saliency_clients": self.saliency_clients,
            "layer_sparsity": {r["layer"]: r["sparsity"] for r in self.layer_table()},
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "target_sparsity": self.target_sparsity,
            "masks": None if self.masks is None else {n: m.copy() for n, m in self.masks.items()},
            "prunable": list(self.prunable),
            "saliency_clients": self.saliency_clients,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if float(state["target_sparsity"]) != self.target_sparsity:
            raise ValueError(f"state has target_sparsity {state['target_sparsity']}, this strategy {self.target_sparsity}")
        masks = state.get("masks")
        self.masks = None if masks is None else {n: np.asarray(m, dtype=bool).copy() for n, m in masks.items()}
        self.prunable = list(state.get("prunable", []))
        self.saliency_clients = int(state.get("saliency_clients", 0))
        self._global = None


@register_strategy("snip", "SNIP (Lee et al. 2019): one-shot pruning at initialisation, static mask, sparse both ways")
def _snip(cfg: Mapping[str, Any]) -> SNIP:
    return SNIP(
        float(cfg["target-sparsity"]),
        saliency_batches=int(cfg["snip-batches"]),
        saliency_timeout=float(cfg["round-timeout"]),
        **sampling_kwargs(cfg),
    )


__all__ = ["SNIP"]
