"""examples/byo_clientapp: a user's own ServerApp and ClientApp with fedsparse's strategies.

The example's real ``ServerApp`` (Flower's ``Strategy.start`` loop) and real ``ClientApp`` run in
this process, connected by a ``Grid`` that hands each message to the ClientApp with one persistent
``Context`` per node — the messages are the ones a SuperLink would carry (tests/test_deployment.py
runs the same example on a real SuperLink and SuperNodes). Checked: every strategy trains the
user's model, and what travels is what the method promises (sparse both ways for FedDIP, recycled
layers missing from FedLUAR's replies), measured by the MeteredGrid the example wraps around the
grid.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any, Iterable, Iterator

import pandas as pd
import pytest
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "byo_clientapp"
DEFAULTS: dict[str, Any] = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
NODES = 2


class InProcessGrid(Grid):
    """A Grid whose nodes are a ClientApp in this process (one persistent Context per node)."""

    def __init__(self, client_app: ClientApp, run_config: dict[str, Any], num_nodes: int) -> None:
        self.client_app = client_app
        self.contexts = {
            100 + i: Context(
                run_id=1, node_id=100 + i, node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(), run_config=dict(run_config),
            )
            for i in range(num_nodes)
        }
        self.train_rounds: list[tuple[list[Message], list[Message]]] = []

    def set_run(self, run) -> None:  # type: ignore[no-untyped-def]
        pass

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        raise NotImplementedError("Strategy.start uses send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        raise NotImplementedError("Strategy.start uses send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = [self.client_app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            self.train_rounds.append((messages, replies))
        return replies


@pytest.fixture()
def example(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The example's modules, imported from examples/byo_clientapp (as a FAB would)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # messages outside a running app
    import byo_app.client_app
    import byo_app.server_app
    import byo_app.task

    yield byo_app
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
    for name in [m for m in sys.modules if m == "byo_app" or m.startswith("byo_app.")]:
        del sys.modules[name]


def _run(example: Any, tmp_path: Path, **over: Any) -> tuple[InProcessGrid, dict[str, Any], pd.DataFrame]:
    run_config = {**DEFAULTS, "num-server-rounds": 3, "local-steps": 10, "out-dir": str(tmp_path), **over}
    grid = InProcessGrid(example.client_app.app, run_config, NODES)
    server_context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    example.server_app.app(grid, server_context)
    result = json.loads((tmp_path / "result.json").read_text())
    return grid, result, pd.read_csv(tmp_path / "messages.csv")


def _dense_bytes(example: Any) -> int:
    model = ArrayRecord(example.task.Net().state_dict())
    return sum(len(a.data) + len(k) for k, a in model.items())


def test_fedavg_trains_the_users_model(example: Any, tmp_path: Path) -> None:
    grid, result, msgs = _run(example, tmp_path, strategy="fedavg")
    accuracy = [h["accuracy"] for h in result["history"]]
    assert [h["round"] for h in result["history"]] == [0, 1, 2, 3]
    assert accuracy[-1] > accuracy[0] + 0.2, accuracy  # 4 well-separated classes: learns in 3 rounds
    # the MeteredGrid in the user's ServerApp: one row per train message, labelled by round
    assert sorted(msgs["round"].unique()) == [1, 2, 3] and len(msgs) == 3 * 2 * NODES
    assert (msgs["wire_bytes"] > msgs["payload_bytes"]).all()
    assert (msgs["payload_bytes"] >= _dense_bytes(example)).all()  # the dense model both ways


def test_feddip_sparse_both_ways(example: Any, tmp_path: Path) -> None:
    grid, result, msgs = _run(example, tmp_path, strategy="feddip", **{"target-sparsity": 0.8})
    dense = _dense_bytes(example)
    # the pruned model travels through the codec: every message far below the dense model
    assert (msgs["payload_bytes"] < 0.6 * dense).all(), msgs
    final = ArrayRecord(example.task.Net().state_dict())  # keys of the user's model
    replies = grid.train_rounds[-1][1]
    assert all(set(r.content["arrays"].keys()) != set(final.keys()) for r in replies)  # codec arrays, not tensors
    assert 0.0 <= result["history"][-1]["accuracy"] <= 1.0


def test_fedluar_replies_omit_recycled_layers(example: Any, tmp_path: Path) -> None:
    grid, result, msgs = _run(example, tmp_path, strategy="fedluar", **{"recycled-layers": 1})
    names = set(example.task.Net().state_dict())
    (_, first), *_, (last_msgs, last) = grid.train_rounds
    assert all(set(r.content["arrays"].keys()) == names for r in first)  # round 1: everything
    recycled = list(last_msgs[0].content["config"]["luar-recycled"])
    assert len(recycled) == 1 and recycled[0] in names
    assert all(set(r.content["arrays"].keys()) == names - set(recycled) for r in last)
    up = msgs[msgs.direction == "up"].groupby("round")["payload_bytes"].sum()
    assert up[3] < up[1]
    assert result["history"][-1]["accuracy"] > result["history"][0]["accuracy"]


def test_partial_update_patches_the_held_model(example: Any, tmp_path: Path) -> None:
    grid, result, msgs = _run(example, tmp_path, strategy="partial-update", **{"update-ratio": 0.1})
    dense = _dense_bytes(example)
    down = msgs[msgs.direction == "down"].groupby("round")["payload_bytes"].max()
    assert down[1] > 0.9 * dense  # round 1: the whole model (initial-sync = dense; codec-packed)
    assert down[2] < 0.5 * dense and down[3] < 0.5 * dense  # then a patch of ~10 % of the weights
    # each client keeps the deployed model in its Context and reports the version it holds
    from clients.partial_update import load_held

    versions = [load_held(ctx)[1] for ctx in grid.contexts.values()]
    replies = grid.train_rounds[-1][1]
    assert sorted(int(r.content["metrics"]["pu-version"]) for r in replies) == sorted(versions)
    assert len(set(versions)) == 1 and versions[0] >= 2
    assert result["history"][-1]["accuracy"] > result["history"][0]["accuracy"]
