"""Attacking clients injected with ``fail-clients``: ``scale`` (global + s·Δ) and ``inflate``
(``num-examples`` × 100), and the ``num-examples`` bound the reply screen takes from the server's
own knowledge (the partition size, else ``max-examples``). In process, on the loopback grid."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp.strategy import FedAvg
from loopback import EngineLikeGrid, set_task_identity

from clients.app import make_client_app
from fedsparse.clientdata import partitions_for
from fedsparse.config import ConfigError, resolve_config
from fedsparse.failures import INFLATE_FACTOR, failure_for, parse_fail_clients, scale_strategies
from fedsparse.server import RunResult, _screen_for, initial_model, run_server

BASE = {
    "num-clients": 3,
    "clients-per-round": 3,
    "rounds": 1,
    "local-steps": 2,
    "batch-size": 16,
    "lr": 0.05,
    "wire-bytes": False,
    "seed": 13,
}


@pytest.fixture(autouse=True)
def _identity() -> None:
    set_task_identity()


def _run(tmp: Path, **over: Any) -> tuple[RunResult, EngineLikeGrid, dict[str, Any]]:
    cfg = resolve_config({**BASE, "out-dir": str(tmp), **over})
    grid = EngineLikeGrid(make_client_app(cfg), int(cfg["num-clients"]), watch=tmp)
    return run_server(grid, cfg, tmp, show_progress=False), grid, cfg


def _reply_of(grid: EngineLikeGrid, partition: int) -> Message:
    (msg,) = [m for m in grid.replies_of_round[1] if not m.has_error() and m.metadata.src_node_id == 100 + partition]
    return msg


def test_the_modes_parse() -> None:
    rules = parse_fail_clients("1:0:scale, *:2:inflate")
    assert [r.mode for r in rules] == ["scale", "inflate"]
    assert failure_for({"fail-clients": "1:0:scale"}, 1, 0) == "scale"
    with pytest.raises(ConfigError, match="unknown mode 'scales'; choose one of: raise, timeout, nan, scale, inflate"):
        parse_fail_clients("1:0:scales")


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_scale_replies_global_plus_s_delta(name: str, tmp_path: Path) -> None:
    honest, grid_h, cfg = _run(tmp_path / "honest", strategy=name)
    _, grid_a, _ = _run(tmp_path / "scaled", strategy=name, **{"fail-clients": "1:1:scale", "attack-scale": -4.0})
    start = {k: v.detach().numpy().astype(np.float64) for k, v in initial_model(cfg).state_dict().items()}
    trained, attacked = _reply_of(grid_h, 1).content["arrays"], _reply_of(grid_a, 1).content["arrays"]
    assert list(trained.keys()) == list(attacked.keys())
    moved = 0
    for key in trained.keys():
        t, a = trained[key].numpy(), attacked[key].numpy()
        assert a.dtype == t.dtype and a.shape == t.shape
        if t.dtype.kind != "f":
            assert np.array_equal(a, t)
            continue
        expected = start[key] + (-4.0) * (t.astype(np.float64) - start[key])
        np.testing.assert_allclose(a, expected, rtol=1e-5, atol=1e-6, err_msg=key)
        moved += int(not np.array_equal(a, t))
    assert moved > 0
    # the other clients are honest, bit for bit
    for pid in (0, 2):
        h, o = _reply_of(grid_h, pid).content["arrays"], _reply_of(grid_a, pid).content["arrays"]
        assert all(h[k].numpy().tobytes() == o[k].numpy().tobytes() for k in h.keys())


def test_inflate_is_rejected_by_the_known_partition(tmp_path: Path) -> None:
    honest, grid_h, _ = _run(tmp_path / "honest")
    result, grid_a, _ = _run(tmp_path / "inflated", **{"fail-clients": "1:1:inflate"})
    n = _reply_of(grid_h, 1).content["metrics"]["num-examples"]
    assert _reply_of(grid_a, 1).content["metrics"]["num-examples"] == INFLATE_FACTOR * n
    arrays_h, arrays_a = _reply_of(grid_h, 1).content["arrays"], _reply_of(grid_a, 1).content["arrays"]
    assert all(arrays_h[k].numpy().tobytes() == arrays_a[k].numpy().tobytes() for k in arrays_h.keys())
    df = result.rounds.set_index("round")
    assert df["rejected"].tolist() == [1] and df["replies"].tolist() == [2]
    assert honest.rounds["rejected"].tolist() == [0]


def _reply(arrays: ArrayRecord, num_examples: int, node: int) -> Message:
    out = Message(
        content=RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(a.numpy().copy()) for k, a in arrays.items()}),
            "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 0.5}),
        }
    )
    return Message(content=content, reply_to=out)


@pytest.mark.parametrize("max_examples", [500, 0])
def test_max_examples_bounds_an_unknown_node(max_examples: int) -> None:
    """An unknown node (it never answered the partition query) is bounded by ``max-examples``, by
    default (0) by the largest partition of the run's split: not by the training set's 60,000, which
    would let it claim 75 % of a 20-client round's weight."""
    cfg = resolve_config({**BASE, "max-examples": max_examples})
    largest = max(len(p) for p in partitions_for(cfg))
    bound = max_examples or largest
    assert largest < 60000
    model = ArrayRecord(initial_model(cfg).state_dict())
    unknown = SimpleNamespace(partition_of={})  # no node answered the partition query: a deployment
    screen = _screen_for(FedAvg(), cfg, unknown, model)  # type: ignore[arg-type]
    screened = screen.screen(1, [_reply(model, bound, 7), _reply(model, bound + 1, 8)])
    assert [m.metadata.src_node_id for m in screened.valid] == [7]
    assert len(screened.rejected) == 1 and "exceeds" in screened.rejected[0][1]
    # a node with a known partition is bounded by its partition size, whatever max-examples says
    size = len(partitions_for(cfg)[0])
    known = SimpleNamespace(partition_of={9: 0, 10: 0})
    replies = [_reply(model, size, 9), _reply(model, size + 1, 10)]
    screened = _screen_for(FedAvg(), cfg, known, model).screen(1, replies)  # type: ignore[arg-type]
    assert [m.metadata.src_node_id for m in screened.valid] == [9] and len(screened.rejected) == 1


