"""FedLUAR in process (no Ray): the strategy wrapper over FedAvg / FedProx / FedAdam / FedYogi / FedAvgM,
the client step, the statistics of the layer draw, the byte accounting and the configuration.

The server side is the real round loop (``fedsparse.server.run_server``) or the real strategies; the
client side is the real ClientApp (``clients.app.make_client_app``). Only the transport is replaced:
:class:`loopback.LoopbackGrid` is a Flower ``Grid`` that hands each message to the ClientApp in this
process (with one persistent ``Context`` per node, as the simulation engine keeps them) and returns
its reply.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from loopback import LoopbackGrid, node_context, set_task_identity, train_reply

from clients.fedluar import MOMENTUM_STATE_KEY, fedluar_train, momentum_record, omit_arrays, restore_momentum
from fedsparse.config import ConfigError, resolve_config
from fedsparse.grid import seeded_sampling
from fedsparse.layer_sampling import recycling_probabilities
from fedsparse.methods import build_strategy
from fedsparse.server import initial_model, run_server
from strategies.fedluar import LUAR, RECYCLED_CONFIG_KEY, luar_round_lr, recyclable_groups

TINY = {
    "dataset": "fashion-mnist",
    "model": "lenet5",  # 5 recyclable layers
    "num-clients": 4,
    "clients-per-round": 2,
    "rounds": 3,
    "local-steps": 2,
    "batch-size": 16,
    "lr": 0.05,
    "momentum": 0.5,
    "eval-batch-size": 5000,
    "wire-bytes": False,
    "seed": 3,
}
# chi-square critical values at p = 0.001 (no scipy here): 3 and 5 degrees of freedom
CHI2_CRIT_001 = {3: 16.266, 5: 20.515}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages built outside a running app need the process's task identity."""
    set_task_identity()


def _cfg(**over: Any) -> dict[str, Any]:
    return resolve_config({**TINY, **over})


def _grid(cfg: dict[str, Any]) -> LoopbackGrid:
    return LoopbackGrid.for_config(cfg)


def _sampling(cfg: dict[str, Any]) -> dict[str, Any]:
    n, k = int(cfg["num-clients"]), int(cfg["clients-per-round"])
    return {"fraction_train": k / n, "min_train_nodes": k, "min_available_nodes": n, "fraction_evaluate": 0.0}


def _rounds(
    strategy: Strategy, grid: LoopbackGrid, arrays: ArrayRecord, rounds: int, seed: int = 0
) -> list[ArrayRecord]:
    """Flower's training loop (as in Strategy.start / run_server): the global arrays after each round."""
    out = [arrays]
    for t in range(1, rounds + 1):
        with seeded_sampling(seed, t):
            msgs = list(strategy.configure_train(t, arrays, ConfigRecord({"server-round": t}), grid))
        replies = sorted(grid.send_and_receive(msgs), key=lambda m: m.metadata.src_node_id)
        new, _ = strategy.aggregate_train(t, replies)
        assert new is not None
        arrays = new
        out.append(arrays)
    return out


def _np(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in rec.items()}


def _bitwise_equal(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a.keys()) == list(b.keys())
    for k in a.keys():
        x, y = a[k].numpy(), b[k].numpy()
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert x.tobytes() == y.tobytes(), f"{k} differs"


# --------------------------------------------------------------------------------------------
# δ = 0 is the wrapped strategy, bit for bit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_base",
    [
        lambda kw: FedAvg(**kw),
        lambda kw: FedAdam(eta=0.01, **kw),
        lambda kw: FedYogi(eta=0.01, **kw),
        lambda kw: FedAvgM(server_learning_rate=1.0, server_momentum=0.9, **kw),
    ],
    ids=["fedavg", "fedadam", "fedyogi", "fedavgm"],
)
def test_delta_zero_is_bitwise_the_wrapped_strategy(make_base) -> None:
    cfg = _cfg(strategy="fedavg")
    init = ArrayRecord(initial_model(cfg).state_dict())
    plain = _rounds(make_base(_sampling(cfg)), _grid(cfg), init, 3)
    wrapped_strategy = LUAR(make_base(_sampling(cfg)), 0, seed=1)
    wrapped_grid = _grid(cfg)
    wrapped = _rounds(wrapped_strategy, wrapped_grid, init, 3)
    for a, b in zip(plain[1:], wrapped[1:]):
        _bitwise_equal(a, b)
    # the model did move, and nothing was recycled or announced
    assert any(not np.array_equal(plain[0][k].numpy(), plain[-1][k].numpy()) for k in init.keys())
    assert all(RECYCLED_CONFIG_KEY not in m.content["config"] for msgs in wrapped_grid.sent for m in msgs)
    assert sum(wrapped_strategy.recycled_count.values()) == 0


