"""Robust aggregation rules, from Flower's own: the one place where decoded updates become one.

``aggregation = mean | median | trimmed-mean | krum | multikrum | bulyan`` picks the rule that
turns a round's updates into the new global model, under every method that supports it, and
``clip-norm`` (a number, or ``auto`` = the median of the round's update norms) bounds each update's
L2 norm first. Nothing here re-implements a rule: each is Flower's function
(``flwr.server.strategy.aggregate``: ``aggregate``, ``aggregate_median``, ``aggregate_trimmed_avg``,
``aggregate_krum``, ``aggregate_bulyan`` — the functions behind Flower's FedMedian,
FedTrimmedAvg, Krum, MultiKrum and Bulyan strategies) and the clipping is Flower's DP clipping
helper (``flwr.supercore.differential_privacy.clip_inputs_inplace``, the one its
``DifferentialPrivacy*FixedClipping`` wrappers use).

The rules act on **dense updates** Δ_i = x_i − x_t (the reply's model minus the model the round
sent): each method decodes its own payload first (codec, compressor, mask), so a median over
FedPAQ is a median over the dequantised updates, never over the codes. The result is
x_t + rule(Δ_1..Δ_n) in the model's dtypes. How methods reach it:

* strategies with fedsparse's hooks that average decoded payloads themselves (FedDIP, SNIP, the
  uplink compressors) call :meth:`AggregationRule.combine_models` or
  :meth:`AggregationRule.combine_updates` in place of their weighted mean;
* Flower's FedAvg family (FedAvg, FedProx, FedAdam, ...: the baselines, FedLUAR's and
  partial-update's base rule) gets :func:`with_rule`: the same strategy whose ``aggregate_train``
  first combines the replies with the rule and then lets the strategy's own aggregation (FedAdam's
  moments, ...) see that one combined model;
* wrappers (FedLUAR, partial-update) hand the rule to their base
  (:meth:`fedsparse.hooks.MethodHooks.use_aggregation`); a strategy that cannot take a rule
  refuses it with a :class:`~fedsparse.config.ConfigError` at configuration time.

With ``aggregation = "mean"`` and no ``clip-norm`` nothing is wrapped: every method aggregates
exactly as before (bit for bit).

At round time a rule that needs more replies than arrived (Krum / MultiKrum: 2f + 3, Bulyan:
4f + 3, with f = ``num-malicious``) falls back to Flower's coordinate-wise median and logs a
warning saying so; the configuration check refuses a ``clients-per-round`` too small for the rule.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.server.strategy.aggregate import (
    aggregate,
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

from fedsparse.config import AGGREGATIONS

log = logging.getLogger("fedsparse")
#: ``clip-norm = "auto"``: the bound is the median of the round's update norms
AUTO = "auto"


def min_replies_for(rule: str, num_malicious: int) -> int:
    """The fewest updates ``rule`` is defined on (Blanchard et al.: Krum needs n ≥ 2f + 3;
    El Mhamdi et al.: Bulyan n ≥ 4f + 3); 1 for the others."""
    if rule in ("krum", "multikrum"):
        return 2 * num_malicious + 3
    if rule == "bulyan":
        return 4 * num_malicious + 3
    return 1


def parse_clip_norm(text: str) -> float | str | None:
    """``clip-norm`` → None (off: ``""``), ``"auto"``, or a bound > 0; ValueError otherwise."""
    text = str(text).strip()
    if text == "":
        return None
    if text == AUTO:
        return AUTO
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"clip-norm = {text!r} is not valid; allowed: a finite number > 0, 'auto', or '' (off)")
    return value


@dataclass
class AggregationRule:
    """One of :data:`AGGREGATIONS` with its parameters (named as Flower's strategies name them:
    FedTrimmedAvg's ``beta``, Krum's ``num_malicious_nodes``, MultiKrum's ``num_nodes_to_select``)
    and an optional per-update norm bound. ``last`` describes the most recent combination
    (the clipping bound, how many updates were clipped, a fallback) for logs and reports."""

    name: str = "mean"
    trim_beta: float = 0.2
    num_malicious: int = 0
    krum_keep: int = 0  # MultiKrum's num_nodes_to_select; 0 = n − f
    clip_norm: float | str | None = None
    last: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.name not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.name!r}; choose one of: {', '.join(AGGREGATIONS)}")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ValueError(f"trim-beta = {self.trim_beta!r}; allowed: 0 <= trim-beta < 0.5")
        if self.num_malicious < 0 or self.krum_keep < 0:
            raise ValueError("num-malicious and krum-keep must be >= 0")
        if self.clip_norm is not None and self.clip_norm != AUTO:
            parse_clip_norm(str(self.clip_norm))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> AggregationRule:
        """The rule of a resolved run configuration (defaults where a key is absent)."""
        return cls(
            name=str(cfg.get("aggregation", "mean")),
            trim_beta=float(cfg.get("trim-beta", 0.2)),
            num_malicious=int(cfg.get("num-malicious", 0)),
            krum_keep=int(cfg.get("krum-keep", 0)),
            clip_norm=parse_clip_norm(str(cfg.get("clip-norm", ""))),
        )

    @property
    def is_plain_mean(self) -> bool:
        """The weighted mean without clipping: what every method does on its own."""
        return self.name == "mean" and self.clip_norm is None

    def describe(self) -> str:
        """``median``, ``krum (f = 2)``, ``trimmed-mean (beta = 0.2), clip-norm = auto``, ..."""
        detail = {
            "trimmed-mean": f" (beta = {self.trim_beta})",
            "krum": f" (f = {self.num_malicious})",
            "multikrum": f" (f = {self.num_malicious}, keep = {self.krum_keep or 'n - f'})",
            "bulyan": f" (f = {self.num_malicious})",
        }.get(self.name, "")
        clip = f", clip-norm = {self.clip_norm}" if self.clip_norm is not None else ""
        return f"{self.name}{detail}{clip}"

    # ------------------------------------------------------------------ the combination
    def combine_updates(
        self, updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
    ) -> dict[str, np.ndarray]:
        """rule(Δ_1..Δ_n) in float64, per array name (every update must carry the same names).

        ``weights`` (num-examples) matter to the mean and to MultiKrum's average of the kept
        updates; median, trimmed mean, Krum and Bulyan ignore them, as Flower's functions do.
        """
        if not updates:
            raise AggregationError("no updates to aggregate")
        names = list(updates[0])
        for i, u in enumerate(updates[1:], start=1):
            if list(u) != names and set(u) != set(names):
                raise AggregationError(f"update {i} carries arrays {sorted(u)}, update 0 {sorted(names)}")
        vectors = [[np.asarray(u[n], dtype=np.float64).copy() for n in names] for u in updates]
        self.last = {"aggregation": self.name, "updates": len(vectors)}
        if self.clip_norm is not None:
            self._clip(vectors)
        results: list[tuple[list[np.ndarray], float]] = list(zip(vectors, [float(w) for w in weights], strict=True))
        out = self._apply(results)
        return {n: np.asarray(a, dtype=np.float64) for n, a in zip(names, out, strict=True)}

    def combine_models(
        self,
        models: Sequence[Mapping[str, np.ndarray]],
        weights: Sequence[float],
        reference: Mapping[str, np.ndarray],
    ) -> dict[str, np.ndarray]:
        """x_t + rule(x_i − x_t): ``models`` are the decoded replies, ``reference`` the model the
        round sent; the result has the reference's dtypes (integer buffers rounded)."""
        names = list(models[0])
        missing = [n for n in names if n not in reference]
        if missing:
            raise AggregationError(f"replies carry arrays the round's model lacks: {missing}")
        updates = [
            {n: np.asarray(m[n], dtype=np.float64) - np.asarray(reference[n], dtype=np.float64) for n in names}
            for m in models
        ]
        combined = self.combine_updates(updates, weights)
        out = {}
        for n in names:
            ref = np.asarray(reference[n])
            x = ref.astype(np.float64) + combined[n]
            if ref.dtype.kind in "iub":
                x = np.rint(x)
            out[n] = np.ascontiguousarray(x.astype(ref.dtype))
        return out

    def _clip(self, vectors: list[list[np.ndarray]]) -> None:
        """Flower's FlatClip, in place, on every update: ‖Δ_i‖ ≤ C (C: the number, or the median
        of the round's norms for ``auto``)."""
        norms = [get_norm(v) for v in vectors]
        bound = float(np.median(norms)) if self.clip_norm == AUTO else float(self.clip_norm)  # type: ignore[arg-type]
        clipped = 0
        for v, norm in zip(vectors, norms):
            if norm > bound:
                clipped += 1
                if bound > 0:
                    clip_inputs_inplace(v, bound)
                else:  # every update of the round is zero or the median is: nothing to move by
                    for a in v:
                        a *= 0.0
        self.last.update(clip_bound=bound, clipped=clipped)

    def _apply(self, results: list[tuple[list[np.ndarray], float]]) -> list[np.ndarray]:
        n, f = len(results), self.num_malicious
        name = self.name
        need = min_replies_for(name, f)
        if n < need:
            log.warning(
                "aggregation %s needs at least %d updates (f = num-malicious = %d), the round has %d: "
                "the coordinate-wise median is used instead",
                name,
                need,
                f,
                n,
            )
            self.last["fallback"] = "median"
            name = "median"
        if name == "mean":
            return aggregate(results)  # type: ignore[arg-type]  # Flower types the weight as int; any number works
        if name == "median":
            return aggregate_median(results)  # type: ignore[arg-type]
        if name == "trimmed-mean":
            return aggregate_trimmed_avg(results, self.trim_beta)  # type: ignore[arg-type]
        if name == "krum":
            return aggregate_krum(results, f, 0)  # type: ignore[arg-type]
        if name == "multikrum":
            keep = min(self.krum_keep or n - f, n)
            return aggregate_krum(results, f, keep)  # type: ignore[arg-type]
        # bulyan: Flower's, with Krum as its selection rule (it consumes the list it is given)
        return aggregate_bulyan(list(results), f, aggregate_krum, to_keep=0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- Flower's FedAvg family
class RuleAggregation:
    """Mixin for Flower's FedAvg family (see :func:`with_rule`): the replies (plain models) are
    combined with :attr:`aggregation_rule` against the model the round sent, and the strategy's
    own ``aggregate_train`` then sees that one combined model (weighted by the replies' total
    ``num-examples``, with their aggregated metrics) — FedAvg returns it as it is, FedAdam /
    FedYogi / FedAvgM take their step from it."""

    aggregation_rule: AggregationRule
    _rule_reference: dict[str, np.ndarray] | None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Any) -> Iterable[Message]:
        self._rule_reference = {k: np.array(a.numpy(), copy=True) for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        base: Any = super()
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)  # type: ignore[attr-defined]
        if not valid:
            return base.aggregate_train(server_round, [])
        if getattr(self, "_rule_reference", None) is None:
            raise AggregationError("aggregate_train before configure_train: the round's model is unknown")
        key, by = self.arrayrecord_key, self.weighted_by_key  # type: ignore[attr-defined]
        models = [{k: a.numpy() for k, a in m.content[key].items()} for m in valid]
        weights = [float(next(iter(m.content.metric_records.values()))[by]) for m in valid]
        combined = self.aggregation_rule.combine_models(models, weights, self._rule_reference)  # type: ignore[arg-type]
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], by)  # type: ignore[attr-defined]
        merged = MetricRecord({**dict(metrics.items()), by: sum(weights)})
        one = Message(
            content=RecordDict({key: ArrayRecord({k: Array(v) for k, v in combined.items()}), "metrics": merged}),
            dst_node_id=valid[0].metadata.src_node_id,
            message_type=MessageType.TRAIN,
        )
        arrays, _ = base.aggregate_train(server_round, [one])
        return arrays, metrics


