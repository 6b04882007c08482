"""fedsparse in a real Flower deployment: a SuperLink and two SuperNodes on 127.0.0.1, runs
submitted with ``flwr run``, results and byte counts checked.

One deployment (module fixture) serves every run; it is stopped — SuperLink, SuperNodes and the
SuperExec / ServerApp / ClientApp processes below them — when the module ends, pass or fail.
Each run is 2 rounds with both SuperNodes sampled; the ServerApp writes to a tmp ``out-dir``
given through ``--run-config`` (its working directory is not ours).
"""

from __future__ import annotations

import json
import math
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from deploy_harness import PROJECT_DIR, LocalDeployment, data_env, self_signed_tls  # tests/ is on sys.path
from flwr.app import ArrayRecord
from proctree import descendants, process_alive

from fedsparse.config import resolve_config
from fedsparse.server import initial_model
from fedsparse.traffic import DeploymentError, traffic_report

pytestmark = pytest.mark.deployment

NODES = 2
BASE: dict[str, Any] = {
    "num-clients": NODES,
    "clients-per-round": NODES,
    "rounds": 2,
    "local-steps": 3,
    "batch-size": 32,
    "lr": 0.05,
    "eval-every": 2,
    "eval-batch-size": 2500,
    "seed": 5,
}
#: Per strategy: the extra keys of its run (small, but exercising what makes the method differ).
RUNS: dict[str, dict[str, Any]] = {
    "feddip": {"initial-sparsity": 0.5, "target-sparsity": 0.8, "reconfig-every": 1},
    "fedluar": {"recycled-layers": 2, "momentum": 0.9, "persist-momentum": True},
}


def _process_env(work: Path) -> dict[str, str]:
    """What the SuperLink (ServerApp) and SuperNodes (ClientApps) need: the data, offline HF, and a
    split cache of their own. The data root is pinned in FEDSPARSE_DATA (data_env: conftest has
    already done it for this process) since their XDG_CACHE_HOME no longer leads to the user cache."""
    return {**data_env(), "HF_DATASETS_OFFLINE": "1", "XDG_CACHE_HOME": str(work / "xdg-cache")}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalDeployment]:
    work = tmp_path_factory.mktemp("deployment")
    dep = LocalDeployment(work, NODES, env=_process_env(work))
    with dep:
        started = [p.popen.pid for p in dep.processes]
        yield dep
        # everything the deployment started, as it stands before stopping
        tree = started + [d for pid in started for d in descendants(pid)]
    # a fresh listing after stop (whatever carries the deployment's FLWR_HOME, orphans included),
    # plus the tree seen before it
    leftover = sorted(set(dep.running()) | {pid for pid in tree if process_alive(pid)})
    assert not leftover, f"processes still running after stop: {leftover}"


def _dense_payload(run: dict[str, Any]) -> int:
    """Payload of the dense float32 model (arrays + keys): what FedAvg ships per message."""
    model = ArrayRecord(initial_model(resolve_config(run)).state_dict())
    return sum(len(arr.data) + len(key) for key, arr in model.items())


