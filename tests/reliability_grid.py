"""A Flower ``Grid`` that runs fedsparse's real ClientApp in this process, failing like the engine.

Shared by the reliability tests (test_failures, test_resume, test_validation). The server side is
the real round loop (``fedsparse.server.run_server``) and the real strategies; the client side is
the real ClientApp (``clients.app.make_client_app``). Only the transport is replaced, and it keeps
the simulation engine's semantics that matter here (``flwr/server/superlink/fleet/vce/vce_api.py``):

* one persistent ``Context`` per node, updated only when the ClientApp returns — an exception
  leaves the node's context as it was and comes back as an error reply
  (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``);
* a reply that took longer than the round's timeout is not returned (the context still changes,
  as in the engine, whose worker finishes the message after the server stopped waiting);
* ``crash_in_round`` / ``crash_after``: raise :class:`SimulatedCrash` in that round after that many
  clients have run — the server process dies mid-round, like a ``kill -9``;
* ``watch``: a run directory with ``checkpoint-every = 1``; when round t's train messages arrive,
  the global arrays after round t − 1 are read from its checkpoint into ``globals_after``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Iterable

from flwr.app import ArrayRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE = 1


def set_task_identity() -> None:
    """Messages built outside a running app need the process's task identity."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE, 1


class SimulatedCrash(RuntimeError):
    """The server 'process' dies here."""


class EngineLikeGrid(Grid):
    """Nodes 100 + i hold partition i; each message is handed to ``client_app`` in this process."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        crash_in_round: int | None = None,
        crash_after: int = 0,
        node_offset: int = 100,
        watch: Path | None = None,
    ) -> None:
        self.client_app = client_app
        self.contexts = {
            node_offset + i: Context(
                run_id=1,
                node_id=node_offset + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self.crash_in_round = crash_in_round
        self.crash_after = crash_after
        self.train_rounds: list[list[Message]] = []  # replies returned, per train exchange
        self.replies_of_round: dict[int, list[Message]] = {}  # the last train exchange of each round
        self.watch = watch
        self.globals_after: dict[int, ArrayRecord] = {}

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        raise NotImplementedError("EngineLikeGrid implements send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        raise NotImplementedError("EngineLikeGrid implements send_and_receive only")

    def _deliver(self, msg: Message) -> tuple[Message, float]:
        node = msg.metadata.dst_node_id
        work = copy.deepcopy(self.contexts[node])
        t0 = time.perf_counter()
        try:
            reply = self.client_app(msg, work)
        except Exception as ex:  # noqa: BLE001 - exactly what the engine's worker does
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg), time.perf_counter() - t0
        self.contexts[node] = work
        return reply, time.perf_counter() - t0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        is_train = bool(messages) and messages[0].metadata.message_type == MessageType.TRAIN
        server_round = None
        if is_train and "config" in messages[0].content:
            server_round = int(messages[0].content["config"].get("server-round", 0))
        if server_round is not None and self.watch is not None and (self.watch / "checkpoint.npz").is_file():
            from fedsparse.checkpoint import load_checkpoint

            saved = load_checkpoint(self.watch)
            self.globals_after[saved.server_round] = saved.arrays
        replies = []
        for i, msg in enumerate(messages):
            if server_round is not None and server_round == self.crash_in_round and i == self.crash_after:
                raise SimulatedCrash(f"simulated crash in round {server_round} after {i} clients")
            reply, seconds = self._deliver(msg)
            if timeout is not None and seconds > timeout:
                continue  # the server stopped waiting for this one
            replies.append(reply)
        if is_train:
            self.train_rounds.append(replies)
            if server_round is not None:
                self.replies_of_round[server_round] = replies
        return replies


__all__ = ["EngineLikeGrid", "SimulatedCrash", "set_task_identity", "SERVER_NODE"]
