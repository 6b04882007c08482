"""examples/third_party_method: a method added to fedsparse by ``pip install`` alone (fedavg-signs).

The example is built and installed with pip (offline, no build isolation) into a private directory
that the subprocesses put on ``PYTHONPATH`` — not into the test venv: fedsparse discovers methods
from whatever is installed, so a plug-in left in the venv would add its key to every other test's
schema (tests/test_config.py compares pyproject.toml with it, docs/errors.md would gain its error
case), and an editable install would also race other runs sharing the venv. Discovery is cached per
process (:func:`fedsparse.methods.methods`), so everything that needs the plug-in runs in a
subprocess: the real ``fedsparse`` CLI (a Ray simulation), the configuration checks, and — slow —
``flwr run .`` in a copy of the example directory on its own defaults.

The payload format and the strategy's arithmetic are checked in this process, without Ray: the
example's modules are imported from examples/third_party_method (no discovery involved), and its
client step answers real train messages through a loopback grid (tests/loopback.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
from loopback import LoopbackGrid, set_task_identity, train_reply

from fedsparse.accounting import array_record_bytes
from fedsparse.checkpoint import pack_state, unpack_state
from fedsparse.config import resolve_config
from fedsparse.global_model import initial_model
from fedsparse.methods import strategy_names
from fedsparse.validation import spec_of

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "third_party_method"
NAME = "fedavg-signs"
BIN = Path(sys.executable).parent  # the venv's bin: fedsparse, flwr, flower-superlink
#: The run of the CLI test (the brief's tiny configuration).
TINY = {
    "dataset": "fashion-mnist",
    "model": "lenet5",
    "num-clients": 4,
    "clients-per-round": 2,
    "rounds": 2,
    "local-steps": 5,
    "eval-batch-size": 5000,
    "wire-bytes": False,
}


# ------------------------------------------------------------------------------------------------
# installed copy, for the subprocesses
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example pip-installed into a private target directory (built from a copy, so setuptools'
    build/ and *.egg-info never land in the checkout)."""
    work = tmp_path_factory.mktemp("third_party_method")
    src, site = work / "src", work / "site"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--target",
        str(site),
        str(src),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (site / "fedsparse_example_method" / "client.py").is_file()  # the wheel carries both sides
    return site


def _env(site: Path, **extra: str) -> dict[str, str]:
    """This process's environment (data root, offline HF, split cache) + the plug-in on PYTHONPATH
    and the venv's bin first on PATH (flwr starts `flower-superlink` by name)."""
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def _fedsparse() -> str:
    exe = BIN / "fedsparse"
    return str(exe) if exe.exists() else str(shutil.which("fedsparse"))


