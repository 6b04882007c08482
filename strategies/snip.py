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
part of round 1's figures. Its replies bypass the round loop's reply screen, so the strategy screens
them itself (:meth:`SNIP.check_saliency`: the prunable tensors, finite, ≥ 0, normalised, a valid
``num-examples``), drops bad ones with a logged reason (counted in round 1's ``saliency_rejected``
/ ``saliency_failures`` columns) and adds the rest in partition order, so the mask is reproducible.
Where the paper computes the saliency on one batch of the (centralised) training set, here it is
computed on the clients' own data: the server holds none.

Works in ``Strategy.start`` in any deployment whose ClientApp runs :func:`clients.compression.snip_train`.
"""

from __future__ import annotations

import logging
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

from fedsparse import codec
from fedsparse.aggregation import weighted_mean
from fedsparse.checkpoint import atomic_write
from fedsparse.config import Config, ConfigError, Key
from fedsparse.hooks import MethodHooks
from fedsparse.masks import global_magnitude_masks, prunable_names
from fedsparse.methods import ErrorCase, Method, sampling_kwargs
from fedsparse.protocol import STANDARD_REPLY_METRICS, single_array_record
from fedsparse.protocol.snip import CFG_SNIP_BATCHES, CFG_SNIP_PHASE, CFG_SNIP_PRUNABLE
from fedsparse.robust import AggregationRule
from fedsparse.validation import check_arrays, check_num_examples, spec_of

# ``target-sparsity`` means the same for FedDIP (its s_p): FedDIP registers it, SNIP shares it; and
# the weighted average Σ ρ_n x_n (float64, cast back, integers rounded) is FedDIP's.

log = logging.getLogger("fedsparse")

#: A saliency reply is normalised to sum to 1 (or is all zero): tolerated deviation of its sum.
SALIENCY_SUM_TOLERANCE = 1e-3

#: SNIP's own configuration keys (its sparsity is FedDIP's ``target-sparsity``: ``uses`` FedDIP's keys).
KEYS: dict[str, Key] = {
    "snip-batches": Key(1, "SNIP: local mini-batches each client sums its saliency over (paper: 1)", minimum=1),
}


def check_snip(cfg: Config) -> None:
    """A sparsity that leaves weights to train."""
    if not float(cfg["target-sparsity"]) < 1.0:
        raise ConfigError(
            f"target-sparsity = {cfg['target-sparsity']!r} prunes every weight; allowed: 0 <= target-sparsity < 1"
        )


class SNIP(FedAvg, MethodHooks):
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
        self.saliency_clients = 0  # saliency replies the mask was built from
        self.saliency_rejected = 0  # saliency replies dropped as invalid (logged with the reason)
        self.saliency_failures = 0  # saliency requests answered with an error or not at all
        self.saliency_round: int | None = None  # the round whose configure_train built the mask
        self._global: dict[str, np.ndarray] | None = None
        self.aggregation: AggregationRule | None = None  # None: the weighted mean (use_aggregation)

    def use_aggregation(self, rule: AggregationRule) -> SNIP:
        """Combine the decoded sparse replies with ``rule`` (:mod:`fedsparse.robust`) in place of the
        weighted mean; the mask then applies to its result as to the mean."""
        self.aggregation = None if rule.is_plain_mean else rule
        return self

    # ------------------------------------------------------------------ the one-shot mask
    def check_saliency(self, msg: Message, spec: Mapping[str, tuple[tuple[int, ...], str]]) -> str | None:
        """None when a saliency reply may enter the mask, else why not: one ArrayRecord holding
        exactly the prunable tensors (the model's shapes and dtypes, finite, ≥ 0, summing to 1 as
        the client normalises them, or all zero) and a valid ``num-examples``."""
        metric_records = msg.content.metric_records
        if not metric_records:
            return "no MetricRecord in the reply"
        metrics = next(iter(metric_records.values()))
        if self.weighted_by_key not in metrics:
            return f"no {self.weighted_by_key!r} in the reply's metrics"
        problem = check_num_examples(metrics[self.weighted_by_key], None)
        if problem:
            return problem
        record = single_array_record(msg, self.arrayrecord_key)
        if isinstance(record, str):
            return record
        problem = check_arrays(record, spec, what="saliency tensor")
        if problem:
            return problem
        parts = {n: record[n].numpy() for n in spec}
        negative = [n for n, x in parts.items() if (x < 0).any()]
        if negative:
            return f"saliency {negative[0]!r} has negative entries (|∂L/∂w ⊙ w| is >= 0)"
        total = float(sum(float(np.sum(x, dtype=np.float64)) for x in parts.values()))
        if total != 0.0 and abs(total - 1.0) > SALIENCY_SUM_TOLERANCE:
            return f"the saliencies sum to {total!r}, not 1 (clients normalise them)"
        return None

    def _compute_masks(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> None:
        self.prunable = prunable_names(arrays.to_torch_state_dict(), exclude_shortcuts=self.exclude_shortcuts)
        if not self.prunable:
            raise ValueError("SNIP found no prunable tensors (conv/linear weights with ndim > 1) in the model")
        ask = ConfigRecord(
            {
                **dict(config.items()),
                CFG_SNIP_PHASE: "saliency",
                CFG_SNIP_PRUNABLE: list(self.prunable),
                CFG_SNIP_BATCHES: self.saliency_batches,
            }
        )
        messages = list(super().configure_train(server_round, arrays, ask, grid))
        replies = list(grid.send_and_receive(messages, timeout=self.saliency_timeout))
        # Replies arrive in any order and float sums are reproducible only in a fixed one: the
        # grid's partition order when it knows it (fedsparse's metered grid), else node ids.
        in_order = getattr(grid, "in_partition_order", None)
        replies = (
            list(in_order(replies)) if callable(in_order) else sorted(replies, key=lambda m: m.metadata.src_node_id)
        )
        partition_of = getattr(grid, "partition_of", None)

        def sender(msg: Message) -> str:
            node = msg.metadata.src_node_id
            pid = partition_of.get(node) if isinstance(partition_of, Mapping) else None
            return f"partition {pid} (node {node})" if pid is not None else f"node {node}"

        spec = {n: s for n, s in spec_of(arrays).items() if n in set(self.prunable)}
        valid: list[Message] = []
        failures = len(messages) - len(replies)
        rejected = 0
        for msg in replies:
            if msg.has_error():
                failures += 1
                log.warning("SNIP round %d: no saliency from %s: %s", server_round, sender(msg), msg.error.reason)
                continue
            try:
                problem = self.check_saliency(msg, spec)
            except Exception as err:  # noqa: BLE001 - a reply that breaks a check is dropped, not fatal
                problem = f"the reply could not be checked ({type(err).__name__}: {err})"
            if problem is not None:
                rejected += 1
                log.warning("SNIP round %d: dropped the saliency of %s: %s", server_round, sender(msg), problem)
                continue
            valid.append(msg)
        self.saliency_clients, self.saliency_rejected, self.saliency_failures = len(valid), rejected, failures
        self.saliency_round = server_round
        if rejected or failures:
            log.warning(
                "SNIP round %d: the mask is built from %d saliency replies (%d dropped as invalid, %d failed or missing)",
                server_round,
                len(valid),
                rejected,
                failures,
            )
        if not valid:
            raise RuntimeError(
                f"SNIP: no valid saliency reply ({len(messages)} asked, {rejected} invalid, {failures} failed or missing); "
                "cannot build the mask"
            )
        weights = [float(next(iter(m.content.metric_records.values()))[self.weighted_by_key]) for m in valid]
        total = sum(weights)
        if not total > 0:
            raise RuntimeError(
                f"SNIP: the saliency replies' {self.weighted_by_key!r} sum to {total}; cannot weight them"
            )
        rho = [w / total for w in weights]
        saliency = {}
        for name in self.prunable:
            parts = [np.asarray(m.content[self.arrayrecord_key][name].numpy(), dtype=np.float64) for m in valid]
            saliency[name] = torch.from_numpy(weighted_mean(parts, rho))
        if not sum(float(s.sum()) for s in saliency.values()) > 0:
            raise RuntimeError("SNIP: the averaged saliency is zero everywhere; cannot rank the weights")
        masks = global_magnitude_masks(saliency, self.target_sparsity)
        self.masks = {n: m.numpy().copy() for n, m in masks.items()}

    def _masked(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.masks is not None
        return {
            n: np.asarray(np.where(self.masks[n], x, np.zeros((), x.dtype)) if n in self.masks else x, order="C")
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
            {**dict(config.items()), CFG_SNIP_PHASE: "train", CFG_SNIP_PRUNABLE: list(self.prunable)}
        )
        return super().configure_train(server_round, codec.to_array_record(payload), round_config, grid)

    def validate_reply(self, server_round: int, msg: Message) -> str | None:
        """fedsparse's reply screen: the codec payload decodes to the model's arrays, finite, and
        nothing outside the mask is set."""
        record = single_array_record(msg, self.arrayrecord_key)
        if isinstance(record, str):
            return record
        try:
            tensors, _ = codec.decode(codec.from_array_record(record))
        except (ValueError, KeyError, TypeError) as err:
            return f"the sparse model does not decode ({err})"
        if self._global is None or self.masks is None:
            return None
        problem = check_arrays(tensors, {k: (x.shape, x.dtype.str) for k, x in self._global.items()})
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
        if self.aggregation is None:
            total = sum(weights)
            rho = [w / total for w in weights]
            self._global = self._masked({n: weighted_mean([d[n] for d in decoded], rho) for n in self._global})
        else:  # the decoded sparse models, combined by the robust rule against the model sent
            self._global = self._masked(self.aggregation.combine_models(decoded, weights, self._global))
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
        """rounds.csv columns: measured and mask sparsity; in the round that built the mask also the
        saliency exchange's replies used, dropped as invalid, and failed or missing (the round's own
        ``failures`` / ``rejected`` count its train exchange only)."""
        row: dict[str, Any] = {"sparsity": self.measured_sparsity(), "mask_sparsity": self.mask_sparsity()}
        if server_round == self.saliency_round:
            row.update(
                saliency_replies=self.saliency_clients,
                saliency_rejected=self.saliency_rejected,
                saliency_failures=self.saliency_failures,
            )
        return row

    def layer_table(self) -> list[dict[str, Any]]:
        """Per prunable tensor: size, kept weights and sparsity of the SNIP mask."""
        if self.masks is None:
            return []
        return [
            {
                "layer": n,
                "numel": int(self.masks[n].size),
                "kept": int(self.masks[n].sum()),
                "sparsity": 1.0 - float(self.masks[n].mean()),
            }
            for n in self.prunable
        ]

    def final_report(self, out_dir: str | Path) -> dict[str, Any]:
        """``snip_layer_sparsity.csv`` and the headline sparsity figures."""
        import pandas as pd

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / "snip_layer_sparsity.csv", pd.DataFrame(self.layer_table()).to_csv(index=False))
        return {
            "final_sparsity": self.measured_sparsity(),
            "final_mask_sparsity": self.mask_sparsity(),
            "snip_saliency_clients": self.saliency_clients,
            "snip_saliency_rejected": self.saliency_rejected,
            "snip_saliency_failures": self.saliency_failures,
            "layer_sparsity": {r["layer"]: r["sparsity"] for r in self.layer_table()},
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "target_sparsity": self.target_sparsity,
            "masks": None if self.masks is None else {n: m.copy() for n, m in self.masks.items()},
            "prunable": list(self.prunable),
            "saliency_clients": self.saliency_clients,
            "saliency_rejected": self.saliency_rejected,
            "saliency_failures": self.saliency_failures,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if float(state["target_sparsity"]) != self.target_sparsity:
            raise ValueError(
                f"state has target_sparsity {state['target_sparsity']}, this strategy {self.target_sparsity}"
            )
        masks = state.get("masks")
        self.masks = None if masks is None else {n: np.asarray(m, dtype=bool).copy() for n, m in masks.items()}
        self.prunable = list(state.get("prunable", []))
        self.saliency_clients = int(state.get("saliency_clients", 0))
        self.saliency_rejected = int(state.get("saliency_rejected", 0))
        self.saliency_failures = int(state.get("saliency_failures", 0))
        self._global = None


def build_snip(cfg: Mapping[str, Any]) -> SNIP:
    """SNIP from the run configuration."""
    return SNIP(
        float(cfg["target-sparsity"]),
        saliency_batches=int(cfg["snip-batches"]),
        saliency_timeout=float(cfg["round-timeout"]),
        **sampling_kwargs(cfg),
    )


METHOD = Method(
    reply_metrics=STANDARD_REPLY_METRICS,
    name="snip",
    summary="SNIP (Lee et al. 2019): one-shot pruning at initialisation, static mask, sparse both ways",
    build=build_snip,
    client_step="clients.compression:snip_train",
    keys=KEYS,
    uses=("feddip",),
    checks=(check_snip,),
    error_cases=(ErrorCase("SNIP: target sparsity 1", {"target-sparsity": 1.0}),),
)

__all__ = ["SNIP", "METHOD", "KEYS", "build_snip"]
