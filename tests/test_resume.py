"""Checkpoint and resume: a run that is killed and resumed ends exactly like one that was not.

* in process (no Ray), for every registered strategy (FedDIP's masks re-pruned before the
  checkpoint; FedLUAR also over FedAdam and FedAvgM): the real round loop and ClientApp on an
  engine-like grid (``EngineLikeGrid`` in tests/loopback.py), crashed in the middle of a round
  after a checkpoint, resumed with fresh client contexts and new node ids → the same final arrays
  (bit for bit) and the same rounds table as an uninterrupted run; also resumed with
  ``checkpoint-every = 0`` (the same), and without the client-state mirror (not the same);
* on Flower's simulation engine (Ray): ``fedsparse run`` in a subprocess, ``kill -9`` once the
  round-3 checkpoint exists, ``fedsparse run --resume DIR`` → the same as 6 rounds straight
  (FedAvg in the default suite; FedDIP, FedLUAR and partial-update marked slow);
* the checkpoint format: nested state round trips exactly (LUAR's includes its base's own
  state: FedDIP's masks under feddip-luar), writes are atomic — every output file's, summary.json
  last — and a resume with a conflicting configuration is refused with a message naming the keys.
"""

from __future__ import annotations

import collections
import math
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord
from loopback import EngineLikeGrid, SimulatedCrash, set_task_identity, train_round

from clients.app import make_client_app
from fedsparse import checkpoint as ckpt
from fedsparse.accounting import Ledger
from fedsparse.config import ConfigError, resolve_config
from fedsparse.methods import strategy_names
from fedsparse.server import RunResult, run_server

ROOT = Path(__file__).resolve().parents[1]
# Timings differ between runs, and wire sizes by a few bytes (Flower's metadata carries random ids).
NOT_REPRODUCIBLE = [
    "round_seconds",
    "elapsed_seconds",
    "wire_bytes_up",
    "wire_bytes_down",
    "cum_wire_bytes_up",
    "cum_wire_bytes_down",
]


@pytest.fixture(autouse=True)
def _identity() -> None:
    set_task_identity()


# ------------------------------------------------------------------------------------------------
# the format
# ------------------------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, ArrayRecord):
        assert list(a.keys()) == list(b.keys())
        for k in a.keys():
            _same(a[k].numpy(), b[k].numpy())
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_nested_state_round_trips_exactly() -> None:
    state = {
        "masks": {"w": np.array([[True, False]]), "b": np.arange(3, dtype=np.int32)},
        "rng": np.random.default_rng(3).bit_generator.state,  # 128-bit integers
        "scores": {"l1": float("nan"), "l2": float("inf"), "l3": -0.1},
        "by_round": {1: "a", 2: [1, 2.5, None, True]},
        "pair": (1, (2, "x")),
        "tensor": torch.tensor([1.5, 2.5], dtype=torch.float64),
        "record": ArrayRecord({"z": Array(np.ones((2, 2), np.float16))}),
        "tricky": {"__nd__": 3},  # a user key that looks like the encoding's tags
        "scalar": np.float32(0.25),
    }
    packed, arrays = ckpt.pack_state(state)
    back = ckpt.unpack_state(packed, arrays)
    expected = dict(state, scalar=0.25)
    _same(back, expected)
    dq = ckpt.unpack_state(*ckpt.pack_state(collections.deque([1, 2], maxlen=4)))
    assert dq == [1, 2]
    with pytest.raises(TypeError, match=r"state at .bad has type object"):
        ckpt.pack_state({"bad": object()})


def _checkpoint(server_round: int, value: float) -> ckpt.Checkpoint:
    ledger = Ledger()
    ledger.rows.append(
        {
            "round": 1,
            "direction": "up",
            "partition_id": 0,
            "node_id": 2**63 + 5,
            "message_type": "train",
            "payload_bytes": 10,
            "wire_bytes": None,
        }
    )
    ledger.layer_bytes[(1, "up", "w")] += 7
    return ckpt.Checkpoint(
        server_round=server_round,
        config={"lr": 0.1, "strategy": "fedavg"},
        arrays=ArrayRecord({"w": Array(np.full(3, value, np.float32))}),
        strategy={"kind": "state_dict", "state": {"x": np.arange(4)}},
        rows=[{"round": 1, "test_accuracy": float("nan"), "aggregated": True}],
        ledger=ledger,
        rng=ckpt.capture_rng(),
        elapsed_seconds=1.5,
    )


