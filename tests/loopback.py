"""The loopback grid: a Flower ``Grid`` that hands each message to a ClientApp in this process.

Why it exists: the in-process tests drive a *real* server side (``fedsparse.server.run_server``,
Flower's ``Strategy.start`` loop, or a strategy's ``configure_train`` / ``aggregate_train`` called by
hand) against a *real* ClientApp (``clients.app.make_client_app``, or a user's own), with the very
messages a SuperLink would carry — but without Ray or a SuperLink, so a round trip takes well under
a second and is deterministic. Only the transport is replaced; what the simulation engine keeps per
node (``flwr/server/superlink/fleet/vce/vce_api.py``), one persistent ``Context`` with its
``node_config`` (``partition-id``, ``num-partitions``), is kept here too.

Two grids, one for each kind of test:

* :class:`LoopbackGrid` — the plain transport: the node's ``Context`` is handed to the ClientApp as
  is (a ClientApp exception propagates to the test), ``timeout`` is ignored.
* :class:`EngineLikeGrid` — fails the way the simulation engine does, for the reliability tests
  (test_failures, test_resume, test_validation): an exception becomes an error reply and leaves the
  node's context untouched, a reply slower than the round's timeout is dropped, and the grid can
  watch a run directory's checkpoint.

Both record every train exchange (``exchanges``: the messages sent and the replies returned) and
can simulate the server process dying in the middle of a round (``crash_in_round`` /
``crash_after`` raise :class:`SimulatedCrash`, like a ``kill -9``). ``push_messages`` /
``pull_messages`` work too (a pull delivers what was pushed through ``send_and_receive``), although
fedsparse's round loop and ``Strategy.start`` only use ``send_and_receive``.

Messages built outside a running app need the process's task identity: call
:func:`set_task_identity` (from an autouse fixture) before building any.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE = 1


def set_task_identity(node_id: int = SERVER_NODE) -> None:
    """Messages built outside a running app need the process's task identity (run 1, task 1)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, node_id, 1


def node_context(
    node_id: int, partition_id: int, num_partitions: int, run_config: dict[str, Any] | None = None
) -> Context:
    """A fresh Context for a client node, as the simulation engine builds it for partition ``partition_id``."""
    return Context(
        run_id=1,
        node_id=node_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )


def train_reply(msg: Message, arrays: ArrayRecord, num_examples: int, **metrics: Any) -> Message:
    """A client's reply to the train message ``msg``: ``arrays`` and ``num-examples`` (+ ``metrics``)."""
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": num_examples, **metrics})})
    return Message(content=content, reply_to=msg)


class SimulatedCrash(RuntimeError):
    """The server 'process' dies here."""


def train_round(messages: list[Message]) -> int | None:
    """The ``server-round`` of a train exchange (from its config), or None for any other exchange."""
    if not messages or messages[0].metadata.message_type != MessageType.TRAIN or "config" not in messages[0].content:
        return None
    return int(messages[0].content["config"].get("server-round", 0))