# ------------------------------------------------------------------------------------------------
# in process: the payload and the strategy's arithmetic (no Ray, no discovery)
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def example(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The example's modules, imported from examples/third_party_method."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    set_task_identity(node_id=0)  # messages outside a running app
    import fedsparse_example_method.client
    import fedsparse_example_method.protocol
    import fedsparse_example_method.strategy

    yield fedsparse_example_method
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
    for name in [m for m in sys.modules if m.split(".")[0] == "fedsparse_example_method"]:
        del sys.modules[name]


def test_payload_round_trip_and_size(example: Any) -> None:
    protocol = example.protocol
    rng = np.random.default_rng(3)
    update: dict[str, np.ndarray] = {
        "conv.weight": rng.normal(size=(6, 1, 5, 5)).astype(np.float32),
        "conv.bias": np.array([0.5, -0.25, 0.0, 1.0, -1.0, 0.0], np.float32),  # zeros are sent as +
        "bn.num_batches_tracked": np.array(7, np.int64),  # 0-d, raw
        "fc.weight": rng.normal(size=(10, 13)).astype(np.float32),  # 130 + 150 + 6 = 286 signs: 2 padding bits
    }
    raw = ["bn.num_batches_tracked"]
    spec = spec_of(update)
    record = protocol.encode(update, raw=raw)
    assert list(record.keys()) == [protocol.SIGNS_KEY, protocol.SCALES_KEY, *raw]
    # the format's arithmetic: ⌈d/8⌉ sign bytes + one float32 per sign-coded tensor + the raw buffer
    data = {k: a.numpy().nbytes for k, a in record.items()}
    assert data == {protocol.SIGNS_KEY: math.ceil(286 / 8), protocol.SCALES_KEY: 4 * 3, raw[0]: 8}
    assert sum(data.values()) == protocol.payload_nbytes(spec, raw) == 36 + 12 + 8

    decoded = protocol.decode(record, spec)
    for name in ("conv.weight", "conv.bias", "fc.weight"):
        x = update[name]
        assert decoded.signs[name].shape == x.shape
        assert np.array_equal(decoded.signs[name], np.where(x >= 0, 1, -1))
        assert decoded.scales[name] == pytest.approx(float(np.abs(x).mean()), rel=1e-6)
    tensors = decoded.tensors(spec)
    assert spec_of(tensors) == spec  # shapes and dtypes of the model, 0-d buffer included
    assert tensors["bn.num_batches_tracked"] == 7
    np.testing.assert_allclose(
        tensors["conv.bias"], 2.75 / 6 * np.array([1, -1, 1, 1, -1, 1], np.float32), rtol=1e-6
    )  # mean |Δ| · ±1

    # a dense float32 LeNet-5 update is ~32x bigger than its scaled signs, Flower's .npy headers included
    model = ArrayRecord(initial_model(resolve_config({**TINY, "strategy": "fedavg"})).state_dict())
    lenet = {k: a.numpy() for k, a in model.items()}
    d = sum(x.size for x in lenet.values())
    signs = protocol.encode(lenet)
    assert protocol.payload_nbytes(spec_of(lenet)) == math.ceil(d / 8) + 4 * len(lenet)
    ratio = sum(array_record_bytes(signs).values()) / sum(array_record_bytes(model).values())
    assert 1 / 33 < ratio < 1 / 28, ratio


@pytest.mark.parametrize(
    ("corrupt", "fragment"),
    [
        (lambda r, k: {**r, k.SIGNS_KEY: Array(r[k.SIGNS_KEY].numpy()[:-1])}, "bytes of signs for 286"),
        (lambda r, k: {**r, k.SIGNS_KEY: Array(r[k.SIGNS_KEY].numpy() | np.uint8(1))}, "padding bits"),
        (lambda r, k: {**r, k.SCALES_KEY: Array(-r[k.SCALES_KEY].numpy())}, "finite and >= 0"),
        (lambda r, k: {**r, k.SCALES_KEY: Array(r[k.SCALES_KEY].numpy().astype(np.float64))}, "1-d float32"),
        (lambda r, k: {**r, "extra": Array(np.zeros(2, np.float32))}, "the model does not have: extra"),
        (lambda r, k: {n: a for n, a in r.items() if n != k.SCALES_KEY}, "no 'sign:scales'"),
    ],
    ids=["short", "padding", "negative-scale", "float64-scales", "unknown-array", "no-scales"],
)
def test_decode_rejects_corrupt_payloads(example: Any, corrupt: Any, fragment: str) -> None:
    protocol = example.protocol
    update = {"w": np.linspace(-1, 1, 280, dtype=np.float32).reshape(28, 10), "b": np.ones(6, np.float32)}
    record = dict(protocol.encode(update).items())
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        protocol.decode(ArrayRecord(corrupt(record, protocol)), spec_of(update))


def test_strategy_and_client_step_in_process(example: Any, tmp_path: Path) -> None:
    """Real train messages, the example's client step, its reply screen and its aggregation:
    the new model is exactly w + η·Σρᵢ·sᵢ·sign(Δᵢ)."""
    assert NAME not in strategy_names()  # this process has no plug-in: the CLI tests install it
    cfg = resolve_config({**TINY, "strategy": "fedavg", "num-clients": 2})  # LocalRound never reads `strategy`
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return example.client.sign_train(msg, context, cfg)

    grid = LoopbackGrid(app, 2)
    eta = 2.0
    strategy = example.strategy.FedAvgSigns(
        eta, fraction_train=1.0, min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0
    )
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    spec = spec_of(arrays)
    replies = grid.send_and_receive(strategy.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid))
    assert len(replies) == 2 and all(strategy.validate_reply(1, r) is None for r in replies)
    for r in replies:  # nothing but the scaled signs goes up
        assert {k: a.numpy().nbytes for k, a in r.content.array_records["arrays"].items()} == {
            "sign:bits": math.ceil(sum(math.prod(s) for s, _ in spec.values()) / 8),
            "sign:scales": 4 * len(spec),
        }
    # the reply screen rejects what does not decode, and a trained tensor sent raw
    short = {"sign:bits": Array(np.zeros(3, np.uint8)), "sign:scales": Array(np.zeros(len(spec), np.float32))}
    assert "does not decode (3 bytes of signs" in str(
        strategy.validate_reply(1, train_reply(replies[0], ArrayRecord(short), 10))
    )
    first = next(iter(spec))
    tensors = example.protocol.decode(replies[0].content.array_records["arrays"], spec).tensors(spec)
    one_raw = train_reply(replies[0], example.protocol.encode(tensors, raw=[first]), 10)
    assert f"arrays sent raw: ['{first}']" in str(strategy.validate_reply(1, one_raw))

    new, metrics = strategy.aggregate_train(1, replies)
    assert new is not None and metrics is not None
    n = [float(r.content.metric_records["metrics"]["num-examples"]) for r in replies]  # type: ignore[arg-type]  # a scalar metric
    decoded = [example.protocol.decode(r.content.array_records["arrays"], spec) for r in replies]
    for name, x in arrays.items():
        expected = x.numpy().astype(np.float64) + eta * sum(
            (ni / sum(n)) * u.scales[name] * u.signs[name] for ni, u in zip(n, decoded)
        )
        np.testing.assert_allclose(new[name].numpy(), expected.astype(np.float32), rtol=1e-6, atol=1e-7)
        assert new[name].numpy().dtype == x.numpy().dtype
    agreement = strategy.round_report(1)["sign_agreement"]
    assert 0.5 < agreement <= 1.0  # two clients from the same model on IID data mostly agree
    # state survives a checkpoint (packed as fedsparse's checkpoint packs it, through JSON)
    structure, saved_arrays = pack_state(strategy.state_dict())
    fresh = example.strategy.FedAvgSigns(eta)
    fresh.load_state_dict(unpack_state(json.loads(json.dumps(structure)), saved_arrays))
    assert fresh.round_report(1) == {"sign_agreement": agreement}
    assert fresh.final_report(tmp_path) == {"mean_sign_agreement": agreement}


