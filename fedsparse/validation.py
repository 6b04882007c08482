"""Screening of train replies before they reach a strategy's aggregation.

One client with a diverged model (NaN), a bug (wrong shapes), or bad intent must not corrupt the
global model. The round loop (:mod:`fedsparse.server`) passes every reply through
:class:`ReplyScreen` before ``strategy.aggregate_train``; a rejected reply is logged with its reason,
counted in the ``rejected`` column of ``rounds.csv`` and never aggregated.

Every reply gets the **universal checks** (they hold for any strategy following the conventions in
``docs/architecture.md``):

* exactly one MetricRecord, named ``metrics``, whose values are finite; ``num-examples`` is an int
  or float, > 0 and at most the client's partition size (``max-examples``, by default the largest
  partition of the split, when the partition is not known);
* every floating-point array in every ArrayRecord decodes and is finite, holds no value larger in
  magnitude than the ``reply-max-abs`` bound (1e6 by default: a finite but huge reply would pass
  the finiteness check and turn FedAvg's average into garbage, or blow up FedAdam's second moment
  so that the adaptive step is ~0 for the rest of the run), and holds the shape and dtype its
  ``Array`` declares.

Then the **content check**: the strategy's own hook ``validate_reply(server_round, msg) -> str |
None`` (None = accept, a string = the reason to reject) when it has fedsparse's hooks
(:class:`fedsparse.hooks.MethodHooks`) — strategies whose replies
are not plain models (codec-packed sparse updates, omitted layers, extra records) must define it,
usually with :func:`check_arrays` / :func:`check_finite` on what they decode. Flower's own
strategies (FedAvg, FedProx, FedAdam, ...) get the **generic model check** instead: exactly one
ArrayRecord, ``arrays``, holding exactly the model's arrays, in the model's order, with the model's
shapes and dtypes. (Order matters: Flower's aggregation takes the first reply's key order and
FedAvgM pairs arrays by position; :func:`check_arrays` checks it for every ArrayRecord.)
Custom strategies without the hook get the universal checks only (logged once).

Finally the **metric keys**. Flower's aggregation needs the same keys in every reply (it raises
``InconsistentMessageReplies`` otherwise). A method declares the keys of its train replies
(:attr:`fedsparse.methods.Method.reply_metrics`, besides ``num-examples``): a reply with a key
outside that schema, or without one of its keys, is **rejected** — whatever the other replies of
the round carry, so colluding clients that add a key reject only themselves (the majority rule this
replaced let them get an honest reply rejected). For a strategy whose method declares nothing (a
plug-in that predates the schema), the keys that not every accepted reply carries are **dropped**
from the replies that carry them (a copy; logged): nobody is rejected for them, and nothing a
client adds reaches the aggregate.

Dtypes are compared with the **model's** dtypes (the arrays of round 1, i.e. the clients'
``state_dict()``), never with aggregated globals: Flower's ``aggregate_arrayrecords`` turns integer
buffers such as BatchNorm's ``num_batches_tracked`` into float64.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedsparse.arrays import to_numpy
from fedsparse.hooks import MethodHooks
from fedsparse.protocol import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES, single_array_record

log = logging.getLogger("fedsparse")

#: name → (shape, dtype string) of every array a reply must carry.
ArraySpec = dict[str, tuple[tuple[int, ...], str]]


__all__ = [
    "ArraySpec",
    "ReplyScreen",
    "Screened",
    "spec_of",
    "check_arrays",
    "check_finite",
    "check_magnitude",
    "check_num_examples",
    "universal_check",
    "model_reply_check",
    "is_flower_strategy",
]


def spec_of(arrays: ArrayRecord | Mapping[str, Any]) -> ArraySpec:
    """The (shape, dtype) of every named array (an ArrayRecord or numpy / torch arrays)."""
    out: ArraySpec = {}
    for name, arr in arrays.items():
        x = arr.numpy() if hasattr(arr, "numpy") and not isinstance(arr, np.ndarray) else np.asarray(arr)
        out[str(name)] = (tuple(int(d) for d in x.shape), np.dtype(x.dtype).str)
    return out


def _decode(record: ArrayRecord, key: str) -> tuple[np.ndarray | None, str | None]:
    """An Array's ndarray, or the reason it cannot be trusted (undecodable, lying about its shape)."""
    arr = record[key]
    try:
        x = to_numpy(arr)
    except Exception as err:  # noqa: BLE001 - any corrupt buffer is a rejection, not a crash
        return None, f"array {key!r} does not decode ({type(err).__name__}: {err})"
    if not isinstance(x, np.ndarray):
        return None, f"array {key!r} decodes to {type(x).__name__}, not an ndarray"
    declared = tuple(int(d) for d in arr.shape)
    if declared != tuple(x.shape):
        return None, f"array {key!r} declares shape {declared} but holds {tuple(x.shape)}"
    try:
        declared_dtype = np.dtype(str(arr.dtype))
    except TypeError:
        declared_dtype = None
    if declared_dtype != x.dtype:
        return None, f"array {key!r} declares dtype {arr.dtype} but holds {x.dtype}"
    return x, None


