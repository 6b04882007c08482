"""A Flower ``Grid`` that meters every message and orders nodes by partition id.

Wrapping the grid (rather than each strategy) means every strategy — ours or Flower's stock ones —
is accounted the same way, from the messages that really go out and come back.

Ordering ``get_node_ids()`` by partition id is what makes client sampling reproducible: Flower's
strategies call ``random.sample(list(grid.get_node_ids()), k)``; node ids are random per run, but
partition ids are not, so with Python's ``random`` seeded per round (see ``seeded_sampling``) the
same partitions are drawn in every run with the same seed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsparse import stopping
from fedsparse.accounting import DOWN, UP, Ledger, payload_bytes, wire_bytes

if TYPE_CHECKING:
    from flwr.supercore.run import Run

log = logging.getLogger("fedsparse")
PARTITION_QUERY = "fedsparse.partition-id"
METERED_TYPES = (MessageType.TRAIN, MessageType.EVALUATE)
#: Seconds between two polls for replies (Flower's in-memory grid polls every 0.1 s too).
PULL_INTERVAL = 0.1
#: ``max-in-flight = "auto"``
AUTO = "auto"
#: The smallest window ``auto`` uses on Flower's simulation engine (measured: scale.md)
AUTO_WINDOW = 64


class MeteredGrid(Grid):
    """Delegates to a real Grid; records payload (and wire) bytes of train/evaluate messages.

    ``max_in_flight`` > 0: ``send_and_receive`` (and the partition query) keep at most that many
    messages unanswered, pushing the next as replies come back, instead of pushing them all at once.
    Why: Flower's simulation engine checks every *stored* message for every node on every 0.1-s pass
    of its dispatcher (``InMemoryLinkState.get_message_ins``), so its cost grows with nodes × messages
    in flight, while its actors can only train a few at a time anyway: at 10,000 nodes, 10,000
    partition queries at once were not answered in minutes, 64 at a time took 5 1/2 minutes
    (experiments/results/scale.md). ``None`` (``max-in-flight = "auto"``): :func:`auto_window` of
    the inner grid, decided at each exchange. 0: all at once, what a deployment wants (its nodes are
    real machines).
    """

    def __init__(
        self,
        inner: Grid,
        ledger: Ledger | None = None,
        *,
        measure_wire: bool = True,
        max_in_flight: int | None = 0,
        client_resources: tuple[float, float] = (1.0, 0.0),
    ) -> None:
        if max_in_flight is not None and max_in_flight < 0:
            raise ValueError(
                f"max_in_flight = {max_in_flight}: allowed: 0 (all at once), a positive count or None (auto)"
            )
        self._inner = inner
        self.ledger = ledger if ledger is not None else Ledger()
        self.measure_wire = measure_wire
        self.max_in_flight = max_in_flight
        self.client_resources = client_resources  # (CPUs, GPUs) per client actor: what `auto` divides by
        self._auto_window: int | None = None  # `auto` once Ray has said how big its cluster is
        self.partition_of: dict[int, int] = {}
        self.current_round = 0

    # --- Grid interface -------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._inner.set_run(run)

    @property
    def run(self) -> Run:
        return self._inner.run

    def create_message(  # noqa: PLR0913 - mirrors Grid.create_message
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> list[int]:
        ids = list(self._inner.get_node_ids())
        big = 1 << 62
        return sorted(ids, key=lambda n: (self.partition_of.get(n, big), n))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._meter(messages, DOWN)
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._inner.pull_messages(message_ids))
        self._meter(replies, UP)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """The inner grid's send-and-receive, metered. While the launcher handles stop signals
        (:func:`fedsparse.stopping.watching`: ``fedsparse run`` / ``simulate``), or with a window
        (``max_in_flight``), a push-then-pull loop is run here instead: it gives up on a stop request
        rather than wait out the round timeout for an engine that is gone, and keeps the window."""
        window = self.window()
        if not stopping.watching() and window == 0:
            messages = list(messages)
            self._meter(messages, DOWN)
            replies: list[Message] = list(self._inner.send_and_receive(messages, timeout=timeout))
            self._meter(replies, UP)
            return replies
        return self._exchange(list(messages), self.push_messages, self.pull_messages, timeout, window)

    def window(self) -> int:
        """Messages allowed unanswered at once in the next exchange (0: all). ``auto`` asks Ray for
        its cluster's size (a call to Ray's control store) only until it has answered once, not every round."""
        if self.max_in_flight is not None:
            return self.max_in_flight
        if self._auto_window is not None:
            return self._auto_window
        window = auto_window(self._inner, *self.client_resources)
        if window == 0 or _ray_started():
            self._auto_window = window
        return window

    @staticmethod
    def _exchange(
        messages: list[Message],
        push: Callable[[Iterable[Message]], Iterable[str]],
        pull: Callable[[Iterable[str]], Iterable[Message]],
        timeout: float | None,
        window: int,
    ) -> list[Message]:
        """Push ``messages`` (at most ``window`` unanswered at a time; 0: all at once) and pull their
        replies until all came back, the timeout passed or a stop was requested. With a window the
        timeout is the longest wait for the *next* reply (it restarts on every answer): a window sends
        10,000 partition queries or 1,000 train messages a few at a time, so a bound on the whole
        exchange would cut it by size, not by a silent engine. A message still waiting for room when
        the loop ends is never pushed (nor metered): its client simply does not answer this round, as
        with a timeout."""
        waiting = deque(messages)
        pending: set[str] = set()
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting or pending:
            room = len(waiting) if window == 0 else min(len(waiting), window - len(pending))
            if room > 0:
                pending.update(push([waiting.popleft() for _ in range(room)]))
            got = list(pull(pending))
            if got:
                stopping.ENGINE_ANSWERED.set()
            replies.extend(got)
            if got and window and timeout is not None:
                deadline = time.monotonic() + timeout
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            done = not pending and not waiting
            if done or stopping.requested() or (deadline is not None and time.monotonic() >= deadline):
                break
            if not got or not waiting:  # new replies free room: push at once, else wait for the engine
                time.sleep(PULL_INTERVAL)
        return replies

    def in_partition_order(self, replies: Iterable[Message]) -> list[Message]:
        """Replies sorted by partition id: they arrive in any order, and floating-point
        aggregation is only reproducible when it always adds them in the same one."""
        big = 1 << 62
        return sorted(
            replies, key=lambda m: (self.partition_of.get(m.metadata.src_node_id, big), m.metadata.src_node_id)
        )

    # --- metering -------------------------------------------------------------------------------
    def _meter(self, messages: list[Message], direction: str) -> None:
        content_wire: dict[int, int] = {}
        for msg in messages:
            mtype = msg.metadata.message_type
            if mtype not in METERED_TYPES or msg.has_error():
                continue
            node = msg.metadata.dst_node_id if direction == DOWN else msg.metadata.src_node_id
            wire = None
            if self.measure_wire:
                # Messages of one round often share one content object: deflate it once.
                key = id(msg.content)
                if key not in content_wire:
                    content_wire[key] = wire_bytes(msg)
                wire = content_wire[key]
            self.ledger.record(
                self.current_round,
                direction,
                self.partition_of.get(node, -1),
                node,
                payload_bytes(msg.content),
                wire,
                mtype,
            )

    # --- partition discovery --------------------------------------------------------------------
    def discover_partitions(self, expected: int, timeout: float = 120.0, rounds: int = 3) -> dict[int, int]:
        """Ask every node for its ``partition-id`` (a QUERY message) and remember the mapping.

        Waits until ``expected`` nodes are connected. Nodes whose ClientApp does not answer the
        query keep no partition id and are ordered after the others by node id. A node whose answer
        did not come back within ``timeout`` (on a loaded machine the first messages wait for the
        actors to start) is asked again, up to ``rounds`` times: without its partition id the node
        order, and so the sampled clients, would depend on the machine's load, not on the seed.
        """
        deadline = time.monotonic() + timeout
        while len(ids := list(self._inner.get_node_ids())) < expected:
            if stopping.requested():
                return dict(self.partition_of)
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(ids)} of {expected} nodes connected after {timeout:.0f} s")
            time.sleep(0.2)
        query = RecordDict({"config": ConfigRecord({"query": PARTITION_QUERY})})
        pending = list(ids)
        for _ in range(max(rounds, 1)):
            msgs = [Message(content=query, message_type=MessageType.QUERY, dst_node_id=n) for n in pending]
            answered = set()
            window = self.window()
            if stopping.watching() or window:  # give up on a stop (a signal, an engine that died)
                replies = self._exchange(msgs, self._inner.push_messages, self._inner.pull_messages, timeout, window)
            else:
                replies = list(self._inner.send_and_receive(msgs, timeout=timeout))
            for reply in replies:
                answered.add(reply.metadata.src_node_id)
                if reply.has_error() or "partition" not in reply.content.metric_records:
                    continue
                self.partition_of[reply.metadata.src_node_id] = int(reply.content["partition"]["partition-id"])  # type: ignore[arg-type]  # a scalar by protocol; int() refuses a list
            pending = [n for n in pending if n not in answered]
            if not pending or stopping.requested():
                break
        if pending:
            log.warning(
                "%d of %d nodes did not answer the partition query in %d tries of %.0f s; they are ordered by node id",
                len(pending),
                len(ids),
                max(rounds, 1),
                timeout,
            )
        return dict(self.partition_of)


def parse_max_in_flight(value: object) -> int | None:
    """``max-in-flight`` → None (``"auto"``) or a count >= 0 (0: all at once); ValueError otherwise."""
    text = str(value).strip()
    if text == AUTO:
        return None
    try:
        number = float(text)  # TOML's 8 arrives as "8.0" (a string key that takes numbers)
    except ValueError:
        number = -1.0
    count = int(number) if math.isfinite(number) and number == int(number) else -1
    if count < 0:
        raise ValueError(
            f"max-in-flight = {text!r} is not valid; allowed: 'auto', 0 (all at once) or a positive integer"
        )
    return count


def auto_window(inner: Grid, client_cpus: float = 1.0, client_gpus: float = 0.0) -> int:
    """``max-in-flight = "auto"``: 0 (all at once) on a deployment's grid; on Flower's simulation engine
    (its ``InMemoryGrid``), :data:`AUTO_WINDOW` or 4 messages per client actor Ray could run, whichever is
    larger, so that a big cluster's actors are not starved. A round of at most that many clients sends
    everything at once, as without a window."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    if not isinstance(inner, InMemoryGrid):
        return 0
    return max(AUTO_WINDOW, 4 * ray_actor_slots(client_cpus, client_gpus))