def test_delta_zero_run_equals_fedavg_run_including_bytes(tmp_path: Path) -> None:
    """The whole loop: fedluar with δ = 0 gives FedAvg's model, accuracy and byte counts."""
    fedavg = run_server(_grid(c := _cfg(strategy="fedavg")), c, tmp_path / "a", show_progress=False)
    luar = run_server(
        _grid(c := _cfg(strategy="fedluar", **{"recycled-layers": 0})), c, tmp_path / "b", show_progress=False
    )
    _bitwise_equal(fedavg.arrays, luar.arrays)
    cols = ["test_accuracy", "test_loss", "bytes_up", "bytes_down", "comm_ratio_up"]
    pd.testing.assert_frame_equal(fedavg.rounds[cols], luar.rounds[cols])
    assert (luar.rounds["recycled_layers"].fillna("") == "").all()


@pytest.mark.parametrize("base", ["fedadam", "fedyogi"])
def test_server_optimiser_model_is_broadcast_in_the_model_dtype(base: str, tmp_path: Path) -> None:
    """Flower's FedAdam / FedYogi return float64 arrays (float64 moments); the loop casts them back
    to the model's float32 before broadcasting, so the downlink is not doubled: every round's
    messages carry float32 arrays and as many bytes as FedAvg's."""
    cfg = _cfg(strategy="fedluar", rounds=3, **{"recycled-layers": 0, "luar-base": base, "luar-server-lr": 0.01})
    grid = _grid(cfg)
    result = run_server(grid, cfg, tmp_path / base, show_progress=False)
    for msgs, _ in grid.exchanges:
        assert {a.numpy().dtype for a in msgs[0].content["arrays"].values()} == {np.dtype(np.float32)}
    plain = run_server(_grid(c := _cfg(strategy="fedavg", rounds=3)), c, tmp_path / "fedavg", show_progress=False)
    assert result.rounds["bytes_down"].tolist() == plain.rounds["bytes_down"].tolist()
    assert result.rounds["comm_ratio_down"].iloc[-1] == pytest.approx(plain.rounds["comm_ratio_down"].iloc[-1])
    assert {a.numpy().dtype for a in result.arrays.values()} == {np.dtype(np.float32)}


# --------------------------------------------------------------------------------------------
# recycling: round 1, the exact previous update, the base rule on the other layers
# --------------------------------------------------------------------------------------------


def test_recycled_layers_move_by_exactly_the_previous_applied_update() -> None:
    cfg = _cfg(strategy="fedluar", **{"recycled-layers": 3})
    strategy = build_strategy(cfg)
    assert isinstance(strategy, LUAR) and isinstance(strategy.base, FedAvg)
    grid = _grid(cfg)
    init = ArrayRecord(initial_model(cfg).state_dict())
    xs = _rounds(strategy, grid, init, 5, seed=3)
    layers = list(strategy.groups or {})
    assert len(layers) == 5
    recycled = [h["recycled"] for h in strategy.history]
    assert recycled[0] == [], "round 1 recycles nothing"
    assert all(len(r) == 3 for r in recycled[1:])
    assert any(set(a) & set(b) for a, b in zip(recycled[1:], recycled[2:])), "want a layer recycled twice in a row"

    applied: dict[str, np.ndarray] = {}  # independent bookkeeping of Δ̂_{t−1,l}
    for t in range(1, 6):
        x_t, x_next = _np(xs[t - 1]), _np(xs[t])
        replies = grid.received[t - 1]
        fedavg = _np(aggregate_arrayrecords([m.content for m in replies], "num-examples"))
        for key in x_t:
            if key in recycled[t - 1]:
                expected = x_t[key] + applied[key]
                assert np.array_equal(x_next[key], expected), f"round {t}: {key} did not move by Δ̂_(t-1)"
                assert key not in fedavg, "recycled arrays must not be in any reply"
            else:
                assert np.array_equal(x_next[key], fedavg[key]), f"round {t}: {key} is not the FedAvg of the replies"
                if key in layers:
                    applied[key] = x_next[key] - x_t[key]
        assert set(fedavg) == set(x_t) - set(recycled[t - 1])
    assert strategy.recycled_count == {g: sum(g in r for r in recycled) for g in layers}
    assert all(strategy.aggregated_count[g] + strategy.recycled_count[g] == 5 for g in layers)


