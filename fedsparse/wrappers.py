"""Run options every mean-based method shares, as Flower strategy wrappers.

* :class:`UniformWeighting` (``weighting = "uniform"``) — every reply weighs 1/a in the server's
  means, as FedLUAR's Algorithm 1 (x_{t+1} = x_t + 1/a Σ Δ_i) and its authors' code (an MPI
  allreduce divided by the number of workers) average. Every mean in fedsparse and in Flower's
  strategies is weighted by the reply's ``num-examples`` metric (Flower's ``weighted_by_key``:
  ``aggregate_arrayrecords``; our FedDIP, SNIP, compressors and partial-update read the same
  metric), so the wrapper gives every reply the weight 1 there, just before aggregation: one
  place, and every mean-based strategy — Flower's FedAvg / FedProx / FedAdam / FedYogi / FedAvgM,
  LUAR over any of them, FedDIP, the compressors, partial-update — honours it unchanged. The clients
  still report their true ``num-examples`` (the reply screen bounds it by the partition size). Not
  reached: a mean a strategy takes outside ``aggregate_train`` (SNIP's one-off saliency exchange,
  run inside its first ``configure_train``).
* :class:`SlotMomentum` (``client-momentum = "slot"``) — the server keeps one SGD momentum buffer
  per *slot* k = 0 … K−1 (K = clients per round) and hands buffer k to the k-th client sampled
  this round (the order of the strategy's train messages, i.e. Flower's ``random.sample`` order);
  the client loads it into its optimizer, trains, and sends its final buffer back in the same
  reply, which becomes buffer k. This is what the FedLUAR reference does implicitly: it keeps one
  Keras ``SGD(momentum=0.9)`` per worker process and never resets it, so every sampled client
  starts from the velocity another client left in that slot — an implicit server momentum.

Both wrappers are plain ``flwr.serverapp.strategy.Strategy`` objects (they work in
``Strategy.start`` in any deployment) and carry fedsparse's hooks, delegating every hook to the
wrapped strategy; ``fedsparse.methods.build_strategy`` applies them from the run configuration.

Bytes under ``slot``: the buffers really travel (an ArrayRecord named
:data:`fedsparse.protocol.MOMENTUM_RECORD` beside ``arrays``, down and up), so the metering grid
counts them in ``bytes_down`` / ``bytes_up`` like every other serialised array — in a deployment
that is their honest cost. In the reference they never leave the worker process; to compare with
the paper's "Comm" the wrapper reports, per round, the payload bytes of the momentum records
(``slot_momentum_bytes_down`` / ``_up``, the same per-array count as the ledger's), so the model
traffic alone is ``bytes_up − slot_momentum_bytes_up`` (docs/fedluar.md).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsparse.accounting import array_record_bytes
from fedsparse.checkpoint import load_strategy_state, strategy_state
from fedsparse.config import client_momentum
from fedsparse.hooks import MethodHooks
from fedsparse.protocol import ARRAYS_KEY, MOMENTUM_RECORD, NUM_EXAMPLES
from fedsparse.validation import ArraySpec, is_flower_strategy, model_reply_check, spec_of

log = logging.getLogger("fedsparse")


def _with_content(msg: Message, content: RecordDict) -> Message:
    """A copy of ``msg`` (same metadata: destination, sender, reply-to) holding ``content``; ``msg``
    itself is left as it is (the round loop and the metering grid keep theirs)."""
    out = copy.copy(msg)
    out.content = content
    return out


class Delegating(Strategy, MethodHooks):
    """A strategy that forwards everything to ``inner``; subclasses change one step.

    Hooks go to ``inner`` when it has fedsparse's hooks; a Flower strategy's replies get the generic
    model check (what the reply screen would have given the unwrapped strategy), against the arrays
    of the first round this wrapper configured.
    """

    def __init__(self, inner: Strategy) -> None:
        if not isinstance(inner, Strategy):
            raise TypeError(f"inner must be a flwr.serverapp.strategy.Strategy; got {type(inner).__name__}")
        self.inner = inner
        self._spec: ArraySpec | None = None

    # ---- Strategy interface ----------------------------------------------------------------------
    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self._spec is None:
            self._spec = spec_of(arrays)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    # ---- hooks -----------------------------------------------------------------------------------
    def validate_reply(self, server_round: int, msg: Message) -> str | None:
        if isinstance(self.inner, MethodHooks):
            return self.inner.validate_reply(server_round, msg)
        if is_flower_strategy(self.inner) and self._spec is not None:
            return model_reply_check(msg, self._spec, arrays_key=getattr(self.inner, "arrayrecord_key", ARRAYS_KEY))
        return None

    def round_report(self, server_round: int) -> dict[str, Any]:
        return dict(self.inner.round_report(server_round)) if isinstance(self.inner, MethodHooks) else {}

    def final_report(self, out_dir: Path) -> dict[str, Any] | None:
        return self.inner.final_report(out_dir) if isinstance(self.inner, MethodHooks) else None

    def constrain(self, arrays: ArrayRecord) -> ArrayRecord:
        return self.inner.constrain(arrays) if isinstance(self.inner, MethodHooks) else arrays

    def state_dict(self) -> dict[str, Any]:
        return {"inner": strategy_state(self.inner)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_strategy_state(self.inner, state["inner"])


def weight_key(strategy: Strategy) -> str:
    """The metric the strategy weights its means by (Flower's ``weighted_by_key``), looked up
    through wrappers (``inner``, LUAR's ``base``); ``num-examples`` when none says."""
    seen: Any = strategy
    for _ in range(8):
        key = getattr(seen, "weighted_by_key", None)
        if isinstance(key, str):
            return key
        seen = getattr(seen, "inner", None) or getattr(seen, "base", None)
        if seen is None:
            break
    return NUM_EXAMPLES


class UniformWeighting(Delegating):
    """Every reply weighs the same (1/a) in the wrapped strategy's means: the weight metric of each
    reply is set to 1 on a copy of the reply just before aggregation (see the module docstring)."""

    def __init__(self, inner: Strategy, key: str | None = None) -> None:
        super().__init__(inner)
        self.key = key or weight_key(inner)

    def unit_weight(self, msg: Message) -> Message:
        """A copy of the reply whose weight metric is 1 (error replies and replies without the
        metric are returned as they are: the strategy rejects those itself)."""
        if msg.has_error():
            return msg
        records: dict[str, Any] = {}
        changed = False
        for name, record in msg.content.items():
            if isinstance(record, MetricRecord) and self.key in record:
                record = MetricRecord({**dict(record.items()), self.key: 1})
                changed = True
            records[name] = record
        return _with_content(msg, RecordDict(records)) if changed else msg

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, [self.unit_weight(m) for m in replies])


class SlotBuffers(dict[str, np.ndarray]):
    """One slot's momentum buffers (parameter name → read-only ndarray).

    A slot's buffers are replaced, never changed in place (the arrays are read-only to make sure),
    so a deep copy — the round loop snapshots the strategy before every aggregation — shares the
    arrays instead of copying 32 × 26 MB for the FedLUAR CNN each time."""

    def __deepcopy__(self, memo: dict[int, Any]) -> SlotBuffers:
        return SlotBuffers(self)

    @classmethod
    def frozen(cls, arrays: Mapping[str, Any]) -> SlotBuffers:
        out = cls()
        for name, value in arrays.items():
            arr = np.array(value, copy=True)
            arr.setflags(write=False)
            out[name] = arr
        return out


class SlotMomentum(Delegating):
    """K server-held momentum buffers; buffer k travels to the k-th sampled client and back.

    ``slots[k]`` is None until a client trained in slot k has sent its buffers (round 1: every
    client starts with zero velocity, as the reference's fresh optimizers do). A client that fails
    or sends no momentum leaves its slot's buffer as it was.
    """

    def __init__(self, inner: Strategy, num_slots: int, record_key: str = MOMENTUM_RECORD) -> None:
        super().__init__(inner)
        if isinstance(num_slots, bool) or int(num_slots) != num_slots or num_slots < 1:
            raise ValueError(f"num_slots must be an integer >= 1; got {num_slots!r}")
        self.num_slots = int(num_slots)
        self.record_key = record_key
        self.slots: list[SlotBuffers | None] = [None] * self.num_slots
        self._slot_of: dict[int, int] = {}  # node id → slot, for the round in flight
        self._bytes: dict[int, dict[str, int]] = {}  # round → momentum payload bytes per direction
        self._warned_extra = False

    def slot_record(self, k: int) -> ArrayRecord | None:
        """Buffer k as the ArrayRecord a train message carries (None: nothing kept yet)."""
        buf = self.slots[k]
        return None if buf is None else ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in buf.items()})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._slot_of = {}
        out: list[Message] = []
        down = 0
        for k, msg in enumerate(messages):
            if k >= self.num_slots:  # a strategy sampling more clients than slots: those start fresh
                if not self._warned_extra:
                    log.warning("slot momentum: %d train messages for %d slots", len(messages), self.num_slots)
                    self._warned_extra = True
                out.append(msg)
                continue
            self._slot_of[msg.metadata.dst_node_id] = k
            record = self.slot_record(k)
            if record is None:
                out.append(msg)
                continue
            down += sum(array_record_bytes(record).values())
            out.append(_with_content(msg, RecordDict({**dict(msg.content.items()), self.record_key: record})))
        self._bytes[server_round] = {"down": down, "up": 0}
        return out

    def _split(self, msg: Message) -> tuple[Message, ArrayRecord | None]:
        """(the reply without its momentum record, that record or None)."""
        if msg.has_error() or self.record_key not in msg.content.array_records:
            return msg, None
        record = msg.content.array_records[self.record_key]
        rest = RecordDict({n: r for n, r in msg.content.items() if n != self.record_key})
        return _with_content(msg, rest), record

    def validate_reply(self, server_round: int, msg: Message) -> str | None:
        rest, record = self._split(msg)
        if record is not None and self._spec is not None:
            for name in record.keys():
                if name not in self._spec:
                    return f"{self.record_key}: momentum for {name!r}, which is not an array of the model"
                want = self._spec[name][0]
                have = tuple(int(d) for d in record[name].shape)
                if have != want:
                    return f"{self.record_key}: momentum for {name!r} has shape {have}, the parameter {want}"
        return super().validate_reply(server_round, rest)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept: list[Message] = []
        up = 0
        for msg in replies:
            rest, record = self._split(msg)
            if record is not None:
                up += sum(array_record_bytes(record).values())
                slot = self._slot_of.get(msg.metadata.src_node_id)
                if slot is not None:
                    self.slots[slot] = SlotBuffers.frozen({name: a.numpy() for name, a in record.items()})
            kept.append(rest)
        self._bytes.setdefault(server_round, {"down": 0, "up": 0})["up"] = up
        return self.inner.aggregate_train(server_round, kept)

    def round_report(self, server_round: int) -> dict[str, Any]:
        """The inner report, plus the payload bytes of the momentum records this round (to tell the
        model's traffic from the buffers' in ``bytes_down`` / ``bytes_up``)."""
        counted = self._bytes.get(server_round, {"down": 0, "up": 0})
        return {
            **super().round_report(server_round),
            "slot_momentum_bytes_down": counted["down"],
            "slot_momentum_bytes_up": counted["up"],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "num_slots": self.num_slots,
            "slots": [None if b is None else dict(b) for b in self.slots],  # read-only arrays: no copy needed
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["num_slots"]) != self.num_slots:
            raise ValueError(f"checkpoint has {state['num_slots']} momentum slots, this run {self.num_slots}")
        super().load_state_dict(state)
        self.slots = [None if b is None else SlotBuffers.frozen(b) for b in state["slots"]]


def with_run_options(strategy: Strategy, cfg: Mapping[str, Any]) -> Strategy:
    """``strategy`` wrapped as the run configuration asks: :class:`UniformWeighting` for
    ``weighting = uniform``, then :class:`SlotMomentum` (K = ``clients-per-round``) for
    ``client-momentum = slot``; unchanged with the defaults."""
    if str(cfg.get("weighting", "examples")) == "uniform":
        strategy = UniformWeighting(strategy)
    if client_momentum(cfg) == "slot":
        strategy = SlotMomentum(strategy, int(cfg["clients-per-round"]))
    return strategy


__all__ = ["Delegating", "UniformWeighting", "SlotMomentum", "SlotBuffers", "weight_key", "with_run_options"]
