"""Deterministic failure injection for testing how runs cope with failing clients.

``fail-clients`` lists which clients misbehave in which rounds, as comma- or space-separated
``ROUND:PARTITION[:MODE]`` items; ``*`` matches any round or partition:

* ``raise`` (default): the ClientApp raises :class:`InjectedFailure` — Flower turns it into an
  error reply, exactly as it does for any exception in a client;
* ``timeout``: the client sleeps past the round's deadline (1.5 × ``round-timeout`` + 0.5 s) before
  doing its normal work, so the server stops waiting for it and the reply never counts;
* ``nan``: the client trains normally, then replaces every floating-point value of its reply's
  arrays with NaN — a diverged (or malicious) client, which reply validation must reject. A reply
  with no floating-point array (bit-packed codes only, e.g. FedPAQ's) has nothing to put NaN in:
  its ``train-loss`` metric becomes NaN instead, as a diverged client's loss would;
* ``scale`` (a model-replacement / sign-flipping attacker): the client trains normally, then its
  reply's model becomes ``global + s·Δ``, with ``Δ = trained − global`` (the model it trained
  from) and ``s = attack-scale`` (default −10: a boosted sign flip; any finite value, 1 = honest).
  Only floating-point tensors of the reply's ``arrays`` record are scaled (integer buffers such as
  BatchNorm's counters, and any other record, e.g. partial-update's local contribution, stay
  honest). The design is deliberately the simplest honest one: it applies to the methods whose
  reply carries a plain model in ``arrays`` — those whose :class:`fedsparse.methods.Method` declares
  ``plain_model_reply`` (FedAvg, FedProx, FedLUAR, whose recycled layers are simply absent from the
  reply) — and to those that declare ``codec_model_reply`` (FedDIP, FedDIP-LUAR: the model both
  ways as a 32-bit :mod:`fedsparse.codec` payload), whose reply is decoded, scaled and re-encoded
  with its own masks (the attacker's non-zeros stay where an honest reply's are). Methods that
  reply with another payload (SNIP, top-k, rand-k, FedPAQ, DGC, SBC, ...) would need a decode,
  scale and re-encode per payload format, which would have to reproduce each format's own
  quantisation and positions; the combination is refused at configuration time instead
  (``fedsparse.config``: a :class:`ConfigError` naming the strategy and the mode);
* ``inflate``: an honest update whose ``num-examples`` metric is multiplied by 100 (a client
  claiming more weight in the average). The reply screen bounds ``num-examples`` by the server's
  own knowledge: the sender's partition size when it answered the partition query (so an inflated
  reply is rejected), else ``max-examples`` (0: the largest partition of the run's split).

Examples: ``"2:0"`` (partition 0 fails in round 2), ``"*:3"`` (partition 3 always fails),
``"4:*"`` (every client of round 4 fails), ``"2:1:timeout, 3:*"``. The ClientApp
(``clients/app.py``) calls :func:`inject` before a train step and :func:`attack` and :func:`poison`
on its reply; the rule is a pure function of the configuration, so a run with failures repeats
exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedsparse import codec
from fedsparse.config import ConfigError

MODES = ("raise", "timeout", "nan", "scale", "inflate")
#: what ``inflate`` multiplies ``num-examples`` by
INFLATE_FACTOR = 100
ANY = -1


class InjectedFailure(RuntimeError):
    """The exception an injected ``raise`` failure makes the ClientApp throw."""


@dataclass(frozen=True)
class FailureRule:
    server_round: int  # ANY (-1) = every round
    partition: int  # ANY (-1) = every partition
    mode: str = "raise"

    def matches(self, server_round: int, partition: int) -> bool:
        return self.server_round in (ANY, server_round) and self.partition in (ANY, partition)


def parse_fail_clients(text: str) -> list[FailureRule]:
    """``"2:0, *:3:timeout"`` → rules; raises ConfigError naming the bad item and the syntax."""
    rules = []
    for item in str(text).replace(",", " ").split():
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise ConfigError(
                f"fail-clients item {item!r} is not ROUND:PARTITION[:MODE]; e.g. '2:0', '*:3', '4:*:timeout'"
            )
        values = []
        for what, part in zip(("round", "partition"), parts[:2]):
            if part == "*":
                values.append(ANY)
                continue
            try:
                value = int(part)
            except ValueError:
                value = -2
            if value < (1 if what == "round" else 0):
                allowed = "an integer >= 1" if what == "round" else "an integer >= 0"
                raise ConfigError(
                    f"fail-clients item {item!r}: {what} {part!r} is not valid; allowed: {allowed} or '*'"
                )
            values.append(value)
        mode = parts[2] if len(parts) == 3 else "raise"
        if mode not in MODES:
            raise ConfigError(f"fail-clients item {item!r}: unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        rules.append(FailureRule(values[0], values[1], mode))
    return rules


def failure_for(cfg: Mapping[str, Any], server_round: int, partition: int) -> str | None:
    """The injected failure mode of (round, partition), or None."""
    text = str(cfg.get("fail-clients", "") or "")
    if not text:
        return None
    for rule in parse_fail_clients(text):
        if rule.matches(server_round, partition):
            return rule.mode
    return None


def stall_seconds(cfg: Mapping[str, Any]) -> float:
    """How long a ``timeout`` client sleeps: safely past the round's deadline."""
    return 1.5 * float(cfg["round-timeout"]) + 0.5