def test_fedadam_state_of_recycled_layers_is_left_alone() -> None:
    cfg = _cfg(strategy="fedluar", **{"recycled-layers": 2, "luar-base": "fedadam", "luar-server-lr": 0.01})
    strategy = build_strategy(cfg)
    assert isinstance(strategy, LUAR) and isinstance(strategy.base, FedAdam)
    base = strategy.base
    grid = _grid(cfg)
    xs = _rounds(strategy, grid, ArrayRecord(initial_model(cfg).state_dict()), 2, seed=5)
    m_before = {k: v.copy() for k, v in base.m_t.items()}
    v_before = {k: v.copy() for k, v in base.v_t.items()}
    # round 3 by hand, to see the state move
    x2 = xs[-1]
    with seeded_sampling(5, 3):
        msgs = list(strategy.configure_train(3, x2, ConfigRecord({"server-round": 3}), grid))
    omitted = set(msgs[0].content["config"][RECYCLED_CONFIG_KEY])
    assert len(omitted) == 2
    replies = sorted(grid.send_and_receive(msgs), key=lambda m: m.metadata.src_node_id)
    x3, _ = strategy.aggregate_train(3, replies)
    assert x3 is not None
    assert list(base.m_t) == list(x2.keys()) == list(base.v_t) == list(base.current_arrays)
    avg = _np(aggregate_arrayrecords([m.content for m in replies], "num-examples"))
    eta_norm = base.eta * np.sqrt(1 - np.power(base.beta_2, 4.0)) / (1 - np.power(base.beta_1, 4.0))
    for k, x in _np(x2).items():
        if k in omitted:  # untouched: no new observation of this layer
            assert np.array_equal(base.m_t[k], m_before[k]) and np.array_equal(base.v_t[k], v_before[k])
            assert np.array_equal(x3[k].numpy(), x + strategy.prev_update[k])
        else:  # exactly FedAdam's step on the received layers
            delta = avg[k] - x
            m = base.beta_1 * m_before[k] + (1 - base.beta_1) * delta
            v = base.beta_2 * v_before[k] + (1 - base.beta_2) * delta**2
            assert np.array_equal(base.m_t[k], m) and np.array_equal(base.v_t[k], v)
            assert np.array_equal(x3[k].numpy(), x + eta_norm * m / (np.sqrt(v) + base.tau))


def test_fedavgm_momentum_and_model_stay_complete() -> None:
    cfg = _cfg(strategy="fedluar", **{"recycled-layers": 2, "luar-base": "fedavgm", "luar-server-momentum": 0.9})
    strategy = build_strategy(cfg)
    base = strategy.base
    assert isinstance(base, FedAvgM)
    xs = _rounds(strategy, _grid(cfg), ArrayRecord(initial_model(cfg).state_dict()), 3, seed=2)
    assert len(base.momentum_vector) == len(xs[-1].keys())
    _bitwise_equal(base.current_arrays, xs[-1])  # FedAvgM's "global model" is the LUAR model
    recycled = strategy.history[-1]["recycled"]
    keys = list(xs[-1].keys())
    for name in recycled:
        i = keys.index(name)
        assert np.array_equal(xs[-1][name].numpy(), xs[-2][name].numpy() + strategy.prev_update[name])
        assert base.momentum_vector[i].shape == xs[-1][name].numpy().shape


