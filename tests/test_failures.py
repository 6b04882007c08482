"""Failed clients: exceptions, timeouts and poisoned replies injected with ``fail-clients``.

The real round loop (``run_server``) drives the real strategies and the real ClientApp in process
(``EngineLikeGrid`` in tests/loopback.py fails like Flower's simulation engine does: an exception
becomes an error reply and leaves the client's context unchanged; a late reply is not returned).
Every registered strategy is checked: failures are counted, a round without enough valid replies
keeps the previous model, and the strategy's state stays consistent — the rounds after a failure see no
other error than the injected ones (e.g. partial-update clients are resynchronised, not sent a
patch for a copy they do not hold). A non-finite aggregate is discarded with everything it did to
the strategy: the round ends exactly like one in which no reply arrived.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from loopback import EngineLikeGrid, set_task_identity

from clients.app import make_client_app
from fedsparse.config import ConfigError, resolve_config
from fedsparse.failures import InjectedFailure, failure_for, inject, parse_fail_clients
from fedsparse.methods import strategy_names
from fedsparse.server import RunResult, run_server

BASE = {
    "num-clients": 4,
    "clients-per-round": 4,
    "rounds": 3,
    "local-steps": 2,
    "batch-size": 16,
    "lr": 0.05,
    "momentum": 0.5,
    "wire-bytes": False,
    "eval-every": 3,
    "checkpoint-every": 1,  # the grid reads each round's global model from the checkpoint
    "seed": 11,
}


@pytest.fixture(autouse=True)
def _identity() -> None:
    set_task_identity()


def _run_on(tmp: Path, **over: Any) -> tuple[RunResult, EngineLikeGrid]:
    if over.get("strategy") == "fedluar":
        over = {"persist-momentum": True, **over}  # client state in context.state
    cfg = resolve_config({**BASE, "out-dir": str(tmp), **over})
    grid = EngineLikeGrid(make_client_app(cfg), int(cfg["num-clients"]), watch=tmp)
    result = run_server(grid, cfg, tmp, show_progress=False)
    grid.globals_after[int(cfg["rounds"])] = result.arrays
    return result, grid


def _same_arrays(a: Any, b: Any) -> bool:
    return list(a.keys()) == list(b.keys()) and all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a.keys())


def _run(tmp: Path, **over: Any) -> RunResult:
    return _run_on(tmp, **over)[0]


def _has_nan(reply: Any) -> bool:
    return any(
        np.isnan(a.numpy()).any()
        for rec in reply.content.array_records.values()
        for a in rec.values()
        if a.numpy().dtype.kind == "f"
    )


def _finite(result: RunResult) -> bool:
    return all(np.isfinite(a.numpy()).all() for a in result.arrays.values() if a.numpy().dtype.kind == "f")


# ------------------------------------------------------------------------------------------------
# the injection rule
# ------------------------------------------------------------------------------------------------


def test_fail_clients_rule() -> None:
    cfg = {"fail-clients": "2:0, *:3:timeout 4:*:nan", "round-timeout": 1.0}
    assert failure_for(cfg, 2, 0) == "raise" and failure_for(cfg, 2, 1) is None
    assert failure_for(cfg, 7, 3) == "timeout" and failure_for(cfg, 4, 1) == "nan"
    with pytest.raises(InjectedFailure, match="partition 0 in round 2"):
        inject(cfg, 2, 0)
    inject(cfg, 1, 0)  # nothing
    assert parse_fail_clients("") == []


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("2-0", "is not ROUND:PARTITION[:MODE]"),
        ("0:1", "round '0' is not valid"),
        ("x:1", "round 'x' is not valid"),
        ("1:-2", "partition '-2' is not valid"),
        ("1:1:explode", "unknown mode 'explode'; choose one of: raise, timeout, nan"),
        ("1:9", "names partition 9, but num-clients = 4"),
        ("7:1", "names round 7, but rounds = 3"),
    ],
)
def test_bad_fail_clients_are_config_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_config({**BASE, "fail-clients": text})
    assert fragment in str(err.value)


def test_min_replies_cannot_exceed_the_sample() -> None:
    with pytest.raises(ConfigError, match="min-replies = 5 exceeds clients-per-round = 4"):
        resolve_config({**BASE, "min-replies": 5})


# ------------------------------------------------------------------------------------------------
# every strategy under failures
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", strategy_names())
def test_failures_are_counted_and_state_stays_consistent(name: str, tmp_path: Path) -> None:
    # round 2: every client raises; round 3: partition 1 raises, partition 2 replies NaN
    result, grid = _run_on(tmp_path, strategy=name, **{"fail-clients": "2:*, 3:1, 3:2:nan"})
    df = result.rounds.set_index("round")
    assert (df["clients"] == df["replies"] + df["failures"] + df["rejected"]).all()
    assert df["failures"].tolist() == [0, 4, 1], "only the injected failures: no client lost its state"
    # The 'nan' client's reply: NaN in every floating-point array (a reply of bit-packed codes only,
    # FedPAQ's, has none: its train-loss is NaN instead). The poison must take effect for every
    # strategy, and the screen must reject it.
    poisoned = [m for m in grid.replies_of_round[3] if not m.has_error() and m.metadata.src_node_id == 102]
    assert len(poisoned) == 1
    assert _has_nan(poisoned[0]) or math.isnan(poisoned[0].content["metrics"]["train-loss"]), (
        f"{name}: the 'nan' failure did not poison the reply"
    )
    assert df["rejected"].tolist() == [0, 0, 1]
    assert df["replies"].tolist() == [4, 0, 2]
    assert df["aggregated"].tolist() == [True, False, True]
    # round 2 kept round 1's model, bit for bit; round 3 moved on
    after = grid.globals_after
    assert sorted(after) == [1, 2, 3]
    assert _same_arrays(after[2], after[1])
    assert not _same_arrays(after[3], after[2])
    assert _finite(result) and math.isfinite(df.loc[3, "test_loss"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failures"] == 5 and summary["rejected"] == 1

    if name == "fedluar":  # LUAR counted two rounds per layer (aggregated or recycled), not three
        layers = summary["luar_layers"]
        assert all(v["aggregated"] + v["recycled"] == 2 for v in layers.values()), layers
    if name == "partial-update":
        assert df.loc[2, "deployed_version"] == df.loc[1, "deployed_version"] == 1
        assert df.loc[3, "deployed_version"] == 2
        # every client of round 2 is resynchronised densely in round 3 (its copy is unknown)
        assert df.loc[3, "clients_dense"] == 4


@pytest.mark.parametrize("name", ["fedavg", "fedluar", "partial-update"])
def test_timeouts_are_failures(name: str, tmp_path: Path) -> None:
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # first use imports torch._dynamo (slow)
    result = _run(
        tmp_path, strategy=name, rounds=3, **{"fail-clients": "2:1:timeout", "round-timeout": 2.0, "eval-every": 3}
    )
    df = result.rounds.set_index("round")
    assert df["failures"].tolist() == [0, 1, 0]
    assert df["replies"].tolist() == [4, 3, 4]
    if name == "partial-update":
        # the late client did apply round 2's patch; the server cannot know it: dense resync
        assert df.loc[3, "clients_dense"] == 1


def test_min_replies_keeps_the_model(tmp_path: Path) -> None:
    over = {"fail-clients": "2:1", "eval-every": 1, "rounds": 2}
    result, grid = _run_on(tmp_path / "strict", **{**over, "min-replies": 4})
    strict = result.rounds.set_index("round")
    assert strict["aggregated"].tolist() == [True, False]
    assert _same_arrays(grid.globals_after[2], grid.globals_after[1])
    assert strict.loc[2, "test_loss"] == strict.loc[1, "test_loss"]
    result, grid = _run_on(tmp_path / "lenient", **{**over, "min-replies": 3})
    lenient = result.rounds.set_index("round")
    assert lenient["aggregated"].tolist() == [True, True]
    assert not _same_arrays(grid.globals_after[2], grid.globals_after[1])
    assert lenient["failures"].tolist() == strict["failures"].tolist() == [0, 1]


# ------------------------------------------------------------------------------------------------
# a non-finite aggregate rolls the strategy back
# ------------------------------------------------------------------------------------------------

HUGE = 3.0e38  # finite float32, but a weighted average of it times a server lr > 4, or its fp16 cast, is inf


def _huge_reply(server_round: int, partition: int) -> Any:
    """A stand-in for ``clients.app.poison``: the reply of (round, partition) with every floating-point
    value set to ±HUGE — finite, so validation accepts it, but it overflows in the aggregation."""
    from flwr.app import Array, ArrayRecord

    def poison(cfg: Any, t: int, pid: int, reply: Any) -> Any:
        if (t, pid) != (server_round, partition) or reply.has_error():
            return reply
        for name, record in list(reply.content.array_records.items()):
            out = {}
            for key, arr in record.items():
                x = arr.numpy()
                out[key] = Array(np.where(x < 0, -HUGE, HUGE).astype(x.dtype) if x.dtype.kind == "f" else x)
            reply.content[name] = ArrayRecord(out)
        return reply

    return poison


def _inf_biases(x: np.ndarray) -> np.ndarray:
    """inf in 1-D float arrays (biases; partial-update moves them densely, outside its top-k, whose
    ranking refuses non-finite scores), everything else as is."""
    return np.full_like(x, np.inf) if x.dtype.kind == "f" and x.ndim == 1 else x


def _inf_from_the_base(server_round: int) -> Any:
    """A stand-in for ``fedsparse.server.build_strategy``: the real strategy, whose *inner* (base)
    aggregation returns inf biases in round ``server_round`` — so the wrapper builds its own state on it."""
    from flwr.app import Array, ArrayRecord

    import fedsparse.server

    real = fedsparse.server.build_strategy

    def build(cfg: Any) -> Any:
        strategy = real(cfg)
        inner = strategy.base.aggregate_train

        def aggregate_train(t: int, replies: Any) -> Any:
            out, metrics = inner(t, replies)
            if t == server_round and out is not None:
                out = ArrayRecord({k: Array(_inf_biases(a.numpy())) for k, a in out.items()})
            return out, metrics

        strategy.base.aggregate_train = aggregate_train
        return strategy

    return build


@pytest.mark.parametrize(
    ("over", "how"),
    [
        # partial-update: its base's aggregate is inf, and so would be its deployed model
        ({"strategy": "partial-update"}, "inf-base"),
        # FedAvgM (LUAR with delta = 0 is exactly its base): a finite reply, but x - lr * momentum overflows
        (
            {
                "strategy": "fedluar",
                "luar-base": "fedavgm",
                "recycled-layers": 0,
                "luar-server-lr": 10.0,
                "luar-server-momentum": 0.9,
            },
            "huge",
        ),
        # and with recycled layers: LUAR's own state (previous updates, scores, R_t) over FedAvgM's
        (
            {
                "strategy": "fedluar",
                "luar-base": "fedavgm",
                "recycled-layers": 2,
                "luar-server-lr": 10.0,
                "luar-server-momentum": 0.9,
            },
            "huge",
        ),
    ],
    ids=["partial-update", "fedavgm", "fedluar-fedavgm"],
)
def test_a_non_finite_aggregate_rolls_the_strategy_back(
    over: dict[str, Any], how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Round 2: the aggregate is not finite (a finite but huge reply overflows, or the inner rule's
    aggregate is inf). The loop must discard the
    aggregate *and* what aggregating did to the strategy (partial-update's deployed model,
    FedAvgM's stored model and momentum, LUAR's previous updates), then end the round as one
    without valid replies: the run ends bit for bit like one whose round 2 had no reply at all."""
    import clients.app

    # no client state (persist-momentum off): the reference's clients, which raised in round 2,
    # and these, which trained, then hold the same state
    # reply-max-abs = 0: no magnitude bound, so the huge reply reaches the aggregation (the case
    # where the bound is too loose for a strategy's overflow)
    common = {"rounds": 4, "eval-every": 1, "persist-momentum": False, "reply-max-abs": 0.0, **over}
    reference, _ = _run_on(tmp_path / "reference", **common, **{"fail-clients": "2:*"})
    if how == "huge":
        monkeypatch.setattr(clients.app, "poison", _huge_reply(2, 1))
    else:
        import fedsparse.server

        monkeypatch.setattr(fedsparse.server, "build_strategy", _inf_from_the_base(2))
    result, grid = _run_on(tmp_path / "overflow", **common)
    ref, df = reference.rounds.set_index("round"), result.rounds.set_index("round")
    assert not any(m.has_error() for m in grid.replies_of_round[2])
    assert df.loc[2, "replies"] == 4 and df.loc[2, "rejected"] == 0  # finite: the screen let it through
    assert df["aggregated"].tolist() == ref["aggregated"].tolist() == [True, False, True, True]
    assert _finite(result)
    assert _same_arrays(result.arrays, reference.arrays), "the strategy kept something of the discarded aggregate"
    assert df["test_loss"].tolist() == ref["test_loss"].tolist()
    if over["strategy"] == "partial-update":
        assert df["deployed_version"].tolist() == ref["deployed_version"].tolist() == [1, 1, 2, 3]
        assert df.loc[3, "clients_dense"] == 4  # every client of round 2 is resynchronised