def test_checkpoint_file_round_trip_and_atomic_replace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt.save_checkpoint(tmp_path, _checkpoint(2, 1.0))
    back = ckpt.load_checkpoint(tmp_path)
    assert back.server_round == 2 and back.config == {"lr": 0.1, "strategy": "fedavg"}
    assert back.arrays["w"].numpy().tolist() == [1.0, 1.0, 1.0]
    assert back.ledger.rows[0]["node_id"] == 2**63 + 5 and back.ledger.layer_bytes[(1, "up", "w")] == 7
    assert math.isnan(back.rows[0]["test_accuracy"]) and back.rows[0]["aggregated"] is True
    assert ckpt.read_checkpoint_config(tmp_path) == (2, {"lr": 0.1, "strategy": "fedavg"})

    # a write that dies half-way leaves the previous checkpoint intact and no temporary file
    real = np.savez

    def dying_savez(fh: Any, **members: Any) -> None:
        fh.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", dying_savez)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, _checkpoint(3, 2.0))
    monkeypatch.setattr(np, "savez", real)
    assert ckpt.load_checkpoint(tmp_path).server_round == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [ckpt.CHECKPOINT_FILE, ckpt.PREVIOUS_FILE, ckpt.LOG_FILE]
    )


def test_every_output_is_written_atomically_and_summary_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """config.toml (a resume reads it), rounds.csv, the checkpoint, the client-state files (their
    folder fsync'ed), the ledgers and plots all go through atomic_write; summary.json — the
    completion marker — comes last, after the plots."""
    import fedsparse.results

    written: list[str] = []
    synced: list[str] = []
    real_write, real_sync = ckpt.atomic_write, ckpt._fsync_dir

    def spy(path: Any, data: Any) -> Path:
        written.append(Path(path).name)
        return real_write(path, data)

    def sync_spy(path: Path) -> None:
        synced.append(Path(path).name)
        real_sync(path)

    monkeypatch.setattr(ckpt, "atomic_write", spy)
    monkeypatch.setattr(fedsparse.results, "atomic_write", spy)
    monkeypatch.setattr(ckpt, "_fsync_dir", sync_spy)
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # a previous run's marker: gone as soon as a new run starts
    cfg = _cfg(out, rounds=1, strategy="partial-update", **{"checkpoint-every": 1, "eval-every": 1})
    grid = EngineLikeGrid(make_client_app(cfg), 4)
    original = grid.send_and_receive

    def checking(messages: Any, **kw: Any) -> Any:
        messages = list(messages)
        if train_round(messages) is not None:
            assert not (out / "summary.json").exists()
        return original(messages, **kw)

    grid.send_and_receive = checking  # type: ignore[method-assign]  # a spy around the real method
    run_server(grid, cfg, out, show_progress=False)
    assert written[0] == "config.toml" and written[-1] == "summary.json"
    for name in (
        "rounds.csv",
        ckpt.CHECKPOINT_FILE,
        "messages.csv",
        "layer_bytes.csv",
        "accuracy_vs_round.png",
        "accuracy_vs_mb.png",
    ):
        assert name in written, name
    assert any(n.endswith(".rd") for n in written) and ckpt.CLIENT_STATE_DIR in synced
    assert written.index("accuracy_vs_mb.png") < written.index("summary.json")
    assert not [p.name for p in out.rglob(".*")], "a temporary file was left behind"