_RULE_CLASSES: dict[type, type] = {}


def with_rule(strategy: Strategy, rule: AggregationRule) -> Strategy:
    """``strategy`` (Flower's FedAvg or a subclass: FedProx, FedAdam, FedYogi, FedAvgM, ...) with
    its replies combined by ``rule`` first; the same object when ``rule`` is the plain mean.

    The result is an instance of a subclass of the strategy's own class (``isinstance`` checks and
    every attribute, Flower's state included, stay as they were), so wrappers that read their base's
    attributes (FedLUAR, partial-update) keep working. Anything that is not in the FedAvg family
    is refused: its replies are not known to be plain models.
    """
    if rule.is_plain_mean:
        return strategy
    if isinstance(strategy, RuleAggregation):
        strategy.aggregation_rule = rule
        return strategy
    if not isinstance(strategy, FedAvg):
        raise TypeError(
            f"{type(strategy).__name__} is not in Flower's FedAvg family, so its replies are not known to be plain models"
        )
    cls = type(strategy)
    sub = _RULE_CLASSES.get(cls)
    if sub is None:
        sub = _RULE_CLASSES[cls] = type(f"{cls.__name__}WithRule", (RuleAggregation, cls), {"__module__": __name__})
    out: Any = object.__new__(sub)
    out.__dict__.update(vars(strategy))
    out.aggregation_rule = rule
    out._rule_reference = None
    return out


def apply_rule(strategy: Strategy, rule: AggregationRule) -> Strategy:
    """The strategy to run with ``rule``: ``strategy`` itself for the plain mean; a strategy with
    fedsparse's hooks takes the rule through :meth:`~fedsparse.hooks.MethodHooks.use_aggregation`
    (which refuses with a ConfigError when it cannot); Flower's FedAvg family through
    :func:`with_rule`; anything else is refused."""
    from fedsparse.config import ConfigError
    from fedsparse.hooks import MethodHooks

    if rule.is_plain_mean:
        return strategy
    if isinstance(strategy, MethodHooks):
        return strategy.use_aggregation(rule)
    try:
        return with_rule(strategy, rule)
    except TypeError as err:
        raise ConfigError(
            f"aggregation = {rule.describe()!r}: {err}; allowed: aggregation = 'mean' without clip-norm"
        ) from err


__all__ = [
    "AGGREGATIONS",
    "AUTO",
    "AggregationRule",
    "RuleAggregation",
    "apply_rule",
    "min_replies_for",
    "parse_clip_norm",
    "with_rule",
]