def check_finite(tensors: Mapping[str, np.ndarray], what: str = "array") -> str | None:
    """None when every floating-point tensor is finite; else which one holds NaN / inf."""
    for name, x in tensors.items():
        x = np.asarray(x)
        if x.dtype.kind in "fc" and not np.isfinite(x).all():
            kind = "NaN" if np.isnan(x).any() else "inf"
            return f"{what} {name!r} contains {kind}"
    return None


def check_magnitude(tensors: Mapping[str, np.ndarray], bound: float | None, what: str = "array") -> str | None:
    """None when no floating-point value exceeds ``bound`` in magnitude (None or 0: no bound)."""
    if not bound:
        return None
    for name, x in tensors.items():
        x = np.asarray(x)
        if x.dtype.kind == "f" and x.size:
            largest = max(abs(float(x.max())), abs(float(x.min())))  # no |x| copy of the array
        elif x.dtype.kind == "c" and x.size:
            largest = float(np.max(np.abs(x)))
        else:
            continue
        if largest > bound:
            return f"{what} {name!r} holds |x| = {largest:.3g} > reply-max-abs = {bound:g}"
    return None


def check_arrays(
    arrays: ArrayRecord | Mapping[str, np.ndarray],
    spec: Mapping[str, tuple[tuple[int, ...], str]],
    *,
    omit: Iterable[str] = (),
    what: str = "array",
    ordered: bool | None = None,
) -> str | None:
    """None when ``arrays`` holds exactly the arrays of ``spec`` minus ``omit``, each with its shape
    and dtype and finite; else the first problem found (missing / unexpected / out of order / shape /
    dtype / NaN).

    Takes an ArrayRecord (decoded here, corrupt buffers rejected) or already decoded tensors (e.g.
    what a strategy's codec produced). ``ordered`` (default: True for an ArrayRecord) also requires
    the arrays in ``spec``'s order: Flower's aggregation gives the global model the first reply's
    key order, and FedAvgM pairs arrays with its stored model by position, so a reply with the
    right arrays in another order would silently mix layers up. Decoded tensors that a strategy
    aggregates by name need no order.
    """
    omitted = set(omit)
    expected = [k for k in spec if k not in omitted]
    have = list(arrays.keys())
    missing = [k for k in expected if k not in arrays]
    if missing:
        return f"missing {what}s: {', '.join(missing)}"
    unexpected = [k for k in have if k not in spec or k in omitted]
    if unexpected:
        return f"unexpected {what}s: {', '.join(map(str, unexpected))}"
    if ordered is None:
        ordered = isinstance(arrays, ArrayRecord)
    if ordered and have != expected:
        i = next(i for i, (a, b) in enumerate(zip(have, expected)) if a != b)
        return f"{what} {have[i]!r} is out of order: position {i} should hold {expected[i]!r} (the model's order)"
    for key in expected:
        if isinstance(arrays, ArrayRecord):
            x, problem = _decode(arrays, key)
            if problem:
                return problem
        else:
            x = np.asarray(arrays[key])
        assert x is not None
        shape, dtype = spec[key]
        if tuple(x.shape) != tuple(shape):
            return f"{what} {key!r} has shape {tuple(x.shape)}, expected {tuple(shape)}"
        if np.dtype(x.dtype) != np.dtype(dtype):
            return f"{what} {key!r} has dtype {x.dtype}, expected {np.dtype(dtype)}"
        bad = check_finite({key: x}, what)
        if bad:
            return bad
    return None