class LoopbackGrid(Grid):
    """A Grid whose nodes are ``client_app`` called in this process, one persistent Context per node.

    Node ``first_node_id + i * node_id_step`` holds partition ``i`` of ``num_nodes``; every node's
    Context carries ``run_config``. ``client_app`` may be None for a grid that only lends its node
    ids to ``configure_train`` (sending through it is then an error).

    ``crash_in_round`` / ``crash_after``: raise :class:`SimulatedCrash` when the train messages of
    that round arrive, after that many clients have run.
    """

    def __init__(
        self,
        client_app: ClientApp | None,
        num_nodes: int,
        *,
        first_node_id: int = 100,
        node_id_step: int = 1,
        run_config: dict[str, Any] | None = None,
        crash_in_round: int | None = None,
        crash_after: int = 0,
    ) -> None:
        self.client_app = client_app
        self.node_ids = [first_node_id + node_id_step * i for i in range(num_nodes)]
        self.contexts = {nid: node_context(nid, i, num_nodes, run_config) for i, nid in enumerate(self.node_ids)}
        self.crash_in_round = crash_in_round
        self.crash_after = crash_after
        self.exchanges: list[tuple[list[Message], list[Message]]] = []  # each train exchange: (sent, replies)
        self._pending: dict[str, Message] = {}
        self._pushed = 0

    @classmethod
    def for_config(cls, cfg: dict[str, Any], num_nodes: int | None = None, **options: Any) -> LoopbackGrid:
        """fedsparse's own ClientApp for the resolved config ``cfg`` (``num-clients`` nodes unless given)."""
        from clients.app import make_client_app

        return cls(make_client_app(cfg), int(cfg["num-clients"]) if num_nodes is None else num_nodes, **options)

    @property
    def sent(self) -> list[list[Message]]:
        """The messages of each train exchange."""
        return [msgs for msgs, _ in self.exchanges]

    @property
    def received(self) -> list[list[Message]]:
        """The replies returned from each train exchange."""
        return [replies for _, replies in self.exchanges]

    # ------------------------------------------------------------------ the Grid interface

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        raise NotImplementedError("a loopback grid has no Run")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            self._pushed += 1
            key = f"m{self._pushed}"
            m.metadata.__dict__["_message_id"] = key  # as the SuperLink does: replies point back to it
            self._pending[key] = m
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return list(self.send_and_receive([self._pending.pop(k) for k in message_ids]))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        server_round = train_round(messages)
        replies = []
        for i, msg in enumerate(messages):
            if server_round is not None and server_round == self.crash_in_round and i == self.crash_after:
                raise SimulatedCrash(f"simulated crash in round {server_round} after {i} clients")
            reply = self._deliver(msg, timeout)
            if reply is not None:
                replies.append(reply)
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.exchanges.append((messages, replies))
        return replies

    def _deliver(self, msg: Message, timeout: float | None) -> Message | None:
        """The ClientApp's reply to ``msg`` on its node's Context (None: no reply comes back)."""
        assert self.client_app is not None, "this grid has no ClientApp"
        return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])


class EngineLikeGrid(LoopbackGrid):
    """A loopback grid that keeps the simulation engine's failure semantics (``vce_api.py``).

    * a node's Context is updated only when the ClientApp returns — an exception leaves it as it was
      and comes back as an error reply (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``);
    * a reply that took longer than the round's timeout is not returned (the context still changes,
      as in the engine, whose worker finishes the message after the server stopped waiting);
    * ``watch``: a run directory with ``checkpoint-every = 1``; when round t's train messages arrive,
      the global arrays after round t − 1 are read from its checkpoint into ``globals_after``.

    ``replies_of_round`` keeps the replies of the last train exchange of each round.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, *, watch: Path | None = None, **options: Any) -> None:
        super().__init__(client_app, num_nodes, **options)
        self.watch = watch
        self.globals_after: dict[int, ArrayRecord] = {}
        self.replies_of_round: dict[int, list[Message]] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        server_round = train_round(messages)
        if server_round is not None and self.watch is not None and (self.watch / "checkpoint.npz").is_file():
            from fedsparse.checkpoint import load_checkpoint

            saved = load_checkpoint(self.watch)
            self.globals_after[saved.server_round] = saved.arrays
        replies = super().send_and_receive(messages, timeout=timeout)
        if server_round is not None:
            self.replies_of_round[server_round] = replies
        return replies

    def _deliver(self, msg: Message, timeout: float | None) -> Message | None:
        node = msg.metadata.dst_node_id
        work = copy.deepcopy(self.contexts[node])
        t0 = time.perf_counter()
        try:
            reply = self.client_app(msg, work)  # type: ignore[misc]  # never None here: __init__ takes a ClientApp
        except Exception as ex:  # noqa: BLE001 - exactly what the engine's worker does
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
        else:
            self.contexts[node] = work
        if timeout is not None and time.perf_counter() - t0 > timeout:
            return None  # the server stopped waiting for this one
        return reply


__all__ = [
    "SERVER_NODE",
    "EngineLikeGrid",
    "LoopbackGrid",
    "SimulatedCrash",
    "node_context",
    "set_task_identity",
    "train_reply",
    "train_round",
]