def _ray_started() -> bool:
    import ray

    return bool(ray.is_initialized())


def ray_actor_slots(client_cpus: float, client_gpus: float) -> int:
    """How many client actors the Ray cluster of this process holds room for, given the CPUs (and
    GPUs) Flower's backend reserves per actor; 0 if Ray is not started here."""
    try:
        import ray

        if not ray.is_initialized():
            return 0
        resources = ray.cluster_resources()
    except Exception:  # noqa: BLE001 - a window is a speed choice: without Ray's answer, use the default
        return 0
    slots = resources.get("CPU", 0.0) / client_cpus if client_cpus > 0 else 0.0
    if client_gpus > 0:
        slots = min(slots, resources.get("GPU", 0.0) / client_gpus)
    return int(slots)


@contextlib.contextmanager
def seeded_sampling(seed: int, server_round: int) -> Iterator[None]:
    """Seed Python's ``random`` for one round's client sampling, then restore its state.

    Flower's strategies sample with ``random.sample``; seeding it from (seed, round) makes the
    sampled partitions a function of the configuration alone, and restoring the state keeps the
    rest of the process unaffected.
    """
    state = random.getstate()
    random.seed(f"fedsparse-sampling/{seed}/{server_round}")
    try:
        yield
    finally:
        random.setstate(state)
