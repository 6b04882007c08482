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
  its ``train-loss`` metric becomes NaN instead, as a diverged client's loss would.

Examples: ``"2:0"`` (partition 0 fails in round 2), ``"*:3"`` (partition 3 always fails),
``"4:*"`` (every client of round 4 fails), ``"2:1:timeout, 3:*"``. The ClientApp
(``clients/app.py``) calls :func:`inject` before a train step; the rule is a pure function of the
configuration, so a run with failures repeats exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedsparse.config import ConfigError

MODES = ("raise", "timeout", "nan")
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
    "stall_seconds",
    "MODES",
]