def check_num_examples(value: Any, bound: int | None) -> str | None:
    """``num-examples`` must be an int or float, finite, > 0 and <= ``bound`` (when known)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{NUM_EXAMPLES} = {value!r} is not a number"
    if not math.isfinite(value) or value <= 0:
        return f"{NUM_EXAMPLES} = {value!r} is not > 0"
    if bound is not None and value > bound:
        return f"{NUM_EXAMPLES} = {value!r} exceeds this client's {bound} training examples"
    return None


def universal_check(msg: Message, max_examples: int | None, max_abs: float | None = None) -> str | None:
    """The checks every reply gets, whatever the strategy (see the module docstring)."""
    content = msg.content
    metric_records = content.metric_records
    if list(metric_records) != [METRICS_KEY]:
        return f"expected exactly one MetricRecord named {METRICS_KEY!r}, found {sorted(metric_records)}"
    metrics = metric_records[METRICS_KEY]
    if NUM_EXAMPLES not in metrics:
        return f"no {NUM_EXAMPLES!r} in the reply's metrics"
    problem = check_num_examples(metrics[NUM_EXAMPLES], max_examples)
    if problem:
        return problem
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            return f"metric {key!r} = {value!r} is not finite"
    for rec_name, record in content.array_records.items():
        for key in record.keys():
            x, problem = _decode(record, key)
            if problem:
                return f"{rec_name}: {problem}" if rec_name != ARRAYS_KEY else problem
            assert x is not None
            bad = check_finite({key: x}) or check_magnitude({key: x}, max_abs)
            if bad:
                return f"{rec_name}: {bad}" if rec_name != ARRAYS_KEY else bad
    return None


def model_reply_check(
    msg: Message, spec: ArraySpec, *, arrays_key: str = ARRAYS_KEY, omit: Iterable[str] = ()
) -> str | None:
    """The generic check of a reply that carries the model: one ArrayRecord ``arrays_key`` with
    exactly the model's arrays (minus ``omit``) in the model's order, shapes and dtypes as in
    ``spec``, finite."""
    record = single_array_record(msg, arrays_key)
    if isinstance(record, str):
        return record
    return check_arrays(record, spec, omit=omit)


def is_flower_strategy(strategy: Any) -> bool:
    """A strategy shipped with Flower (its replies are plain models)."""
    return type(strategy).__module__.startswith("flwr.")


@dataclass
class Screened:
    """One round's replies, sorted out."""

    valid: list[Message] = field(default_factory=list)
    rejected: list[tuple[Message, str]] = field(default_factory=list)
    errors: list[Message] = field(default_factory=list)


