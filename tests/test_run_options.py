"""The run options that make the FedLUAR authors' setting reachable, for every method that can use
them (issue 15, item 9): ``weighting``, ``client-momentum``, ``init``, ``weight-decay-rule``, and the
FedOpt mapping (LUAR over FedAvgM with server lr 1.2, no server momentum).

In process (no Ray): the real ClientApp through the loopback grid, the real round loop.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg
from loopback import LoopbackGrid, node_context, set_task_identity, train_reply

from clients.momentum import MOMENTUM_STATE_KEY, load_momentum
from clients.standard import standard_train
from clients.train import optimizer_from_config
from fedsparse import config as config_module
from fedsparse import model_options
from fedsparse.checkpoint import pack_state, unpack_state
from fedsparse.config import ConfigError, client_momentum, resolve_config
from fedsparse.global_model import initial_model
from fedsparse.grid import seeded_sampling
from fedsparse.methods import build_strategy
from fedsparse.models import build_model
from fedsparse.protocol import MOMENTUM_RECORD
from fedsparse.server import run_server
from fedsparse.wrappers import SlotBuffers, SlotMomentum, UniformWeighting
from strategies.fedluar import LUAR

TINY = {
    "dataset": "fashion-mnist",
    "model": "lenet5",
    "num-clients": 4,
    "clients-per-round": 2,
    "rounds": 3,
    "local-steps": 2,
    "batch-size": 16,
    "lr": 0.05,
    "momentum": 0.9,
    "eval-batch-size": 5000,
    "wire-bytes": False,
    "seed": 3,
}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity()


def _cfg(**over: Any) -> dict[str, Any]:
    return resolve_config({**TINY, **over})


def _kw(n: int, k: int) -> dict[str, Any]:
    return {"fraction_train": k / n, "min_train_nodes": k, "min_available_nodes": n, "fraction_evaluate": 0.0}


def _synthetic(
    strategy: Any, sizes: list[int], seed: int = 0, x0: ArrayRecord | None = None
) -> tuple[ArrayRecord, list[dict[str, np.ndarray]], Any]:
    """One round of ``strategy`` with hand-made replies: (x0, the replies' arrays, the aggregate)."""
    rng = np.random.default_rng(seed)
    if x0 is None:
        x0 = ArrayRecord({"w": Array(rng.normal(size=(3, 4)).astype(np.float32)), "b": Array(np.zeros(4, np.float32))})
    grid = LoopbackGrid(None, len(sizes))
    with seeded_sampling(0, 1):
        msgs = list(strategy.configure_train(1, x0, ConfigRecord({"server-round": 1}), grid))
    sent = []
    replies = []
    for msg, n in zip(msgs, sizes):
        arrays = {k: rng.normal(size=a.numpy().shape).astype(np.float32) for k, a in x0.items()}
        sent.append(arrays)
        replies.append(train_reply(msg, ArrayRecord({k: Array(v) for k, v in arrays.items()}), n))
    new, _ = strategy.aggregate_train(1, replies)
    return x0, sent, new


# --------------------------------------------------------------------------------------------
# weighting
# --------------------------------------------------------------------------------------------


def test_uniform_weighting_gives_each_reply_weight_one_over_a() -> None:
    sizes = [1, 10, 300]
    _, sent, weighted = _synthetic(FedAvg(**_kw(3, 3)), sizes)
    _, sent_u, uniform = _synthetic(UniformWeighting(FedAvg(**_kw(3, 3))), sizes)
    for k in ("w", "b"):
        mean = np.mean([s[k] for s in sent_u], axis=0)
        np.testing.assert_allclose(uniform[k].numpy(), mean, rtol=1e-6, atol=1e-7)
        by_examples = sum(n * s[k] for n, s in zip(sizes, sent)) / sum(sizes)
        np.testing.assert_allclose(weighted[k].numpy(), by_examples, rtol=1e-5, atol=1e-6)
        assert not np.allclose(weighted[k].numpy(), np.mean([s[k] for s in sent], axis=0), atol=1e-3)


def test_uniform_weighting_reaches_the_mean_inside_server_optimisers_and_luar() -> None:
    sizes = [2, 50, 7]
    # LUAR (δ = 0) over FedAdam: FedAdam's step from the uniform mean, not the weighted one
    plain = FedAdam(eta=0.1, **_kw(3, 3))
    x0, sent, want = _synthetic(plain, [1, 1, 1])  # FedAdam of the plain mean
    _, sent2, got = _synthetic(UniformWeighting(LUAR(FedAdam(eta=0.1, **_kw(3, 3)), 0)), sizes)
    for k in ("w", "b"):
        np.testing.assert_array_equal(sent[0][k], sent2[0][k])  # same replies (same generator)
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=1e-6)
    _, _, weighted = _synthetic(LUAR(FedAdam(eta=0.1, **_kw(3, 3)), 0), sizes)
    assert not np.allclose(weighted["w"].numpy(), want["w"].numpy())