@pytest.mark.parametrize("strategy", list(RUNS))
def test_strategy_in_deployment(deployment: LocalDeployment, strategy: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = {**BASE, **RUNS[strategy], "strategy": strategy, "out-dir": str(out)}
    record = deployment.run(PROJECT_DIR, run, timeout=600)

    # --- the result files the ServerApp wrote ------------------------------------------------------
    rounds = pd.read_csv(out / "rounds.csv", keep_default_na=False, na_values=[""])
    assert rounds["round"].tolist() == [1, 2]
    assert (rounds["strategy"] == strategy).all()
    assert (rounds["clients"] == NODES).all() and (rounds["replies"] == NODES).all()
    assert (rounds["failures"] == 0).all()
    final = float(rounds["test_accuracy"].iloc[-1])
    assert 0.0 <= final <= 1.0 and math.isnan(float(rounds["test_accuracy"].iloc[0]))  # eval-every = 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == strategy and summary["final_accuracy"] == pytest.approx(final)
    assert tomllib.loads((out / "config.toml").read_text())["strategy"] == strategy

    # --- every train message metered: payload and wire size (exact to a few bytes), per client -----
    msgs = pd.read_csv(out / "messages.csv")
    assert len(msgs) == 2 * 2 * NODES and set(msgs["message_type"]) == {"train"}
    assert sorted(msgs["partition_id"].unique()) == list(range(NODES))  # node → partition discovered
    # wire = payload + Flower's framing: a few hundred bytes per array object and per record
    arrays = pd.read_csv(out / "layer_bytes.csv").groupby(["round", "direction"])["array"].nunique()
    per_msg = msgs.join(arrays.rename("arrays"), on=["round", "direction"])
    framing = per_msg["wire_bytes"] - per_msg["payload_bytes"]
    assert (framing > 0).all() and (framing < 800 * (per_msg["arrays"] + 4)).all(), per_msg
    per_round = msgs.groupby(["round", "direction"])[["payload_bytes", "wire_bytes"]].sum().unstack()
    assert per_round["payload_bytes"]["up"].tolist() == rounds["bytes_up"].tolist()
    assert per_round["wire_bytes"]["down"].tolist() == rounds["wire_bytes_down"].tolist()

    # --- the SuperLink's own count agrees with the ledger's wire bytes ----------------------------
    report = traffic_report(out, record)
    assert report["status"] == "finished:completed"
    assert json.loads((out / "superlink_traffic.json").read_text())["superlink_sent"] == report["superlink_sent"]
    # The SuperLink also moves the partition QUERY and the Fleet API framing, and does not receive
    # an object it already holds twice: close to, not equal to, the sum of the messages' objects.
    assert report["superlink_sent_over_wire_down"] == pytest.approx(1.0, abs=0.1), report
    assert report["superlink_received_over_wire_up"] == pytest.approx(1.0, abs=0.1), report

    # --- the method's own client step ran in the deployed ClientApp -------------------------------
    dense = _dense_payload(run)
    if strategy == "feddip":
        # round 1 is dense (dense-rounds = 1, the default: the first mask keeps the largest weights of
        # its aggregate); round 2 is sparse both ways, each message well under the dense payload
        first, second = msgs[msgs["round"] == 1], msgs[msgs["round"] == 2]
        assert (first["payload_bytes"] > 0.95 * dense).all(), msgs
        assert (second["payload_bytes"] < 0.8 * dense).all(), msgs
        # the model each round ends with is pruned: m_0 is applied to round 1's aggregate
        assert (rounds["sparsity"] >= 0.5).all(), rounds["sparsity"]
    elif strategy == "fedluar":
        # round 1 aggregates everything; in round 2 clients omit the two recycled layers
        assert pd.isna(rounds["recycled_layers"].iloc[0]) and rounds["num_recycled"].tolist() == [0, 2]
        recycled = str(rounds["recycled_layers"].iloc[1]).split(";")
        init = ArrayRecord(initial_model(resolve_config(run)).state_dict())
        omitted = sum(len(init[k].data) + len(k) for k in recycled)
        assert rounds["bytes_up"].iloc[1] == rounds["bytes_up"].iloc[0] - NODES * omitted
        assert rounds["wire_bytes_up"].iloc[1] < rounds["wire_bytes_up"].iloc[0]


def test_own_clientapp_in_deployment(deployment: LocalDeployment, tmp_path: Path) -> None:
    """examples/byo_clientapp — a user's own ServerApp and ClientApp (own model and data) using
    FedDIP's strategy and client pieces — on the same SuperLink and SuperNodes."""
    example = PROJECT_DIR / "examples" / "byo_clientapp"
    out = tmp_path / "out"
    project = (example / "pyproject.toml").read_bytes()
    record = deployment.run(example, {"strategy": "feddip", "num-server-rounds": 2, "out-dir": str(out)}, timeout=600)
    # `flwr run` rewrites a pyproject.toml that still has legacy [tool.flwr.federations]; ours has none
    assert (example / "pyproject.toml").read_bytes() == project
    result = json.loads((out / "result.json").read_text())
    assert [h["round"] for h in result["history"]] == [0, 1, 2]
    assert all(0.0 <= h["accuracy"] <= 1.0 for h in result["history"])
    msgs = pd.read_csv(out / "messages.csv")
    assert len(msgs) == 2 * 2 * NODES and sorted(msgs["round"].unique()) == [1, 2]
    # the example's model is small; FedDIP's codec payloads still come in under its dense size
    sys.path.insert(0, str(example))
    try:
        from byo_app.task import Net
    finally:
        sys.path.remove(str(example))
    dense = sum(len(a.data) + len(k) for k, a in ArrayRecord(Net().state_dict()).items())
    assert (msgs["payload_bytes"] < dense).all(), msgs
    report = traffic_report(out, record)
    assert report["superlink_sent_over_wire_down"] == pytest.approx(1.0, abs=0.15), report
    assert report["superlink_received_over_wire_up"] == pytest.approx(1.0, abs=0.15), report


def test_failed_run_is_reported(deployment: LocalDeployment, tmp_path: Path) -> None:
    """A run whose ServerApp fails ends `finished:failed`; the error carries its log."""
    bad = {**BASE, "clients-per-round": NODES + 1, "out-dir": str(tmp_path)}  # a ConfigError in the ServerApp
    with pytest.raises(DeploymentError, match="(?s)finished:failed.*exceeds num-clients"):
        deployment.run(PROJECT_DIR, bad, timeout=300)
    assert not (tmp_path / "rounds.csv").exists()


def test_tls_deployment(tmp_path: Path) -> None:
    """The TLS flags of docs/deployment.md: SuperLink --ssl-*, SuperNode --root-certificates,
    `root-certificates` in the flwr connection; a one-round run goes through all of them."""
    tls = self_signed_tls(tmp_path / "certs")
    with LocalDeployment(tmp_path / "tls", 1, env=_process_env(tmp_path), tls=tls) as dep:
        config = (dep.flwr_home / "config.toml").read_text()
        assert "insecure" not in config and str(tls.ca) in config
        out = tmp_path / "out"
        record = dep.run(
            PROJECT_DIR,
            {**BASE, "num-clients": 1, "clients-per-round": 1, "rounds": 1, "eval-every": 1, "out-dir": str(out)},
            timeout=600,
        )
        assert record["status"] == "finished:completed"
        assert pd.read_csv(out / "rounds.csv")["replies"].tolist() == [1]
        superlink_log = dep.processes[0].tail(1 << 20)
        assert "--insecure" not in " ".join(dep.processes[0].popen.args)
        assert "insecure" not in superlink_log.lower(), superlink_log[-2000:]
    assert not dep.running(), "processes still running after stop"