class ReplyScreen:
    """Applies the checks above to a round's replies (see the module docstring).

    ``spec``: the model's arrays (for the generic model check); ``max_examples(msg)``: the bound on
    ``num-examples`` for the sender of ``msg`` (None: no bound); ``describe(msg)``: how to name the
    sender in logs (e.g. its partition id); ``max_abs``: the ``reply-max-abs`` bound on the magnitude
    of every floating-point value (None or 0: no bound); ``metric_keys``: the method's declared
    reply metrics besides ``num-examples`` (None: not declared, see the module docstring).
    """

    def __init__(
        self,
        strategy: Any,
        spec: ArraySpec,
        max_examples: Callable[[Message], int | None] = lambda msg: None,
        describe: Callable[[Message], str] = lambda msg: f"node {msg.metadata.src_node_id}",
        max_abs: float | None = None,
        metric_keys: Collection[str] | None = None,
    ) -> None:
        self.strategy = strategy
        self.metric_keys = None if metric_keys is None else frozenset(metric_keys) - {NUM_EXAMPLES}
        self.max_abs = max_abs
        self.spec = spec
        self.max_examples = max_examples
        self.describe = describe
        self.hook: Callable[[int, Message], str | None] | None = (
            strategy.validate_reply if isinstance(strategy, MethodHooks) else None
        )
        self.generic = self.hook is None and is_flower_strategy(strategy)
        if self.hook is None and not self.generic:
            log.warning(
                "strategy %s has no fedsparse hooks (fedsparse.hooks.MethodHooks): its replies are checked "
                "for finiteness and num-examples only",
                type(strategy).__name__,
            )

    def check(self, server_round: int, msg: Message) -> str | None:
        """None if ``msg`` (not an error reply) may be aggregated, else why not."""
        try:
            problem = universal_check(msg, self.max_examples(msg), self.max_abs)
            if problem is None:
                problem = self._metric_schema(msg)
            if problem is None and self.hook is not None:
                problem = self.hook(server_round, msg)
            elif problem is None and self.generic:
                problem = model_reply_check(
                    msg, self.spec, arrays_key=getattr(self.strategy, "arrayrecord_key", ARRAYS_KEY)
                )
        except Exception as err:  # noqa: BLE001 - a reply that breaks a check is rejected, not fatal
            problem = f"the reply could not be checked ({type(err).__name__}: {err})"
        return problem

    def _metric_schema(self, msg: Message) -> str | None:
        """The declared metric keys, exactly (None when the method declares none)."""
        if self.metric_keys is None:
            return None
        keys = set(msg.content[METRICS_KEY].keys()) - {NUM_EXAMPLES}
        extra, missing = sorted(keys - self.metric_keys), sorted(self.metric_keys - keys)
        if extra:
            return f"metric keys {extra} are not among the method's declared reply metrics {sorted(self.metric_keys)}"
        if missing:
            return f"metric keys {missing} of the method's declared reply metrics are missing"
        return None

    def _common_metric_keys(self, server_round: int, valid: list[Message]) -> list[Message]:
        """Undeclared metrics: keep only the keys every accepted reply carries (copies of the
        replies that carry more); Flower's aggregation then sees consistent records."""
        keysets = [frozenset(m.content[METRICS_KEY].keys()) for m in valid]
        if len(set(keysets)) <= 1:
            return valid
        common = frozenset.intersection(*keysets)
        out = []
        for msg, keys in zip(valid, keysets):
            if keys == common:
                out.append(msg)
                continue
            log.warning(
                "round %d: dropped metric keys %s from the reply of %s (not carried by every reply; the method "
                "declares no reply metrics)",
                server_round,
                sorted(keys - common),
                self.describe(msg),
            )
            record: Any = msg.content[METRICS_KEY]  # a MetricRecord: the universal check made sure
            metrics = MetricRecord({k: v for k, v in record.items() if k in common})
            clone = copy.copy(msg)
            clone.content = RecordDict(
                {name: (metrics if name == METRICS_KEY else rec) for name, rec in msg.content.items()}
            )
            out.append(clone)
        return out

    def screen(self, server_round: int, replies: Iterable[Message]) -> Screened:
        """Split replies into errors, rejected (with reasons, logged) and valid ones (order kept)."""
        out = Screened()
        for msg in replies:
            if msg.has_error():
                out.errors.append(msg)
                continue
            problem = self.check(server_round, msg)
            if problem is None:
                out.valid.append(msg)
            else:
                out.rejected.append((msg, problem))
        if self.metric_keys is None:
            out.valid = self._common_metric_keys(server_round, out.valid)
        for msg, problem in out.rejected:
            log.warning("round %d: rejected the reply of %s: %s", server_round, self.describe(msg), problem)
        return out