def test_uniform_weighting_in_the_round_loop(tmp_path: Path) -> None:
    cfg = _cfg(strategy="fedluar", weighting="uniform", rounds=1, partition="dirichlet", **{"recycled-layers": 0})
    strategy = build_strategy(cfg)
    assert isinstance(strategy, UniformWeighting) and isinstance(strategy.inner, LUAR)
    grid = LoopbackGrid.for_config(cfg)
    result = run_server(grid, cfg, tmp_path, show_progress=False)
    replies = grid.received[0]
    sizes = [int(m.content["metrics"]["num-examples"]) for m in replies]
    assert len(set(sizes)) > 1  # the clients differ in size: the weighting matters
    for k in result.arrays.keys():
        mean = np.mean([m.content["arrays"][k].numpy().astype(np.float64) for m in replies], axis=0)
        np.testing.assert_allclose(result.arrays[k].numpy(), mean, rtol=1e-5, atol=1e-6)
    assert "weighting" in resolve_config({}) and resolve_config({})["weighting"] == "examples"
    with pytest.raises(ConfigError, match="unknown weighting 'equal'.*examples, uniform"):
        _cfg(weighting="equal")


# --------------------------------------------------------------------------------------------
# client momentum
# --------------------------------------------------------------------------------------------


def test_persist_momentum_is_an_alias_of_client_momentum_client() -> None:
    assert client_momentum(_cfg(strategy="fedluar", **{"persist-momentum": True})) == "client"
    assert client_momentum(_cfg(strategy="fedavg", **{"client-momentum": "client"})) == "client"
    assert client_momentum(_cfg()) == "fresh"
    with pytest.raises(ConfigError, match="persist-momentum = true .* contradicts client-momentum = 'slot'"):
        _cfg(strategy="fedluar", **{"persist-momentum": True, "client-momentum": "slot"})
    with pytest.raises(ConfigError, match="client-momentum = 'slot' is not supported by strategy 'feddip'"):
        _cfg(strategy="feddip", **{"client-momentum": "slot"})
    with pytest.raises(ConfigError, match="client-momentum = 'slot' but momentum = 0.0"):
        _cfg(strategy="fedavg", momentum=0.0, **{"client-momentum": "slot"})
    with pytest.raises(ConfigError, match="client-momentum = 'client' with optimizer = 'adam'"):
        _cfg(strategy="fedavg", optimizer="adam", **{"client-momentum": "client"})


def test_client_momentum_client_works_for_the_standard_step() -> None:
    cfg = _cfg(strategy="fedavg", **{"client-momentum": "client"})
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    msg = Message(
        content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
        message_type=MessageType.TRAIN,
        dst_node_id=7,
    )
    ctx = node_context(7, 1, 4)
    out = standard_train(msg, ctx, cfg)
    assert MOMENTUM_STATE_KEY in ctx.state and MOMENTUM_RECORD not in out.content
    again = standard_train(msg, ctx, cfg)
    fresh = standard_train(msg, node_context(7, 1, 4), cfg)
    k = "classifier.0.weight"
    assert not np.array_equal(again.content["arrays"][k].numpy(), fresh.content["arrays"][k].numpy())


def test_slot_momentum_hands_buffer_k_to_the_kth_sampled_client(tmp_path: Path) -> None:
    cfg = _cfg(strategy="fedavg", rounds=3, **{"client-momentum": "slot"})
    assert isinstance(build_strategy(cfg), SlotMomentum)
    grid = LoopbackGrid.for_config(cfg)
    run_server(grid, cfg, tmp_path / "slot", show_progress=False)
    (sent1, replies1), (sent2, replies2), (sent3, _) = grid.exchanges
    # round 1: every slot empty, every client starts fresh and sends its buffers back
    assert all(MOMENTUM_RECORD not in m.content for m in sent1)
    assert all(MOMENTUM_RECORD in r.content for r in replies1)
    params = {n for n, _ in initial_model(cfg).named_parameters()}
    for earlier_sent, earlier_replies, later_sent in ((sent1, replies1, sent2), (sent2, replies2, sent3)):
        by_node = {r.metadata.src_node_id: r for r in earlier_replies}
        for k, msg in enumerate(later_sent):
            # the k-th message of the round goes to the k-th sampled client and carries buffer k:
            # what the k-th sampled client of the previous round sent back
            previous = by_node[earlier_sent[k].metadata.dst_node_id].content[MOMENTUM_RECORD]
            got = msg.content[MOMENTUM_RECORD]
            assert set(got.keys()) == params
            for name in params:
                np.testing.assert_array_equal(got[name].numpy(), previous[name].numpy())
        # the sampled clients changed between rounds: the buffer follows the slot, not the client
    assert [m.metadata.dst_node_id for m in sent1] != [m.metadata.dst_node_id for m in sent2] or [
        m.metadata.dst_node_id for m in sent2
    ] != [m.metadata.dst_node_id for m in sent3]
    # clients keep nothing themselves
    assert all(MOMENTUM_STATE_KEY not in c.state for c in grid.contexts.values())

    # the buffers are counted in the bytes, and reported apart: same run without them
    fresh_cfg = _cfg(strategy="fedavg", rounds=3, **{"client-momentum": "fresh"})
    run_server(LoopbackGrid.for_config(fresh_cfg), fresh_cfg, tmp_path / "fresh", show_progress=False)
    slot = pd.read_csv(tmp_path / "slot" / "rounds.csv")
    fresh = pd.read_csv(tmp_path / "fresh" / "rounds.csv")
    assert slot["slot_momentum_bytes_down"].tolist()[0] == 0 and (slot["slot_momentum_bytes_down"][1:] > 0).all()
    assert (slot["slot_momentum_bytes_up"] > 0).all()
    assert (slot["bytes_up"] - slot["slot_momentum_bytes_up"] == fresh["bytes_up"]).all()
    assert (slot["bytes_down"] - slot["slot_momentum_bytes_down"] == fresh["bytes_down"]).all()