# ------------------------------------------------------------------------------------------------
# through fedsparse, with the plug-in installed (subprocesses)
# ------------------------------------------------------------------------------------------------

_CONFIG_PROBE = """
import contextlib, io, json, sys, tomllib
from fedsparse.cli import main
from fedsparse.config import ConfigError, defaults, resolve_config
from fedsparse.methods import methods
listing = io.StringIO()
with contextlib.redirect_stdout(listing):
    main(["config", "--section", "fedavg-signs"])
def error(over):
    try:
        resolve_config({"strategy": "fedavg-signs", **over})
    except ConfigError as err:
        return str(err)
    return None
table = tomllib.load(open(sys.argv[1], "rb"))["tool"]["flwr"]["app"]["config"]
schema = defaults(["fedsparse", "fedsparse-example-method"])  # what `fedsparse dev pyproject-sync` writes for it
cases = [error(dict(c.overrides)) for c in methods()["fedavg-signs"].error_cases]
print(json.dumps({
    "listing": listing.getvalue(),
    "default": resolve_config({"strategy": "fedavg-signs"})["sign-server-lr"],
    "zero": error({"sign-server-lr": 0.0}),
    "below_bound": error({"sign-server-lr": 2.44}),  # √6 = 2.449...
    "cases": cases,
    "missing_from_table": sorted(set(schema) - set(table)),
    "unknown_in_table": sorted(set(table) - set(schema)),
    "table_resolves": resolve_config(table)["strategy"],
}))
"""