def inject(cfg: Mapping[str, Any], server_round: int, partition: int) -> None:
    """Raise or stall if ``fail-clients`` says so for this (round, partition); else do nothing."""
    mode = failure_for(cfg, server_round, partition)
    if mode == "raise":
        raise InjectedFailure(f"injected failure (fail-clients): partition {partition} in round {server_round}")
    if mode == "timeout":
        time.sleep(stall_seconds(cfg))


def received_model(cfg: Mapping[str, Any], msg: Message) -> dict[str, np.ndarray] | None:
    """A copy of the model the client will train from, taken before training (None when the message
    carries no plain ``arrays`` model)."""
    if "arrays" not in msg.content.array_records:
        return None
    arrays = {k: np.array(a.numpy(), copy=True) for k, a in msg.content.array_records["arrays"].items()}
    if _codec_reply(cfg):
        return codec.decode(arrays)[0]
    return arrays


def _codec_reply(cfg: Mapping[str, Any]) -> bool:
    from fedsparse.methods import method

    return method(str(cfg["strategy"])).codec_model_reply


def _scaled(reply: ArrayRecord, base: Mapping[str, np.ndarray], s: float) -> ArrayRecord:
    out = {}
    for key, arr in reply.items():
        x = arr.numpy()
        if x.dtype.kind == "f":
            if key not in base or base[key].shape != x.shape:
                raise RuntimeError(f"fail-clients scale: reply tensor {key!r} has no counterpart in the global model")
            g = base[key].astype(np.float64)
            x = (g + s * (x.astype(np.float64) - g)).astype(x.dtype)
        out[key] = Array(np.asarray(x, order="C"))  # 0-d stays 0-d
    return ArrayRecord(out)


def attack(
    cfg: Mapping[str, Any],
    server_round: int,
    partition: int,
    reply: Message,
    received: Mapping[str, np.ndarray] | None = None,
    state: RecordDict | None = None,
) -> Message:
    """The reply of an attacking client if ``fail-clients`` says ``scale`` or ``inflate``; else as is.

    ``received``: the model the client trained from (:func:`received_model`); ``state`` is not
    used (kept for callers that pass the client's ``context.state``).
    """
    mode = failure_for(cfg, server_round, partition)
    if mode not in ("scale", "inflate") or reply.has_error():
        return reply
    if mode == "inflate":
        for name, metrics in list(reply.content.metric_records.items()):
            if "num-examples" in metrics:
                values = dict(metrics.items())
                values["num-examples"] = values["num-examples"] * INFLATE_FACTOR
                reply.content[name] = MetricRecord(values)
        return reply
    strategy = str(cfg["strategy"])
    if strategy not in scale_strategies() or "arrays" not in reply.content.array_records:
        raise RuntimeError(f"fail-clients scale is not supported by strategy {strategy!r}")
    if received is None:
        raise RuntimeError("fail-clients scale: the model the client trained from is unknown")
    record, s = reply.content.array_records["arrays"], float(cfg["attack-scale"])
    if _codec_reply(cfg):
        tensors, masks = codec.decode(codec.from_array_record(record))
        scaled = _scaled(ArrayRecord({k: Array(v) for k, v in tensors.items()}), received, s)
        keep = {k: masks[k] for k in masks}
        reply.content["arrays"] = codec.to_array_record(codec.encode({k: a.numpy() for k, a in scaled.items()}, keep))
        return reply
    reply.content["arrays"] = _scaled(record, received, s)
    return reply


def scale_strategies() -> list[str]:
    """The installed methods the ``scale`` attack applies to (their replies are plain models)."""
    from fedsparse.methods import methods

    return [name for name, method in methods().items() if method.plain_model_reply or method.codec_model_reply]


def poison(cfg: Mapping[str, Any], server_round: int, partition: int, reply: Message) -> Message:
    """The reply with NaN in every floating-point array if ``fail-clients`` says ``nan``; else as is.

    A reply without any floating-point array (bit-packed codes only) gets ``train-loss = NaN`` in
    its MetricRecord instead, so that the injected failure always takes effect.
    """
    if failure_for(cfg, server_round, partition) != "nan" or reply.has_error():
        return reply
    floats = 0
    for name, record in list(reply.content.array_records.items()):
        poisoned = {}
        for key, arr in record.items():
            x = arr.numpy()
            if x.dtype.kind == "f" and x.size:
                floats += 1
                x = np.full_like(x, np.nan)
            poisoned[key] = Array(x)
        reply.content[name] = ArrayRecord(poisoned)
    if not floats:
        for name, metrics in list(reply.content.metric_records.items()):
            reply.content[name] = MetricRecord({**dict(metrics.items()), "train-loss": math.nan})
    return reply


__all__ = [
    "FailureRule",
    "InjectedFailure",
    "parse_fail_clients",
    "failure_for",
    "inject",
    "poison",
    "attack",
    "received_model",
    "stall_seconds",
    "MODES",
    "scale_strategies",
    "INFLATE_FACTOR",
]