def test_slot_momentum_buffer_is_loaded_by_the_client() -> None:
    cfg = _cfg(strategy="fedluar", **{"client-momentum": "slot", "recycled-layers": 0})
    model = initial_model(cfg)
    opt = optimizer_from_config(model, 0.1, cfg)
    buffers = ArrayRecord({n: Array(np.full(tuple(p.shape), 0.5, np.float32)) for n, p in model.named_parameters()})
    msg = Message(
        content=RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "config": ConfigRecord({"server-round": 2}),
                MOMENTUM_RECORD: buffers,
            }
        ),
        message_type=MessageType.TRAIN,
        dst_node_id=7,
    )
    ctx = node_context(7, 0, 4)
    assert load_momentum(msg, ctx, cfg, model, opt) == len(list(model.parameters()))
    assert all(float(opt.state[p]["momentum_buffer"].mean()) == 0.5 for p in model.parameters())


def test_slot_state_round_trip_and_reply_check() -> None:
    strategy = SlotMomentum(UniformWeighting(FedAvg(**_kw(2, 2))), 2)
    x0, _, _ = _synthetic(strategy, [3, 4])
    assert all(s is None for s in strategy.slots)  # the synthetic replies carried no momentum
    strategy.slots[1] = SlotBuffers.frozen({"w": np.ones((3, 4), np.float32)})
    # the loop's snapshot (a deep copy of the attributes) shares the read-only buffers, not copies them
    snap = copy.deepcopy(vars(strategy))
    assert snap["slots"][1]["w"] is strategy.slots[1]["w"] and not strategy.slots[1]["w"].flags.writeable
    packed = pack_state(strategy.state_dict())
    other = SlotMomentum(UniformWeighting(FedAvg(**_kw(2, 2))), 2)
    other.load_state_dict(unpack_state(*packed))
    assert other.slots[0] is None and np.array_equal(other.slots[1]["w"], np.ones((3, 4)))
    with pytest.raises(ValueError, match="checkpoint has 2 momentum slots, this run 3"):
        SlotMomentum(FedAvg(**_kw(2, 2)), 3).load_state_dict(unpack_state(*packed))
    # a reply whose momentum does not fit the model is rejected; the model part is still checked
    grid = LoopbackGrid(None, 2)
    with seeded_sampling(0, 2):
        msgs = list(strategy.configure_train(2, x0, ConfigRecord({"server-round": 2}), grid))
    assert MOMENTUM_RECORD in msgs[1].content and MOMENTUM_RECORD not in msgs[0].content
    bad = Message(
        content=RecordDict(
            {
                "arrays": x0,
                "metrics": train_reply(msgs[0], x0, 3).content["metrics"],
                MOMENTUM_RECORD: ArrayRecord({"w": Array(np.ones((4, 3), np.float32))}),
            }
        ),
        reply_to=msgs[0],
    )
    assert "has shape (4, 3)" in (strategy.validate_reply(2, bad) or "")
    good = train_reply(msgs[0], x0, 3)
    assert strategy.validate_reply(2, good) is None
    wrong_model = train_reply(msgs[0], ArrayRecord({"w": x0["w"]}), 3)
    assert "missing" in (strategy.validate_reply(2, wrong_model) or "")


# --------------------------------------------------------------------------------------------
# init and weight decay
# --------------------------------------------------------------------------------------------