def test_config_knows_the_plugin_key(plugin_site: Path, tmp_path: Path) -> None:
    env = _env(plugin_site)
    probe = subprocess.run(
        [sys.executable, "-c", _CONFIG_PROBE, str(EXAMPLE / "pyproject.toml")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    assert got["listing"].startswith("sign-server-lr") and "[fedavg-signs]" in got["listing"]
    assert got["default"] == 1.0 and got["below_bound"] is None
    assert got["zero"].startswith("sign-server-lr = 0.0 is out of range; allowed: ") and got["zero"].endswith(
        "float > 0.0"
    )
    assert len(got["cases"]) == 1 and "sign-server-lr = 10.0 exceeds √6" in got["cases"][0]
    # flwr run accepts a --run-config key only if the app's table lists it: every key, none unknown
    assert got["missing_from_table"] == [] and got["unknown_in_table"] == []
    assert got["table_resolves"] == NAME

    # the real CLI: a bad value of the plug-in's key stops before anything starts, exit code 2
    out = tmp_path / "never"
    run = subprocess.run(
        [_fedsparse(), "run", "--set", f"strategy={NAME}", "--set", "sign-server-lr=10", "--out", str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert (
        "fedsparse: error: sign-server-lr = 10.0 exceeds √6" in run.stderr
        and "allowed: 0 < sign-server-lr <=" in run.stderr
    )
    assert not out.exists()


@pytest.mark.ray
def test_cli_run_with_the_plugin(plugin_site: Path, tmp_path: Path) -> None:
    """``fedsparse run CONFIG --set strategy=fedavg-signs``: a Ray simulation whose uplink is the
    scaled signs — nothing else goes up, ~1/31 of dense FedAvg's bytes."""
    config = tmp_path / "tiny.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in TINY.items()))
    out = tmp_path / "out"
    proc = subprocess.run(
        [_fedsparse(), "run", str(config), "--set", f"strategy={NAME}", "--out", str(out), "--quiet"],
        env=_env(plugin_site),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rounds = pd.read_csv(out / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2] and (rounds["strategy"] == NAME).all()
    assert (rounds["replies"] == 2).all() and (rounds["rejected"] == 0).all() and (rounds["failures"] == 0).all()
    assert "sign_agreement" in rounds and rounds["sign_agreement"].between(0.5, 1.0).all(), rounds["sign_agreement"]
    # per round: the dense model would have cost cum_dense_bytes_up's increment; the signs ~1/31 of it
    dense_up = rounds["cum_dense_bytes_up"].diff().fillna(rounds["cum_dense_bytes_up"])
    ratio = rounds["bytes_up"] / dense_up
    assert ((1 / 40 < ratio) & (ratio < 1 / 25)).all(), ratio
    # exactly the two payload arrays went up, each with ⌈d/8⌉ / 4·T data bytes (+ Flower's .npy header + key)
    model = ArrayRecord(initial_model(resolve_config({**TINY, "strategy": "fedavg"})).state_dict())
    d, tensors = sum(a.numpy().size for a in model.values()), len(model)
    layers = pd.read_csv(out / "layer_bytes.csv")
    up = layers[layers["direction"] == "up"].groupby(["round", "array"])["bytes"].sum().unstack()
    assert sorted(up.columns) == ["sign:bits", "sign:scales"]
    expected = array_record_bytes(
        ArrayRecord(
            {
                "sign:bits": Array(np.zeros(math.ceil(d / 8), np.uint8)),
                "sign:scales": Array(np.zeros(tensors, np.float32)),
            }
        )
    )
    assert up["sign:bits"].tolist() == [2 * expected["sign:bits"]] * 2
    assert up["sign:scales"].tolist() == [2 * expected["sign:scales"]] * 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mean_sign_agreement"] == pytest.approx(rounds["sign_agreement"].mean())


# ------------------------------------------------------------------------------------------------
# `flwr run .` on the example's own defaults (slow: a local SuperLink, a FAB, a Ray simulation)
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
@pytest.mark.ray
def test_flwr_run_on_the_example_defaults(plugin_site: Path, tmp_path: Path) -> None:
    """``flwr run .`` in (a copy of) the example: Flower's local SuperLink, started by flwr itself
    with a private FLWR_HOME and ports, runs fedsparse's ServerApp and ClientApp, which find the
    plug-in by its entry point. ``sign-server-lr`` passes Flower's --run-config check because the
    app's table lists it. Every process carrying the private FLWR_HOME is stopped afterwards."""
    from proctree import processes_with_env, stop_tree

    app = tmp_path / "app"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    project = (app / "pyproject.toml").read_bytes()
    home, out = tmp_path / "flwr-home", tmp_path / "out"
    env = _env(
        plugin_site,
        FLWR_HOME=str(home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
    )
    cmd = [str(BIN / "flwr"), "run", ".", "--stream", "--run-config", f"out-dir='{out}' sign-server-lr=2.0"]
    try:
        proc = subprocess.run(cmd, env=env, cwd=app, capture_output=True, text=True, timeout=600, check=False)
    finally:
        stop_tree([], extra=lambda: processes_with_env("FLWR_HOME", str(home)))
    log = proc.stdout[-4000:] + proc.stderr[-3000:]
    assert proc.returncode == 0 and (out / "rounds.csv").is_file(), log
    assert not processes_with_env("FLWR_HOME", str(home))
    assert (app / "pyproject.toml").read_bytes() == project  # no legacy [tool.flwr.federations] to migrate
    defaults = tomllib.loads(project.decode())["tool"]["flwr"]["app"]["config"]
    used = tomllib.loads((out / "config.toml").read_text())
    assert used == {**defaults, "out-dir": str(out), "sign-server-lr": 2.0}
    rounds = pd.read_csv(out / "rounds.csv")
    assert rounds["round"].tolist() == list(range(1, int(defaults["rounds"]) + 1))
    assert (rounds["replies"] == defaults["clients-per-round"]).all() and "sign_agreement" in rounds
    assert (rounds["comm_ratio_up"] < 1 / 25).all()