def test_rng_state_round_trips() -> None:
    import random

    state = ckpt.unpack_state(*ckpt.pack_state(ckpt.capture_rng()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_unreadable_or_missing_checkpoints_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint in"):
        ckpt.load_checkpoint(tmp_path)
    (tmp_path / ckpt.CHECKPOINT_FILE).write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="cannot be read"):
        ckpt.load_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------
# in process: every registered strategy, crash mid-round, resume with fresh client contexts
# ------------------------------------------------------------------------------------------------

TINY = {
    "num-clients": 4,
    "clients-per-round": 3,
    "rounds": 3,
    "local-steps": 2,
    "batch-size": 16,
    "lr": 0.05,
    "momentum": 0.5,
    "eval-every": 3,
    "wire-bytes": False,
    "seed": 4,
}


def _cfg(out: Path, **over: Any) -> dict[str, Any]:
    if over.get("strategy") == "fedluar":
        over = {"persist-momentum": True, **over}  # momentum buffers in context.state
    return resolve_config({**TINY, "out-dir": str(out), **over})


def _compare(a: RunResult, b: RunResult) -> None:
    assert list(a.arrays.keys()) == list(b.arrays.keys())
    for k in a.arrays.keys():
        x, y = a.arrays[k].numpy(), b.arrays[k].numpy()
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), f"{k} differs"
    pd.testing.assert_frame_equal(
        a.rounds.drop(columns=NOT_REPRODUCIBLE, errors="ignore"),
        b.rounds.drop(columns=NOT_REPRODUCIBLE, errors="ignore"),
    )


#: Per strategy, settings that make its state change *before* the round-2 checkpoint: FedDIP
#: re-prunes every round (reconfig-every = 1; the default 5 would re-prune only at round 3, after the
#: checkpoint, and a resume that lost the masks would go unnoticed). Plus LUAR over the stateful
#: Flower server optimisers (FedAdam's m_t / v_t, FedAvgM's momentum), whose per-array state LUAR saves.
EXTRA: dict[str, dict[str, Any]] = {
    "feddip": {"reconfig-every": 1},
    "feddip-luar": {"reconfig-every": 1},
}
CASES = [(name, EXTRA.get(name, {})) for name in strategy_names()] + [
    ("fedluar", {"luar-base": "fedadam"}),
    ("fedluar", {"luar-base": "fedavgm", "luar-server-momentum": 0.9}),
    # the FedLUAR authors' setting: server-held slot momentum (its buffers are the wrapper's state),
    # uniform weighting and Glorot init, over FedAvg and under LUAR
    ("fedavg", {"client-momentum": "slot", "weighting": "uniform"}),
    (
        "fedluar",
        {"persist-momentum": False, "client-momentum": "slot", "weighting": "uniform", "init": "glorot"},
    ),
]


def _case_id(case: tuple[str, dict[str, Any]]) -> str:
    name, extra = case
    tail = "-slot" if extra.get("client-momentum") == "slot" else ""
    return name + ("" if "luar-base" not in extra else f"-{extra['luar-base']}") + tail


def _straight(tmp_path: Path, name: str, extra: dict[str, Any]) -> RunResult:
    cfg = _cfg(tmp_path / "straight", strategy=name, **extra)
    return run_server(EngineLikeGrid(make_client_app(cfg), 4), cfg, tmp_path / "straight", show_progress=False)