def test_glorot_init_kernels_biases_and_residual_gamma() -> None:
    base = {"dataset": "fashion-mnist", "model": "cnn", "seed": 0}
    torch_model = initial_model(resolve_config(base))
    glorot = initial_model(resolve_config({**base, "init": "glorot"}))
    fc1_torch = float(torch_model.classifier[0].weight.norm())
    fc1_glorot = float(glorot.classifier[0].weight.norm())
    fan_in, fan_out = 7 * 7 * 64, 2048
    expected = (fan_in * fan_out * 2.0 / (fan_in + fan_out)) ** 0.5  # √(n · Var[U(±√(6/(fi+fo)))])
    assert abs(fc1_glorot - expected) / expected < 0.01  # 49.8 (the Keras figure)
    assert abs(fc1_torch - 26.1) < 0.5  # PyTorch's default: the figure
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    assert float(glorot.classifier[0].weight.abs().max()) <= bound
    assert all(float(m.bias.abs().max()) == 0.0 for m in glorot.modules() if isinstance(m, torch.nn.Linear))
    assert any(float(m.bias.abs().max()) > 0.0 for m in torch_model.modules() if isinstance(m, torch.nn.Linear))

    torch.manual_seed(0)
    resnet = model_options.apply_init(build_model("resnet20", 10, 3, 32), "glorot")
    blocks = [m for m in resnet.modules() if hasattr(m, "bn2") and hasattr(m, "conv2")]
    assert len(blocks) == 9
    assert all(float(b.bn2.weight.abs().max()) == 0.0 and float(b.bn1.weight.min()) == 1.0 for b in blocks)
    conv = resnet.layer2[1].conv1.weight  # 3×3, 32 → 32
    assert float(conv.abs().max()) <= (6.0 / (9 * 32 + 9 * 32)) ** 0.5
    with pytest.raises(ValueError, match="unknown init 'he'"):
        model_options.apply_init(resnet, "he")
    with pytest.raises(ConfigError, match="unknown init 'xavier'"):
        resolve_config({**base, "init": "xavier"})
    assert config_module.INITS == model_options.INITS
    assert config_module.WEIGHT_DECAY_RULES == model_options.WEIGHT_DECAY_RULES


def test_reference_weight_decay_per_model() -> None:
    cfg = resolve_config({"model": "cnn", "weight-decay-rule": "fedluar-reference"})
    model = build_model("cnn", 10, 1, 28)
    groups = model_options.decay_groups(model, cfg)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]  # the reference CNN has no decay
    opt = optimizer_from_config(model, 0.01, cfg)
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)

    res_cfg = {**cfg, "model": "resnet20"}
    resnet = build_model("resnet20", 10, 3, 32)
    opt = optimizer_from_config(resnet, 0.2, res_cfg)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in resnet.named_parameters():
        want = 2e-4 if (p.ndim > 1 or name == "linear.bias") else 0.0  # Keras l2(1e-4): gradient 2λw
        assert decay_of[id(p)] == pytest.approx(want), name
    assert len(decay_of) == len(list(resnet.parameters()))
    # fixed: today's behaviour, one group
    fixed = optimizer_from_config(resnet, 0.2, {**res_cfg, "weight-decay-rule": "fixed", "weight-decay": 1e-4})
    assert [g["weight_decay"] for g in fixed.param_groups] == [1e-4]

    with pytest.raises(ConfigError, match="weight-decay = 0.0001 with weight-decay-rule = 'fedluar-reference'"):
        resolve_config({"model": "cnn", "weight-decay-rule": "fedluar-reference", "weight-decay": 1e-4})
    with pytest.raises(ConfigError, match="no entry for model 'lenet5'; the reference code sets it for: cnn, resnet20"):
        resolve_config({"model": "lenet5", "weight-decay-rule": "fedluar-reference"})


# --------------------------------------------------------------------------------------------
# the paper's "FedOpt" (Table 4): FedAvg with a server learning rate of 1.2
# --------------------------------------------------------------------------------------------


def test_fedopt_mapping_is_fedavgm_with_server_lr_1_2() -> None:
    cfg = _cfg(
        strategy="fedluar",
        **{
            "num-clients": 3,
            "clients-per-round": 3,
            "recycled-layers": 0,
            "luar-base": "fedavgm",
            "luar-server-lr": 1.2,
            "luar-server-momentum": 0.0,
        },
    )
    strategy = build_strategy(cfg)
    x0, sent, new = _synthetic(strategy, [5, 5, 5], x0=ArrayRecord(initial_model(cfg).state_dict()))
    for k in x0.keys():
        mean = np.mean([s[k] for s in sent], axis=0)
        np.testing.assert_allclose(new[k].numpy(), x0[k].numpy() + 1.2 * (mean - x0[k].numpy()), rtol=1e-5, atol=1e-6)