def test_fedprox_base_sends_mu_and_recycled_list() -> None:
    cfg = _cfg(strategy="fedluar", **{"recycled-layers": 1, "luar-base": "fedprox", "proximal-mu": 0.01})
    strategy = build_strategy(cfg)
    assert isinstance(strategy.base, FedProx)
    grid = _grid(cfg)
    _rounds(strategy, grid, ArrayRecord(initial_model(cfg).state_dict()), 2)
    conf1, conf2 = grid.sent[0][0].content["config"], grid.sent[1][0].content["config"]
    assert conf1["proximal-mu"] == conf2["proximal-mu"] == 0.01
    assert RECYCLED_CONFIG_KEY not in conf1 and len(conf2[RECYCLED_CONFIG_KEY]) == 1


# --------------------------------------------------------------------------------------------
# the draw of R_t: p ∝ 1/score, through the strategy's own path
# --------------------------------------------------------------------------------------------

SCORES = {"l0": 0.05, "l1": 0.1, "l2": 0.2, "l3": 0.8}


def _synthetic_round(strategy: LUAR, grid: LoopbackGrid, t: int, x0: ArrayRecord) -> list[str]:
    """One round where every client's update gives layer l the score SCORES[l] exactly."""
    msgs = list(strategy.configure_train(t, x0, ConfigRecord(), grid))
    omit = set(msgs[0].content["config"].get(RECYCLED_CONFIG_KEY, []))
    replies = []
    for m in msgs:
        arrays = ArrayRecord(
            {k: Array(x0[k].numpy() * np.float32(1 + SCORES.get(k, 0.5))) for k in x0.keys() if k not in omit}
        )
        replies.append(train_reply(m, arrays, 10))
    strategy.aggregate_train(t, replies)
    return sorted(omit)


@pytest.mark.parametrize("delta", [1, 2])
def test_strategy_draws_layers_with_probability_inverse_to_score(delta: int) -> None:
    x0 = ArrayRecord(
        {k: Array(np.full((3, 2), 2.0, np.float32)) for k in SCORES} | {"bias": Array(np.ones(3, np.float32))}
    )
    strategy = LUAR(
        FedAvg(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0), delta, seed=11
    )
    grid = LoopbackGrid(None, 2)
    assert _synthetic_round(strategy, grid, 1, x0) == []  # round 1 recycles nothing
    assert strategy.scores == pytest.approx(SCORES, rel=1e-6)
    assert set(strategy.groups or {}) == set(SCORES)  # the 1-d bias is not a layer
    n = 3000
    counts = Counter(tuple(_synthetic_round(strategy, grid, t, x0)) for t in range(2, n + 2))
    # scores are the same every round (recycled layers keep their stale, equal score), so the draws
    # are i.i.d.: compare with the exact law of successive sampling with p ∝ 1/s
    p = recycling_probabilities(SCORES)
    expected: dict[tuple[str, ...], float] = {}
    for order in itertools.permutations(SCORES, delta):
        prob, left = 1.0, 1.0
        for name in order:
            prob *= p[name] / left
            left -= p[name]
        key = tuple(sorted(order))
        expected[key] = expected.get(key, 0.0) + prob
    chi2 = sum((counts.get(k, 0) - n * q) ** 2 / (n * q) for k, q in expected.items())
    assert set(counts) <= set(expected)
    assert chi2 < CHI2_CRIT_001[len(expected) - 1], (chi2, counts)
    # and it is not the uniform law nor p ∝ s (the test has the power to tell them apart)
    uniform = {k: 1 / len(expected) for k in expected}
    assert (
        sum((counts.get(k, 0) - n * q) ** 2 / (n * q) for k, q in uniform.items())
        > 10 * CHI2_CRIT_001[len(expected) - 1]
    )
    # the recycle counts of the strategy agree with what was drawn
    assert strategy.recycled_count == {layer: sum(c for k, c in counts.items() if layer in k) for layer in SCORES}