@pytest.mark.parametrize(
    "over",
    [
        {"strategy": "fedavg"},  # the average of the huge reply with the others: finite garbage
        # FedAdam: the model stays finite, but v_t grows to ~1e73 and the adaptive step is ~0 for
        # the rest of the run (the model would stop learning, with no error anywhere)
        {"strategy": "fedluar", "luar-base": "fedadam", "recycled-layers": 0, "luar-server-lr": 0.01},
    ],
    ids=["fedavg", "fedadam"],
)
def test_a_finite_but_huge_reply_is_rejected_by_the_magnitude_bound(
    over: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply of ±3e38 (finite) passes every finiteness check; the default ``reply-max-abs``
    rejects it, and the run ends bit for bit like one in which that client failed in that round."""
    import clients.app

    common = {"rounds": 3, "eval-every": 1, "persist-momentum": False, **over}
    reference, _ = _run_on(tmp_path / "reference", **common, **{"fail-clients": "2:1"})
    monkeypatch.setattr(clients.app, "poison", _huge_reply(2, 1))
    result, _ = _run_on(tmp_path / "huge", **common)
    ref, df = reference.rounds.set_index("round"), result.rounds.set_index("round")
    assert df["rejected"].tolist() == [0, 1, 0] and ref["failures"].tolist() == [0, 1, 0]
    assert df["aggregated"].tolist() == [True, True, True]
    assert _same_arrays(result.arrays, reference.arrays)
    assert df["test_loss"].tolist() == ref["test_loss"].tolist()


@pytest.mark.ray
@pytest.mark.slow
def test_failures_on_the_simulation_engine(tmp_path: Path) -> None:
    """The same accounting with Flower's real engine turning the exceptions into error replies."""
    from fedsparse import simulate

    cfg = {k: v for k, v in BASE.items() if k != "checkpoint-every"}
    df = simulate(
        {**cfg, "strategy": "partial-update", "fail-clients": "2:*, 3:0, 3:2:nan"}, out_dir=tmp_path, progress=False
    ).set_index("round")
    assert df["failures"].tolist() == [0, 4, 1]
    assert df["rejected"].tolist() == [0, 0, 1]
    assert df["replies"].tolist() == [4, 0, 2]
    assert df["aggregated"].tolist() == [True, False, True]
    assert df.loc[2, "deployed_version"] == 1 and df.loc[3, "clients_dense"] == 4
