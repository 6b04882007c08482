"""examples/byo_clientapp: a user's own ServerApp and ClientApp with fedsparse's strategies.

The example's real ``ServerApp`` (Flower's ``Strategy.start`` loop) and real ``ClientApp`` run in
this process, connected by a ``Grid`` (tests/loopback.py) that hands each message to the ClientApp
with one persistent ``Context`` per node — the messages are the ones a SuperLink would carry
(tests/test_deployment.py runs the same example on a real SuperLink and SuperNodes). Checked: every
strategy trains the user's model, and what travels is what the method promises (sparse both ways
for FedDIP, recycled layers missing from FedLUAR's replies), measured by the MeteredGrid the example
wraps around the grid.
"""

from __future__ import annotations

import json
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from flwr.app import ArrayRecord, Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from loopback import LoopbackGrid, set_task_identity

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "byo_clientapp"
DEFAULTS: dict[str, Any] = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
NODES = 2


@pytest.fixture()
def example(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The example's modules, imported from examples/byo_clientapp (as a FAB would)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    set_task_identity(node_id=0)  # messages outside a running app
    import byo_app.client_app
    import byo_app.server_app
    import byo_app.task

    yield byo_app
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
    for name in [m for m in sys.modules if m == "byo_app" or m.startswith("byo_app.")]:
        del sys.modules[name]


def _run(example: Any, tmp_path: Path, **over: Any) -> tuple[LoopbackGrid, dict[str, Any], pd.DataFrame]:
    run_config = {**DEFAULTS, "num-server-rounds": 3, "local-steps": 10, "out-dir": str(tmp_path), **over}
    grid = LoopbackGrid(example.client_app.app, NODES, run_config=run_config)
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
    # round 1 trains dense (FedDIP's default dense-rounds = 1); from round 2 the pruned model travels
    # through the codec: every message far below the dense model
    assert (msgs.loc[msgs["round"] == 1, "payload_bytes"] > 0.9 * dense).all(), msgs
    assert (msgs.loc[msgs["round"] > 1, "payload_bytes"] < 0.6 * dense).all(), msgs
    final = ArrayRecord(example.task.Net().state_dict())  # keys of the user's model
    replies = grid.exchanges[-1][1]
    assert all(set(r.content["arrays"].keys()) != set(final.keys()) for r in replies)  # codec arrays, not tensors
    assert 0.0 <= result["history"][-1]["accuracy"] <= 1.0


def test_fedluar_replies_omit_recycled_layers(example: Any, tmp_path: Path) -> None:
    grid, result, msgs = _run(example, tmp_path, strategy="fedluar", **{"recycled-layers": 1})
    names = set(example.task.Net().state_dict())
    (_, first), *_, (last_msgs, last) = grid.exchanges
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
    replies = grid.exchanges[-1][1]
    assert sorted(int(r.content["metrics"]["pu-version"]) for r in replies) == sorted(versions)
    assert len(set(versions)) == 1 and versions[0] >= 2
    assert result["history"][-1]["accuracy"] > result["history"][0]["accuracy"]