def test_same_seed_same_layers_and_state_roundtrip() -> None:
    cfg = _cfg(
        strategy="fedluar", **{"recycled-layers": 2, "luar-base": "fedadam", "luar-server-lr": 0.01, "rounds": 4}
    )
    init = ArrayRecord(initial_model(cfg).state_dict())
    a = build_strategy(cfg)
    xs = _rounds(a, _grid(cfg), init, 4, seed=1)
    # a second strategy resumed from a's state after round 2 continues exactly like a
    b0 = build_strategy(cfg)
    _rounds(b0, _grid(cfg), init, 2, seed=1)
    from fedsparse.checkpoint import pack_state, unpack_state

    packed, arrays = pack_state(b0.state_dict())  # the checkpoint's encoding (JSON + arrays)
    state = unpack_state(json.loads(json.dumps(packed)), arrays)
    b = build_strategy(cfg)
    b.load_state_dict(state)
    grid_b = _grid(cfg)
    x = xs[2]
    for t in (3, 4):
        with seeded_sampling(1, t):
            msgs = list(b.configure_train(t, x, ConfigRecord({"server-round": t}), grid_b))
        x, _ = b.aggregate_train(t, sorted(grid_b.send_and_receive(msgs), key=lambda m: m.metadata.src_node_id))
        _bitwise_equal(x, xs[t])
    assert b.history == a.history and b.next_recycled == a.next_recycled


# --------------------------------------------------------------------------------------------
# the full loop: omitted arrays, uplink bytes, reports
# --------------------------------------------------------------------------------------------


def test_run_omits_recycled_arrays_and_meters_fewer_bytes(tmp_path: Path) -> None:
    cfg = _cfg(strategy="fedluar", **{"recycled-layers": 2, "rounds": 4, "persist-momentum": True})
    grid = _grid(cfg)
    result = run_server(grid, cfg, tmp_path, show_progress=False)
    df = pd.read_csv(tmp_path / "rounds.csv", keep_default_na=False)
    recycled = [r.split(";") if r else [] for r in df["recycled_layers"]]
    assert recycled[0] == [] and all(len(r) == 2 for r in recycled[1:])

    # the replies really lack those arrays
    for t, replies in enumerate(grid.received, start=1):
        for m in replies:
            assert set(m.content["arrays"].keys()) == set(result.arrays.keys()) - set(recycled[t - 1])
    # the ledger did not count them: per-layer uplink bytes are absent for recycled layers
    layers = pd.read_csv(tmp_path / "layer_bytes.csv")
    up = layers[layers.direction == "up"]
    for t in range(1, 5):
        assert set(up[up["round"] == t]["array"]) == set(result.arrays.keys()) - set(recycled[t - 1])
    # bytes_up of a round = round 1's minus exactly the serialised recycled arrays, per reply
    init = ArrayRecord(initial_model(cfg).state_dict())
    size = {k: len(a.data) + len(k) for k, a in init.items()}
    for t in range(2, 5):
        saved = 2 * sum(size[k] for k in recycled[t - 1])
        assert df["bytes_up"][t - 1] == df["bytes_up"][0] - saved
    assert df["comm_ratio_up"].iloc[-1] < df["comm_ratio_up"].iloc[0] <= 1.001
    # the list R_t travels in the downlink config and is counted there
    assert (df["bytes_down"][1:] > df["bytes_down"][0]).all()

    # momentum persisted in the clients' context state, keyed by parameter
    states = [c.state[MOMENTUM_STATE_KEY] for c in grid.contexts.values() if MOMENTUM_STATE_KEY in c.state]
    assert states and set(states[0].keys()) == {n for n, _ in initial_model(cfg).named_parameters()}

    # Figure 3 table and plot, and the summary
    table = pd.read_csv(tmp_path / "luar_layers.csv")
    assert (table["aggregated"] + table["recycled"] == 4).all()
    assert table["recycled"].sum() == 2 * 3
    assert dict(zip(table["layer"], table["recycled"])) == {g: sum(g in r for r in recycled) for g in table["layer"]}
    assert (tmp_path / "luar_layers.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["luar_layers"] == {
        r.layer: {"aggregated": r.aggregated, "recycled": r.recycled} for r in table.itertuples()
    }
    scores = pd.read_csv(tmp_path / "luar_scores.csv")
    assert len(scores) == 4 * 5