def _crash_after_round_2(out: Path, name: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Run with checkpoint-every = 2 and kill the server in round 3 (two clients already trained)."""
    cfg = _cfg(out, strategy=name, **{"checkpoint-every": 2, **extra})
    crashing = EngineLikeGrid(make_client_app(cfg), 4, crash_in_round=3, crash_after=2)
    with pytest.raises(SimulatedCrash):
        run_server(crashing, cfg, out, show_progress=False)
    assert ckpt.read_checkpoint_config(out)[0] == 2
    return cfg


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_crash_and_resume_in_process_is_bitwise_identical(case: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    name, extra = case
    straight = _straight(tmp_path, name, extra)
    if name in ("feddip", "feddip-luar"):  # the masks did change before the checkpoint
        assert straight.rounds["reconfigured"].tolist()[:2] == [True, True]

    out = tmp_path / "resumed"
    cfg = _crash_after_round_2(out, name, extra)
    # a new process: new node ids, client contexts empty (their state comes back from client-state/)
    fresh = EngineLikeGrid(make_client_app(cfg), 4, first_node_id=9000)
    resumed = run_server(fresh, cfg, out, show_progress=False, resume=True)
    _compare(straight, resumed)
    assert not any(m.has_error() for replies in fresh.received for m in replies)
    on_disk = pd.read_csv(out / "rounds.csv")
    assert on_disk["round"].tolist() == [1, 2, 3]
    messages = [
        pd.read_csv(d / "messages.csv").drop(columns=["node_id", "wire_bytes"]) for d in (tmp_path / "straight", out)
    ]
    pd.testing.assert_frame_equal(*messages)


def _differs(a: RunResult, b: RunResult) -> bool:
    return any(a.arrays[k].numpy().tobytes() != b.arrays[k].numpy().tobytes() for k in a.arrays.keys())


@pytest.mark.parametrize("name", ["fedluar", "partial-update", "topk"])
def test_resume_without_the_client_state_mirror_differs(name: str, tmp_path: Path) -> None:
    """Why the mirror exists: the same crash and resume, with client-state/ deleted before the
    resume (as in a deployment whose SuperNodes do not share out-dir), does not end like the
    uninterrupted run — LUAR's momentum and Top-k's residuals are gone, partial-update clients
    have no copy to patch (an error reply, then a dense resynchronisation)."""
    straight = _straight(tmp_path, name, {})
    out = tmp_path / "resumed"
    cfg = _crash_after_round_2(out, name, {})
    assert any((out / ckpt.CLIENT_STATE_DIR).iterdir())
    import shutil

    shutil.rmtree(out / ckpt.CLIENT_STATE_DIR)
    resumed = run_server(
        EngineLikeGrid(make_client_app(cfg), 4, first_node_id=9000), cfg, out, show_progress=False, resume=True
    )
    assert _differs(straight, resumed)
    if name == "partial-update":
        assert resumed.rounds["failures"].iloc[-1] > 0 and straight.rounds["failures"].sum() == 0


@pytest.mark.parametrize("name", ["fedluar", "partial-update", "topk"])
def test_resume_with_checkpoint_every_0_keeps_the_client_state(name: str, tmp_path: Path) -> None:
    """checkpoint-every is operational (a resume may change it): resumed with 0, the clients still
    get back the state they mirrored before the crash, so the run ends exactly like the straight one.
    Nothing more is mirrored (no checkpoint will be written that could use it)."""
    straight = _straight(tmp_path, name, {})
    out = tmp_path / "resumed"
    _crash_after_round_2(out, name, {})
    before = sorted(p.name for p in (out / ckpt.CLIENT_STATE_DIR).iterdir())
    again = ckpt.resume_config(out, overrides={"checkpoint-every": 0})
    assert again["checkpoint-every"] == 0
    fresh = EngineLikeGrid(make_client_app(again), 4, first_node_id=9000)
    resumed = run_server(fresh, again, out, show_progress=False, resume=True)
    _compare(straight, resumed)
    assert not any(m.has_error() for replies in fresh.received for m in replies)
    assert sorted(p.name for p in (out / ckpt.CLIENT_STATE_DIR).iterdir()) == [
        n for n in before if int(n.split("-r")[1][:-3]) <= 2
    ]
    assert ckpt.read_checkpoint_config(out)[0] == 2  # no checkpoint after the resume


def test_feddip_luar_state_round_trips_the_feddip_base(tmp_path: Path) -> None:
    """LUAR over FedDIP (feddip-luar) saves the base's own state_dict(): masks, schedule position,
    reconfiguration rounds come back exactly (LUAR used to save only Flower's per-array state)."""
    from fedsparse.methods import build_strategy
    from fedsparse.server import initial_model

    cfg = _cfg(tmp_path, strategy="feddip-luar", **{"reconfig-every": 1})
    strategy = build_strategy(cfg)
    base = strategy.base
    base._init_masks(ArrayRecord(initial_model(cfg).state_dict()))
    rng = np.random.default_rng(0)
    base.masks = {n: torch.from_numpy(rng.random(tuple(m.shape)) < 0.3) for n, m in base.masks.items()}
    base.last_reconfig_round, base.reconfig_rounds = 2, [1, 2]
    state = ckpt.unpack_state(*ckpt.pack_state(ckpt.strategy_state(strategy)))

    back = build_strategy(cfg)
    ckpt.load_strategy_state(back, state)
    assert back.base.masks is not None and list(back.base.masks) == list(base.masks)
    for n, m in base.masks.items():
        assert torch.equal(back.base.masks[n], m), n
    assert back.base.prunable == base.prunable and back.base.initial_densities == base.initial_densities
    assert (back.base.last_reconfig_round, back.base.reconfig_rounds) == (2, [1, 2])
    # a LUAR state without its base's state (the old format) is refused, not half-loaded
    old = {k: v for k, v in state["state"].items() if k != "base_state"}
    with pytest.raises(ValueError, match="holds no state of its base strategy"):
        build_strategy(cfg).load_state_dict(old)


def test_resume_refuses_a_conflicting_configuration(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _cfg(out, rounds=2, **{"checkpoint-every": 1, "eval-every": 2})
    run_server(EngineLikeGrid(make_client_app(cfg), 4), cfg, out, show_progress=False)

    ok = ckpt.resume_config(out, overrides={"lr": 0.05, "round-timeout": 30.0})  # repeats + an operational key
    assert ok["lr"] == 0.05 and ok["round-timeout"] == 30.0 and ok["out-dir"] == str(out.resolve())
    with pytest.raises(ConfigError, match=r"lr = 0\.05 in config\.toml, 0\.1 in the given configuration"):
        ckpt.resume_config(out, overrides={"lr": 0.1})
    with pytest.raises(ConfigError, match="unknown configuration key 'lrr'"):
        ckpt.resume_config(out, overrides={"lrr": 0.1})
    with pytest.raises(ConfigError, match="no such directory"):
        ckpt.resume_config(tmp_path / "nope")
    with pytest.raises(ConfigError, match="config.toml is missing"):
        ckpt.resume_config(tmp_path)
    text = (out / "config.toml").read_text().replace("seed = 4", "seed = 5")
    (out / "config.toml").write_text(text)
    with pytest.raises(
        ConfigError,
        match=r"config\.toml does not match the checkpoint \(seed = 4 in the checkpoint, 5 in config\.toml\)",
    ):
        ckpt.resume_config(out)
    # and the loop itself refuses a checkpoint of another configuration
    other = _cfg(out, rounds=2, seed=5, **{"checkpoint-every": 1})
    with pytest.raises(ConfigError, match="belongs to another configuration: seed = 4"):
        run_server(EngineLikeGrid(make_client_app(other), 4), other, out, show_progress=False, resume=True)


def test_resuming_a_finished_run_trains_nothing(tmp_path: Path) -> None:
    out = tmp_path / "done"
    cfg = _cfg(out, rounds=2, **{"checkpoint-every": 5})  # the last round is always checkpointed
    first = run_server(EngineLikeGrid(make_client_app(cfg), 4), cfg, out, show_progress=False)
    grid = EngineLikeGrid(make_client_app(cfg), 4)
    again = run_server(grid, cfg, out, show_progress=False, resume=True)
    assert grid.exchanges == []
    _compare(first, again)
    assert (out / "summary.json").is_file()


def test_a_fresh_run_ignores_stale_state(tmp_path: Path) -> None:
    """Starting a new run in an old directory must not resume anything from it by accident."""
    out = tmp_path / "run"
    cfg = _cfg(out, rounds=1, strategy="partial-update", **{"checkpoint-every": 1, "eval-every": 1})
    run_server(EngineLikeGrid(make_client_app(cfg), 4), cfg, out, show_progress=False)
    assert any((out / ckpt.CLIENT_STATE_DIR).iterdir())
    again = run_server(EngineLikeGrid(make_client_app(cfg), 4), cfg, out, show_progress=False)
    assert again.rounds["failures"].sum() == 0
    assert ckpt.read_checkpoint_config(out)[0] == 1


# ------------------------------------------------------------------------------------------------
# on Flower's simulation engine: hard kill of `fedsparse run`, then `fedsparse run --resume`
# ------------------------------------------------------------------------------------------------

RAY_TINY = {
    "num-clients": 6,
    "clients-per-round": 3,
    "rounds": 6,
    "local-steps": 10,
    "batch-size": 32,
    "lr": 0.05,
    "momentum": 0.9,
    "eval-every": 3,
    "seed": 7,
}


def _cli(*args: str) -> list[str]:
    return [str(ROOT / ".venv" / "bin" / "fedsparse"), "run", *args]


def _sets(cfg: dict[str, Any]) -> list[str]:
    out = []
    for k, v in cfg.items():
        value = str(v).lower() if isinstance(v, bool) else (f'"{v}"' if isinstance(v, str) else str(v))
        out += ["--set", f"{k}={value}"]
    return out


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), so the kill leaves no orphan of ours behind."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children[ppid].append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_after_checkpoint(args: list[str], out: Path, at_round: int, timeout: float = 300) -> None:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if (out / ckpt.CHECKPOINT_FILE).is_file() and ckpt.read_checkpoint_config(out)[0] >= at_round:
                break
            if proc.poll() is not None:
                raise AssertionError(
                    f"the run ended before its round-{at_round} checkpoint: {proc.stderr.read().decode()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError("no checkpoint in time")
            time.sleep(0.05)
    finally:
        victims = [proc.pid, *_descendants(proc.pid)]
        for pid in victims:  # kill -9: the launcher, Ray's processes and its workers, by id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists(), "the run finished before it was killed"


def _final_arrays(out: Path) -> ArrayRecord:
    saved = ckpt.load_checkpoint(out)
    assert saved.server_round == RAY_TINY["rounds"]
    return saved.arrays


def _kill_and_resume(tmp_path: Path, extra: dict[str, Any]) -> None:
    from fedsparse import simulate

    cfg = {**RAY_TINY, **extra}
    straight = simulate({**cfg, "checkpoint-every": 6}, out_dir=tmp_path / "straight", progress=False)

    out = tmp_path / "killed"
    _kill_after_checkpoint(_cli(*_sets({**cfg, "checkpoint-every": 3}), "--out", str(out), "--quiet"), out, at_round=3)
    assert ckpt.read_checkpoint_config(out)[0] == 3
    done = subprocess.run(_cli("--resume", str(out), "--quiet"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    resumed = pd.read_csv(out / "rounds.csv")
    expected = pd.read_csv(tmp_path / "straight" / "rounds.csv")
    assert len(straight) == len(resumed) == RAY_TINY["rounds"]
    pd.testing.assert_frame_equal(expected.drop(columns=NOT_REPRODUCIBLE), resumed.drop(columns=NOT_REPRODUCIBLE))
    a, b = _final_arrays(tmp_path / "straight"), _final_arrays(out)
    assert list(a.keys()) == list(b.keys())
    for k in a.keys():
        assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), f"{k} differs"
    assert resumed["failures"].sum() == 0


@pytest.mark.ray
def test_fedavg_hard_kill_and_resume_on_ray(tmp_path: Path) -> None:
    _kill_and_resume(tmp_path, {"strategy": "fedavg"})


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        {"strategy": "feddip", "reconfig-every": 2},
        {"strategy": "fedluar", "persist-momentum": True, "recycled-layers": 2},
        {"strategy": "partial-update"},
    ],
    ids=lambda e: e["strategy"],
)
def test_hard_kill_and_resume_on_ray(extra: dict[str, Any], tmp_path: Path) -> None:
    if extra["strategy"] not in strategy_names():
        pytest.skip(f"strategy {extra['strategy']!r} is not registered")
    _kill_and_resume(tmp_path, extra)