def test_scale_on_feddip_scales_the_decoded_model_and_keeps_its_mask(tmp_path: Path) -> None:
    """FedDIP's reply is a codec payload: the attack decodes it, scales it against the (masked)
    global model the client received and re-encodes it with the reply's own masks."""
    from fedsparse import codec

    over = {"strategy": "feddip", "rounds": 2, "initial-sparsity": 0.5, "target-sparsity": 0.6}
    _, grid_h, cfg = _run(tmp_path / "honest", **over)
    _, grid_a, _ = _run(tmp_path / "scaled", **over, **{"fail-clients": "1:1:scale", "attack-scale": -4.0})
    honest, h_masks = codec.decode(codec.from_array_record(_reply_of(grid_h, 1).content["arrays"]))
    attacked, a_masks = codec.decode(codec.from_array_record(_reply_of(grid_a, 1).content["arrays"]))
    assert sorted(h_masks) == sorted(a_masks) and all(np.array_equal(h_masks[k], a_masks[k]) for k in h_masks)
    start = {k: v.detach().numpy().astype(np.float64) for k, v in initial_model(cfg).state_dict().items()}
    moved = 0
    for key, t in honest.items():
        g = np.where(h_masks[key], start[key], 0.0) if key in h_masks else start[key]
        expected = g + (-4.0) * (t.astype(np.float64) - g)
        np.testing.assert_allclose(attacked[key], expected, rtol=1e-5, atol=1e-5, err_msg=key)
        moved += int(not np.array_equal(attacked[key], t))
    assert moved > 0


@pytest.mark.parametrize("name", ["topk", "fedpaq", "snip", "partial-update"])
def test_scale_is_refused_for_payload_replies(name: str) -> None:
    assert name not in scale_strategies()
    with pytest.raises(ConfigError, match=f"fail-clients mode 'scale' is not supported by strategy '{name}'"):
        resolve_config({**BASE, "strategy": name, "fail-clients": "1:0:scale"})
    resolve_config({**BASE, "strategy": name, "fail-clients": "1:0:inflate"})  # inflate works everywhere


def test_attack_scale_must_be_finite() -> None:
    with pytest.raises(ConfigError, match="attack-scale"):
        resolve_config({**BASE, "attack-scale": float("inf")})