def test_module_granularity_recycles_weight_and_bias_together(tmp_path: Path) -> None:
    cfg = _cfg(strategy="fedluar", **{"recycled-layers": 2, "luar-granularity": "module", "rounds": 2})
    grid = _grid(cfg)
    run_server(grid, cfg, tmp_path, show_progress=False)
    omitted = set(grid.sent[1][0].content["config"][RECYCLED_CONFIG_KEY])
    assert len(omitted) == 4 and {k.rsplit(".", 1)[1] for k in omitted} == {"weight", "bias"}
    assert all(set(m.content["arrays"].keys()).isdisjoint(omitted) for m in grid.received[1])


def test_recyclable_groups() -> None:
    from torchvision.models import resnet18

    shapes = [(n, p.shape) for n, p in resnet18(num_classes=10).named_parameters()]
    tensor = recyclable_groups(shapes)
    assert all(len(ks) == 1 and not k.startswith("bn") for k, ks in tensor.items())
    assert len(tensor) == 21  # 20 convs (incl. 3 downsample) + fc
    module = recyclable_groups(shapes, "module")
    assert module["fc"] == ["fc.weight", "fc.bias"] and "bn1" not in module and len(module) == 21
    with pytest.raises(ValueError, match="granularity"):
        recyclable_groups(shapes, "block")


# --------------------------------------------------------------------------------------------
# client pieces
# --------------------------------------------------------------------------------------------


def test_client_step_omits_and_keeps_momentum() -> None:
    cfg = _cfg(strategy="fedluar", **{"persist-momentum": True})
    model = initial_model(cfg)
    arrays = ArrayRecord(model.state_dict())
    ctx = node_context(7, 1, 4)
    omit = ["features.0.weight", "classifier.4.weight"]
    msg = Message(
        content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 2, RECYCLED_CONFIG_KEY: omit})}),
        message_type=MessageType.TRAIN,
        dst_node_id=7,
    )
    reply = fedluar_train(msg, ctx, cfg)
    assert list(reply.content["arrays"].keys()) == [k for k in arrays.keys() if k not in omit]
    first = ctx.state[MOMENTUM_STATE_KEY].to_torch_state_dict()
    assert set(first) == {n for n, _ in model.named_parameters()} and all(v.abs().sum() > 0 for v in first.values())
    # a second round continues from the stored buffers (a fresh optimizer would give other weights)
    again = fedluar_train(msg, ctx, cfg)
    fresh = fedluar_train(msg, node_context(7, 1, 4), cfg)
    k = "classifier.0.weight"
    assert not np.array_equal(again.content["arrays"][k].numpy(), fresh.content["arrays"][k].numpy())
    with pytest.raises(ValueError, match="does not have"):
        omit_arrays({"a": torch.zeros(1)}, ["b"])


def test_restored_momentum_is_what_sgd_continues_from() -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    record = momentum_record(net, opt)
    net2 = torch.nn.Linear(3, 2)
    net2.load_state_dict(net.state_dict())
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    assert restore_momentum(net2, opt2, record) == 2
    x = torch.randn(4, 3)
    before = net2.weight.detach().clone()
    opt2.zero_grad()
    net2(x).sum().backward()
    grad = net2.weight.grad.detach().clone()
    opt2.step()
    buf = record.to_torch_state_dict()["weight"]
    assert torch.allclose(net2.weight.detach(), before - 0.1 * (0.9 * buf + grad))


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"recycled-layers": 6}, "recycled-layers = 6 exceeds the 5 recyclable layers of lenet5"),
        ({"recycled-layers": 5, "model": "cnn"}, "exceeds the 4 recyclable layers of cnn"),
        ({"persist-momentum": True, "momentum": 0.0}, "persist-momentum = true but momentum = 0.0"),
        ({"luar-lr-milestones": "100,x"}, "luar-lr-milestones = '100,x'"),
        ({"luar-base": "scaffold"}, "unknown luar-base 'scaffold'"),
        ({"luar-granularity": "block"}, "choose one of: tensor, module"),
        ({"recycled-layers": -1}, "recycled-layers = -1 is out of range"),
    ],
)
def test_bad_fedluar_config(override: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        resolve_config({**TINY, "strategy": "fedluar", **override})


def test_milestone_learning_rate() -> None:
    cfg = _cfg(strategy="fedluar", **{"lr": 0.2, "luar-lr-milestones": "100, 150"})
    assert [luar_round_lr(cfg, t) for t in (1, 100, 101, 150, 151)] == pytest.approx([0.2, 0.2, 0.02, 0.02, 0.002])
    strategy = build_strategy(cfg)
    assert strategy.client_lr is not None and strategy.client_lr(120) == pytest.approx(0.02)
    assert build_strategy(_cfg(strategy="fedluar")).client_lr is None


# --------------------------------------------------------------------------------------------
# replies from clients that ignore R_t, and the reply check
# --------------------------------------------------------------------------------------------


def test_full_replies_are_accepted_and_their_recycled_part_ignored() -> None:
    server_cfg = _cfg(strategy="fedluar", **{"recycled-layers": 2})
    stock_clients = _grid(_cfg(strategy="fedavg"))  # the standard client: sends the whole model
    strategy = build_strategy(server_cfg)
    xs = _rounds(strategy, stock_clients, ArrayRecord(initial_model(server_cfg).state_dict()), 3, seed=4)
    recycled = strategy.history[-1]["recycled"]
    replies = stock_clients.received[-1]
    assert all(set(recycled) <= set(m.content["arrays"].keys()) for m in replies)
    assert all(strategy.validate_reply(3, m) is None for m in replies)
    fedavg = _np(aggregate_arrayrecords([m.content for m in replies], "num-examples"))
    for k in xs[-1].keys():
        if k in recycled:
            assert np.array_equal(xs[-1][k].numpy(), xs[-2][k].numpy() + strategy.prev_update[k])
        else:
            assert np.array_equal(xs[-1][k].numpy(), fedavg[k])


def test_validate_reply_rejects_what_cannot_be_aggregated() -> None:
    cfg = _cfg(strategy="fedluar", **{"recycled-layers": 2})
    strategy = build_strategy(cfg)
    grid = _grid(cfg)
    xs = _rounds(strategy, grid, ArrayRecord(initial_model(cfg).state_dict()), 1)
    with seeded_sampling(0, 2):
        msgs = list(strategy.configure_train(2, xs[-1], ConfigRecord({"server-round": 2}), grid))
    omit = list(msgs[0].content["config"][RECYCLED_CONFIG_KEY])
    good = grid.send_and_receive(msgs[:1])[0]
    assert strategy.validate_reply(2, good) is None

    def reply_with(arrays: dict[str, np.ndarray]) -> Message:
        return train_reply(msgs[0], ArrayRecord({k: Array(v) for k, v in arrays.items()}), 5)

    sent = _np(good.content["arrays"])
    other = next(k for k in sent if k not in omit)
    assert "missing" in strategy.validate_reply(2, reply_with({k: v for k, v in sent.items() if k != other}))
    assert "unexpected" in strategy.validate_reply(2, reply_with({**sent, omit[0]: xs[-1][omit[0]].numpy()}))
    assert "dtype" in strategy.validate_reply(2, reply_with({**sent, other: sent[other].astype(np.float64)}))
    assert "NaN" in strategy.validate_reply(2, reply_with({**sent, other: sent[other] * np.nan}))


@pytest.mark.parametrize(
    ("name", "layers", "delta"),
    [
        ("fedluar-fmnist-cnn", 4, 2),
        ("fedluar-mnist-cnn", 4, 2),
        ("fedluar-fmnist-lenet5", 5, 2),
        ("fedluar-cifar10-resnet20", 23, 12),
    ],
)
def test_experiment_configs(name: str, layers: int, delta: int) -> None:
    path = Path(__file__).resolve().parents[1] / "experiments" / "configs" / f"{name}.toml"
    cfg = resolve_config(path)
    strategy = build_strategy(cfg)
    assert isinstance(strategy, LUAR) and len(strategy.groups or {}) == layers and strategy.num_recycled == delta
    assert (cfg["num-clients"], cfg["clients-per-round"], cfg["alpha"], cfg["local-steps"]) == (128, 32, 0.1, 20)
