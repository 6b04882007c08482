"""FedDIP strategy + client step, in process (no Ray): real Flower messages, real ClientApp, real data.

The loopback grid (tests/loopback.py) is a real ``flwr.serverapp.Grid`` implementation that delivers
each message to our real ClientApp in this process (what the simulation engine does through Ray
actors), so the whole round trip — codec-encoded downlink, FedDIP local step, sparse uplink,
aggregation, re-pruning — runs in a second instead of a Ray start.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from loopback import LoopbackGrid, set_task_identity, train_reply

from clients.feddip import decode_global, encode_update, feddip_client_round
from fedsparse import codec
from fedsparse.accounting import payload_bytes
from fedsparse.config import ConfigError, resolve_config
from fedsparse.grid import seeded_sampling
from fedsparse.masks import erk_counts, global_magnitude_masks, magnitude_erk_masks, num_pruned, prunable_names
from fedsparse.methods import build_strategy
from fedsparse.models import build_model
from fedsparse.schedules import cubic_sparsity, incremental_lambda
from fedsparse.server import initial_model, run_server
from strategies.feddip import FedDIP

LENET_ERK_05 = [1.0, 0.525, 0.426, 0.796, 1.0]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages built outside a running app need a task identity (flower-notes, 'Tests without Ray')."""
    set_task_identity(node_id=0)


def _grid(cfg: dict, num_nodes: int = 4, **options: Any) -> LoopbackGrid:
    """Our ClientApp for ``cfg`` on nodes 1000, 1007, 1014, …"""
    return LoopbackGrid.for_config(cfg, num_nodes, first_node_id=1000, node_id_step=7, **options)


def _cfg(**over) -> dict:
    base = {
        "strategy": "feddip",
        "num-clients": 4,
        "clients-per-round": 2,
        "rounds": 6,
        "local-steps": 2,
        "batch-size": 16,
        "reconfig-every": 2,
        "initial-sparsity": 0.5,
        "target-sparsity": 0.9,
        "lambda-max": 1e-3,
        "lambda-steps": 3,
        "seed": 3,
        "wire-bytes": False,
        # the random first mask of Algorithm 1, line 3 (these tests pin its arithmetic);
        # the magnitude first mask after dense rounds has its own tests below
        "initial-mask": "random-erk",
        "dense-rounds": 0,
    }
    base.update(over)
    return resolve_config(None, base)


def _prunable_count(arrays: ArrayRecord) -> tuple[int, int]:
    state = arrays.to_torch_state_dict()
    names = prunable_names(state)
    total = sum(state[n].numel() for n in names)
    zeros = sum(int((state[n] == 0).sum()) for n in names)
    return zeros, total


def _drive(strategy: FedDIP, grid: LoopbackGrid, cfg: dict, rounds: int) -> tuple[ArrayRecord, list[dict]]:
    """The round loop of fedsparse.server, with a snapshot of the strategy's mask after each round."""
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    history = []
    for t in range(1, rounds + 1):
        with seeded_sampling(int(cfg["seed"]), t):
            msgs = list(strategy.configure_train(t, arrays, ConfigRecord({"server-round": t}), grid))
        replies = list(grid.send_and_receive(msgs))
        new, _ = strategy.aggregate_train(t, replies)
        arrays = new if new is not None else arrays
        history.append(
            {
                "masks": {n: m.clone() for n, m in strategy.masks.items()},
                "arrays": arrays,
                "msgs": msgs,
                "replies": replies,
            }
        )
    return arrays, history


# ----------------------------------------------------------------------------- first round / downlink


def test_round1_sends_erk_masked_model_from_the_seed_and_fewer_bytes() -> None:
    cfg = _cfg()
    grid = _grid(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    strategy = build_strategy(cfg)
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid))
    assert len(msgs) == 2 and set(msgs[0].content["arrays"].keys()) == {"index", "values"}
    config = msgs[0].content["config"]
    names = list(config["feddip-prunable"])
    assert names == [
        "features.0.weight",
        "features.3.weight",
        "classifier.0.weight",
        "classifier.2.weight",
        "classifier.4.weight",
    ]
    assert config["feddip-lambda"] == incremental_lambda(0, 6, 1e-3, 3) == 0.0  # round τ = 1 is eq. 9's t = 0
    assert config["feddip-sparse-uplink"] is True
    assert "proximal-mu" not in config  # FedDIP's proximal term is off unless feddip-prox = true

    state, masks = decode_global(msgs[0].content["arrays"], names)
    initial = arrays.to_torch_state_dict()
    densities = [masks[n].float().mean().item() for n in names]
    assert densities == pytest.approx(LENET_ERK_05, abs=0.005)
    total = sum(m.numel() for m in masks.values())
    assert total - sum(int(m.sum()) for m in masks.values()) == num_pruned(total, 0.5)
    for n in initial:  # the model sent is w_0 ⊙ m_0, non-prunable tensors untouched
        expected = initial[n] * masks[n] if n in masks else initial[n]
        assert torch.equal(state[n], expected)
    # the downlink is measurably smaller than the dense model
    dense = payload_bytes(RecordDict({"arrays": arrays})).total
    assert payload_bytes(RecordDict({"arrays": msgs[0].content["arrays"]})).total < 0.75 * dense

    # same seed → same mask; another seed → another mask
    again = build_strategy(cfg)
    again.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid)
    assert all(torch.equal(again.masks[n], strategy.masks[n]) for n in names)
    other = build_strategy(_cfg(seed=4))
    other.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid)
    assert not torch.equal(other.masks["classifier.0.weight"], strategy.masks["classifier.0.weight"])


def test_dpf_variant_starts_dense() -> None:
    cfg = _cfg(**{"initial-sparsity": 0.0, "lambda-max": 0.0})
    grid = _grid(cfg)
    strategy = build_strategy(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid))
    kinds = codec.index_kinds(codec.from_array_record(msgs[0].content["arrays"]))
    assert set(kinds.values()) == {"dense"}
    assert strategy.mask_sparsity() == 0.0


# ----------------------------------------------------------------------------- the whole loop


def test_nested_masks_schedule_and_exact_final_sparsity() -> None:
    cfg = _cfg()
    grid = _grid(cfg)
    strategy = build_strategy(cfg)
    final, history = _drive(strategy, grid, cfg, rounds=6)
    n_total = sum(m.numel() for m in history[0]["masks"].values())
    # eq. 9 with T = 6, Q = 3 at t = τ − 1: zero for exactly the first T/Q = 2 rounds
    assert [strategy.round_report(t)["lambda"] for t in range(1, 7)] == pytest.approx(
        [0, 0, 1e-3 / 3, 1e-3 / 3, 2e-3 / 3, 2e-3 / 3]
    )
    for t, h in enumerate(history, start=1):
        report = strategy.round_report(t)
        assert report["lambda"] == incremental_lambda(t - 1, 6, 1e-3, 3)
        assert h["msgs"][0].content["config"]["feddip-lambda"] == report["lambda"]
        assert report["target_sparsity"] == cubic_sparsity(t, 6, 0.5, 0.9)
        assert report["reconfigured"] == (t % 2 == 0)
        kept = sum(int(m.sum()) for m in h["masks"].values())
        if report["reconfigured"]:
            assert n_total - kept == num_pruned(n_total, report["target_sparsity"])
        # masks nested: each mask is a subset of the previous one
        if t > 1:
            prev = history[t - 2]["masks"]
            assert all(not bool((h["masks"][n] & ~prev[n]).any()) for n in prev)
        # the global model is zero outside the mask and the uplink was sparse (only kept entries)
        state = h["arrays"].to_torch_state_dict()
        old = history[t - 2]["masks"] if t > 1 else None
        for reply in h["replies"]:
            info = codec.tensor_nbytes(codec.from_array_record(reply.content["arrays"]))
            if old is not None:
                assert all(info[n]["nnz"] == int(old[n].sum()) for n in old)
        for n, m in h["masks"].items():
            assert bool((state[n][~m] == 0).all())
    # λ rose in steps during the run
    assert strategy.round_report(6)["lambda"] > 0
    # the returned model has exactly s_p over the prunable weights
    zeros, total = _prunable_count(final)
    assert zeros == num_pruned(total, 0.9)
    assert strategy.round_report(6)["sparsity"] == pytest.approx(0.9, abs=1 / total)


def test_lambda_uses_the_zero_based_round_index() -> None:
    """Eq. 9's t is τ − 1: λ = 0 for exactly the first T/Q rounds, λ_max/Q from τ = T/Q + 1, and the
    last step λ_max(Q − 1)/Q only for τ > (Q − 1)T/Q."""
    lam = 1e-3
    s = FedDIP(total_rounds=1000, lambda_max=lam, lambda_steps=10)
    assert s.lambda_at(1) == 0.0
    assert s.lambda_at(100) == 0.0  # τ = T/Q: still in the first T/Q rounds
    assert s.lambda_at(101) == pytest.approx(lam / 10)  # τ = T/Q + 1
    assert s.lambda_at(200) == pytest.approx(lam / 10)
    assert s.lambda_at(201) == pytest.approx(2 * lam / 10)
    assert s.lambda_at(900) == pytest.approx(8 * lam / 10)  # τ = (Q − 1)T/Q
    assert s.lambda_at(901) == pytest.approx(9 * lam / 10)  # τ > (Q − 1)T/Q: the last step
    assert s.lambda_at(1000) == pytest.approx(9 * lam / 10)
    assert [s.lambda_at(t) for t in range(1, 1001)].count(0.0) == 100
    # T not a multiple of Q: T = 7, Q = 2, boundary at t = 3.5 → τ = 1..4 unregularised
    s = FedDIP(total_rounds=7, lambda_max=1.0, lambda_steps=2)
    assert [s.lambda_at(t) for t in range(1, 8)] == [0, 0, 0, 0, 0.5, 0.5, 0.5]


def test_final_round_prunes_to_target_even_when_not_a_multiple_of_r() -> None:
    cfg = _cfg(rounds=3, **{"reconfig-every": 5})
    strategy = build_strategy(cfg)
    final, _ = _drive(strategy, _grid(cfg), cfg, rounds=3)
    assert [strategy.round_report(t)["reconfigured"] for t in (1, 2, 3)] == [False, False, True]
    zeros, total = _prunable_count(final)
    assert zeros == num_pruned(total, 0.9)


def test_schedule_rounds_override_decouples_t_from_rounds() -> None:
    cfg = _cfg(rounds=2, **{"feddip-schedule-rounds": 10})
    strategy = build_strategy(cfg)
    assert strategy.total_rounds == 10
    assert strategy.sparsity_at(2) == cubic_sparsity(2, 10, 0.5, 0.9)


# ----------------------------------------------------------------------------- aggregation rules


def _reply_to(msg: Message, tensors: dict[str, np.ndarray], masks: dict[str, np.ndarray], n: int) -> Message:
    return train_reply(msg, codec.to_array_record(codec.encode(tensors, masks)), n, **{"train-loss": 0.0})


def _small_strategy(regrowth: bool) -> tuple[FedDIP, LoopbackGrid, list[Message], dict[str, np.ndarray]]:
    cfg = _cfg(rounds=2, **{"reconfig-every": 1, "regrowth": regrowth})
    grid = _grid(cfg)
    strategy = build_strategy(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    with seeded_sampling(3, 1):
        msgs = list(strategy.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid))
    base = {n: a.numpy() for n, a in arrays.items()}
    return strategy, grid, msgs, base


def test_weighted_average_and_nested_mask_ignores_pruned_positions() -> None:
    strategy, _, msgs, base = _small_strategy(regrowth=False)
    masks = {n: m.numpy() for n, m in strategy.masks.items()}
    a = {n: np.full_like(x, 1.0) for n, x in base.items()}
    b = {n: np.full_like(x, 4.0) for n, x in base.items()}
    name = "classifier.0.weight"
    pruned_pos = tuple(np.argwhere(~masks[name])[0])
    # The marker goes into the reply sent dense (b): it reaches the server and survives decoding and
    # averaging (0.75 · 1e6 at a pruned position), so it would win the magnitude ranking if the
    # server re-pruned from the unmasked aggregate. Nested masks must ignore it.
    b[name][pruned_pos] = 1e6
    replies = [_reply_to(msgs[0], a, masks, 100), _reply_to(msgs[1], b, {}, 300)]  # second: dense uplink
    decoded_b = codec.decode(codec.from_array_record(replies[1].content["arrays"]))[0]
    assert decoded_b[name][pruned_pos] == 1e6  # the server does see it
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = arrays.to_torch_state_dict()
    assert float(out["classifier.0.bias"][0]) == pytest.approx(0.25 * 1 + 0.75 * 4)
    assert float(out[name][pruned_pos]) == 0.0
    assert not bool(strategy.masks[name][pruned_pos])
    assert not any(bool((strategy.masks[n] & ~torch.from_numpy(masks[n])).any()) for n in masks)  # nested
    assert metrics is not None and "train-loss" in metrics


def test_regrowth_lets_a_pruned_weight_return() -> None:
    strategy, _, msgs, base = _small_strategy(regrowth=True)
    assert msgs[0].content["config"]["feddip-sparse-uplink"] is False
    name = "classifier.0.weight"
    pruned_pos = tuple(np.argwhere(~strategy.masks[name].numpy())[0])
    a = {n: x.copy() for n, x in base.items()}
    a[name][pruned_pos] = 1e3
    arrays, _ = strategy.aggregate_train(1, [_reply_to(msgs[0], a, {}, 10)])
    assert bool(strategy.masks[name][pruned_pos])
    assert float(arrays.to_torch_state_dict()[name][pruned_pos]) == pytest.approx(1e3)


def test_regrowth_uplink_is_dense_exactly_in_reconfiguration_rounds(tmp_path: Path) -> None:
    """Under regrowth only the re-pruning rounds rank the dense aggregate, so only they ask for (and
    get, and count) the dense uplink; the other rounds are sparse, as with nested masks."""
    cfg = _cfg(rounds=5, **{"regrowth": True})  # R = 2: re-pruning after rounds 2, 4 and T = 5
    strategy = build_strategy(cfg)
    _, history = _drive(strategy, _grid(cfg), cfg, rounds=5)
    reconfig = [strategy.round_report(t)["reconfigured"] for t in range(1, 6)]
    assert reconfig == [False, True, False, True, True]
    for t, h in enumerate(history, start=1):
        assert h["msgs"][0].content["config"]["feddip-sparse-uplink"] is (not reconfig[t - 1])
        sent_masks = codec.decode(codec.from_array_record(h["msgs"][0].content["arrays"]))[1]
        for r in h["replies"]:
            info = codec.tensor_nbytes(codec.from_array_record(r.content["arrays"]))
            for n in strategy.prunable:
                if reconfig[t - 1]:
                    assert info[n]["kind"] == "dense" and info[n]["nnz"] == info[n]["numel"]
                else:  # only the round's mask (ERK leaves some layers fully kept: those are dense anyway)
                    assert info[n]["nnz"] == int(sent_masks[n].sum())
            if not reconfig[t - 1]:
                assert sum(info[n]["nnz"] for n in strategy.prunable) < sum(info[n]["numel"] for n in strategy.prunable)
    # the measured uplink bytes of rounds.csv: dense (≈ FedAvg's) exactly in the re-pruning rounds
    result = run_server(_grid(cfg), cfg, tmp_path, show_progress=False)
    rounds = result.rounds.set_index("round")
    dense_up = rounds["cum_dense_bytes_up"].diff().fillna(rounds["cum_dense_bytes_up"])  # FedAvg's, per round
    ratio = rounds["bytes_up"] / dense_up
    assert all(ratio[t] >= 0.99 for t in (2, 4, 5))
    assert all(ratio[t] < 0.75 for t in (1, 3))
    assert result.summary["final_sparsity"] == pytest.approx(0.9, abs=1e-4)


def test_regrowth_sparse_round_aggregates_sparse_replies_and_screens_dense_ones() -> None:
    cfg = _cfg(rounds=4, **{"regrowth": True})  # R = 2: round 1 is not a re-pruning round
    strategy = build_strategy(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    with seeded_sampling(3, 1):
        msgs = list(strategy.configure_train(1, arrays, ConfigRecord({"server-round": 1}), _grid(cfg)))
    assert msgs[0].content["config"]["feddip-sparse-uplink"] is True
    base = {n: a.numpy() for n, a in arrays.items()}
    masks = {n: m.numpy() for n, m in strategy.masks.items()}
    old = {n: m.clone() for n, m in strategy.masks.items()}
    a = {n: np.full_like(x, 2.0) for n, x in base.items()}
    sparse = _reply_to(msgs[0], a, masks, 10)
    assert strategy.validate_reply(1, sparse) is None
    assert "outside the round's mask" in strategy.validate_reply(1, _reply_to(msgs[0], a, {}, 10))
    out, _ = strategy.aggregate_train(1, [sparse])
    state = out.to_torch_state_dict()
    assert all(torch.equal(strategy.masks[n], old[n]) for n in old)  # no re-pruning in round 1
    for n, m in old.items():
        assert bool((state[n][m] == 2.0).all()) and bool((state[n][~m] == 0).all())


def test_regrowth_error_feedback_lets_a_pruned_weight_back_into_the_mask() -> None:
    """What error feedback buys under regrowth: a weight pruned at the start of a re-pruning round
    gains a value during local training (eq. 5, gradient at w ⊙ m applied to the dense w), the dense
    uplink carries it, and global magnitude pruning of the dense aggregate keeps it. With eq. 7's
    training of the masked model only, the same replies would be zero there (the kept weights follow
    the same trajectory either way: the forward pass never sees the pruned values), and the new
    mask could only be a subset of the old one."""
    # T = 100 so that s_1 is barely above s_0 = 0.5 and the weakest kept weights are small; a few
    # steps at lr 0.2 let pruned weights gain more than them (> 100 come back with seed 3)
    cfg = _cfg(
        rounds=2, lr=0.2, **{"local-steps": 4, "reconfig-every": 1, "regrowth": True, "feddip-schedule-rounds": 100}
    )
    grid = _grid(cfg)
    strategy = build_strategy(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    with seeded_sampling(3, 1):
        msgs = list(strategy.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid))
    assert msgs[0].content["config"]["feddip-sparse-uplink"] is False  # round 1 re-prunes
    old = {n: m.clone() for n, m in strategy.masks.items()}
    replies = list(grid.send_and_receive(msgs))
    strategy.aggregate_train(1, replies)
    regrown = {n: strategy.masks[n] & ~old[n] for n in old}
    assert sum(int(r.sum()) for r in regrown.values()) >= 10  # weights pruned at round start came back
    for r in replies:  # they came back through what they gained: the server received them nonzero
        dense = codec.decode(codec.from_array_record(r.content["arrays"]))[0]
        assert all(bool((dense[n][regrown[n].numpy()] != 0).all()) for n in old)
        # the round start sent them as 0: any value is what local training gave them
    sent = codec.decode(codec.from_array_record(msgs[0].content["arrays"]))[0]
    assert all(bool((sent[n][~old[n].numpy()] == 0).all()) for n in old)

    # eq. 7 counterfactual: the same replies with pruned positions at 0 (masked-model-only training)
    masked_only = build_strategy(cfg)
    with seeded_sampling(3, 1):
        m_msgs = list(masked_only.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid))
    np_old = {n: m.numpy() for n, m in old.items()}
    zeroed = []
    for r, m in zip(replies, m_msgs):
        dense = codec.decode(codec.from_array_record(r.content["arrays"]))[0]
        n_ex = int(next(iter(r.content.metric_records.values()))["num-examples"])
        zeroed.append(_reply_to(m, dense, np_old, n_ex))
    masked_only.aggregate_train(1, zeroed)
    assert all(not bool((masked_only.masks[n] & ~old[n]).any()) for n in old)
    assert any(not torch.equal(masked_only.masks[n], strategy.masks[n]) for n in old)


def test_no_replies_keeps_model_but_still_applies_schedule() -> None:
    strategy, _, msgs, base = _small_strategy(regrowth=False)
    arrays, metrics = strategy.aggregate_train(1, [])
    assert metrics is None and arrays is not None
    zeros, total = _prunable_count(arrays)
    assert zeros == num_pruned(total, cubic_sparsity(1, 2, 0.5, 0.9))


# ----------------------------------------------------------------------------- client side


def test_client_round_error_feedback_and_sparse_reply() -> None:
    cfg = _cfg()
    strategy = build_strategy(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord({"server-round": 1}), _grid(cfg)))
    # a kept weight that is exactly 0.0 stays kept: the mask comes from the index, not the values
    tensors, masks = codec.decode(codec.from_array_record(msgs[0].content["arrays"]))
    name = "features.3.weight"
    kept_pos = tuple(np.argwhere(masks[name])[0])
    tensors[name][kept_pos] = 0.0
    record = codec.to_array_record(codec.encode(tensors, {n: masks[n] for n in strategy.prunable}))
    names = list(msgs[0].content["config"]["feddip-prunable"])
    _, got = decode_global(record, names)
    assert bool(got[name][kept_pos])

    model = build_model("lenet5", 10, 1, 28)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(3)]
    config = ConfigRecord({"feddip-lambda": 1e-3, "feddip-prunable": names, "feddip-sparse-uplink": True})
    update, stats = feddip_client_round(
        record, config, model, batches, lambda m: torch.optim.SGD(m.parameters(), lr=0.1)
    )
    assert stats["num-steps"] == 3
    # error feedback: pruned positions of the local dense weights moved away from 0 ...
    dense = model.state_dict()
    assert bool((dense[name][~torch.from_numpy(masks[name])] != 0).any())
    # ... but the reply carries only the kept entries, with the downlink's mask
    sent, sent_masks = codec.decode(codec.from_array_record(update))
    for n in names:
        assert np.array_equal(sent_masks[n], got[n].numpy())
        assert np.array_equal(sent[n][~sent_masks[n]], np.zeros(int((~sent_masks[n]).sum()), np.float32))
    dense_reply = encode_update(dense, None)
    assert payload_bytes(RecordDict({"a": update})).total < payload_bytes(RecordDict({"a": dense_reply})).total


def test_feddip_prox_sends_mu_and_changes_the_update() -> None:
    cfg = _cfg(**{"feddip-prox": True, "proximal-mu": 0.5})
    strategy = build_strategy(cfg)
    assert strategy.proximal_mu == 0.5
    assert build_strategy(_cfg(**{"proximal-mu": 0.5})).proximal_mu == 0.0
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    msgs = list(strategy.configure_train(2, arrays, ConfigRecord({"server-round": 2}), _grid(cfg)))
    config = msgs[0].content["config"]
    assert config["proximal-mu"] == 0.5
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(3)]

    def opt(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.1)

    with_mu, _ = feddip_client_round(msgs[0].content["arrays"], config, build_model("lenet5", 10, 1, 28), batches, opt)
    plain = ConfigRecord({k: v for k, v in config.items() if k != "proximal-mu"})
    without, _ = feddip_client_round(msgs[0].content["arrays"], plain, build_model("lenet5", 10, 1, 28), batches, opt)
    a = codec.decode(codec.from_array_record(with_mu))[0]
    b = codec.decode(codec.from_array_record(without))[0]
    assert not np.array_equal(a["classifier.4.weight"], b["classifier.4.weight"])


# ----------------------------------------------------------------------------- state, start(), config


def test_state_dict_round_trip_resumes_identically() -> None:
    cfg = _cfg()
    grid = _grid(cfg)
    strategy = build_strategy(cfg)
    arrays, _ = _drive(strategy, grid, cfg, rounds=2)
    state = strategy.state_dict()
    assert all(m.dtype == np.bool_ for m in state["masks"].values())
    resumed = build_strategy(cfg)
    resumed.load_state_dict(state)
    a = strategy.configure_train(3, arrays, ConfigRecord({"server-round": 3}), grid)
    b = resumed.configure_train(3, arrays, ConfigRecord({"server-round": 3}), grid)
    ra, rb = list(a)[0].content["arrays"], list(b)[0].content["arrays"]
    assert all(np.array_equal(ra[k].numpy(), rb[k].numpy()) for k in ("index", "values"))
    with pytest.raises(ValueError, match="different settings"):
        build_strategy(_cfg(**{"target-sparsity": 0.8})).load_state_dict(state)


def test_strategy_start_in_a_plain_flower_loop() -> None:
    cfg = _cfg(rounds=2)
    strategy = build_strategy(cfg)
    train_config = ConfigRecord({"server-round": 0})
    seen = []
    result = strategy.start(
        _grid(cfg),
        ArrayRecord(initial_model(cfg).state_dict()),
        num_rounds=2,
        train_config=train_config,
        evaluate_fn=lambda t, arrays: seen.append(_prunable_count(arrays)) or MetricRecord({"x": 0.0}),
    )
    assert dict(train_config) == {"server-round": 0}  # start() reuses it: FedDIP must not mutate it
    zeros, total = _prunable_count(result.arrays)
    assert zeros == num_pruned(total, 0.9)
    assert len(seen) == 3  # round 0 and both rounds


def test_run_server_writes_feddip_columns_and_layer_report(tmp_path: Path) -> None:
    cfg = _cfg(rounds=6, **{"eval-every": 4, "eval-last": 2})
    result = run_server(_grid(cfg), cfg, tmp_path, show_progress=False)
    df = pd.read_csv(tmp_path / "rounds.csv")
    for col in ("sparsity", "lambda", "target_sparsity", "reconfigured", "reg_grad_ratio:features.0.weight"):
        assert col in df.columns
    # evaluated every eval-every rounds and in each of the last eval-last rounds
    assert list(df.loc[df["test_accuracy"].notna(), "round"]) == [4, 5, 6]
    assert df["sparsity"].iloc[-1] == pytest.approx(0.9, abs=1e-4)
    assert (df["comm_ratio_down"] < 1).all()
    assert (df["comm_ratio_up"] < 1).all()
    layers = pd.read_csv(tmp_path / "feddip_layer_sparsity.csv")
    assert list(layers["layer"]) == prunable_names(result.arrays.to_torch_state_dict())
    kept, numel = layers["kept"].sum(), layers["numel"].sum()
    assert numel - kept == num_pruned(int(numel), 0.9)
    assert (tmp_path / "feddip_layer_sparsity.png").is_file()
    assert result.summary["final_sparsity"] == pytest.approx(0.9, abs=1e-4)


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"initial-sparsity": 0.95}, "initial-sparsity"),
        ({"target-sparsity": 1.0}, "target-sparsity"),
        ({"reconfig-every": 0}, "reconfig-every"),
        ({"lambda-max": -1.0}, "lambda-max"),
    ],
)
def test_bad_configuration_is_a_config_error(over: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _cfg(**over)


def test_nested_global_pruning_matches_masks_module() -> None:
    """The strategy's re-pruning is fedsparse.masks' global magnitude pruning of w ⊙ m_old."""
    strategy, _, msgs, base = _small_strategy(regrowth=False)
    old = {n: m.clone() for n, m in strategy.masks.items()}
    rng = np.random.default_rng(0)
    a = {n: rng.standard_normal(x.shape).astype(x.dtype) for n, x in base.items()}
    arrays, _ = strategy.aggregate_train(1, [_reply_to(msgs[0], a, {n: m.numpy() for n, m in old.items()}, 5)])
    masked = {n: torch.from_numpy(a[n]) * old[n] for n in old}
    expected = global_magnitude_masks(masked, cubic_sparsity(1, 2, 0.5, 0.9), current_masks=old)
    assert all(torch.equal(expected[n], strategy.masks[n]) for n in old)
    assert math.isclose(
        strategy.mask_sparsity(),
        num_pruned(sum(m.numel() for m in old.values()), cubic_sparsity(1, 2, 0.5, 0.9))
        / sum(m.numel() for m in old.values()),
    )


# ----------------------------------------------------------------------------- reply screening, resume


def test_validate_reply_accepts_real_replies_and_rejects_bad_ones() -> None:
    cfg = _cfg()
    grid = _grid(cfg)
    strategy = build_strategy(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    with seeded_sampling(3, 1):
        msgs = list(strategy.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid))
    replies = list(grid.send_and_receive(msgs))
    assert [strategy.validate_reply(1, r) for r in replies] == [None, None]

    base = {n: a.numpy() for n, a in arrays.items()}
    masks = {n: m.numpy() for n, m in strategy.masks.items()}
    dense_reply = _reply_to(msgs[0], base, {}, 10)  # nested masks expect a sparse uplink
    assert "outside the round's mask" in strategy.validate_reply(1, dense_reply)
    nan = {n: x.copy() for n, x in base.items()}
    nan["classifier.4.bias"][0] = np.nan
    assert "NaN" in strategy.validate_reply(1, _reply_to(msgs[0], nan, masks, 10))
    short = {n: x for n, x in base.items() if n != "classifier.4.bias"}
    assert "missing" in strategy.validate_reply(1, _reply_to(msgs[0], short, masks, 10))
    plain = train_reply(msgs[0], arrays, 10)
    assert "not a decodable" in strategy.validate_reply(1, plain)
    # with regrowth the dense uplink is the protocol in re-pruning rounds (R = 1 here: every round)
    regrow, _, rmsgs, rbase = _small_strategy(regrowth=True)
    assert regrow.validate_reply(1, _reply_to(rmsgs[0], rbase, {}, 10)) is None


def test_checkpoint_resume_gives_the_uninterrupted_result(tmp_path: Path) -> None:
    cfg = _cfg(rounds=4, **{"checkpoint-every": 2})
    whole = run_server(_grid(cfg), cfg, tmp_path / "whole", show_progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_server(_grid(cfg, crash_in_round=3), cfg, tmp_path / "cut", show_progress=False)
    resumed = run_server(_grid(cfg), cfg, tmp_path / "cut", show_progress=False, resume=True)
    a, b = whole.arrays.to_torch_state_dict(), resumed.arrays.to_torch_state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    cols = ["round", "sparsity", "lambda", "target_sparsity", "reconfigured", "bytes_down", "bytes_up"]
    pd.testing.assert_frame_equal(whole.rounds[cols], resumed.rounds[cols])
    assert resumed.summary["final_sparsity"] == pytest.approx(0.9, abs=1e-4)


# ----------------------------------------------------------------------------- the first mask


def test_dense_rounds_then_magnitude_erk_first_mask() -> None:
    """Round 1 trains dense; m_0 keeps, within each layer's ERK budget, the largest |w| of round 1's
    aggregate; that aggregate is masked by it and round 2 sends exactly those positions."""
    cfg = _cfg(**{"initial-mask": "magnitude-erk", "dense-rounds": 1, "reconfig-every": 4})
    grid = _grid(cfg)
    strategy = build_strategy(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    with seeded_sampling(3, 1):
        msgs = list(strategy.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid))
    kinds = codec.index_kinds(codec.from_array_record(msgs[0].content["arrays"]))
    assert set(kinds.values()) == {"dense"}  # nothing pruned in the dense round
    assert strategy.mask_sparsity() == 0.0

    replies = list(grid.send_and_receive(msgs))
    # the dense aggregate, recomputed here from the replies (weighted by num-examples)
    decoded = [codec.decode(codec.from_array_record(r.content["arrays"]))[0] for r in replies]
    weights = np.array([float(r.content["metrics"]["num-examples"]) for r in replies])
    names = list(msgs[0].content["config"]["feddip-prunable"])
    dense = {n: sum(w * d[n] for w, d in zip(weights / weights.sum(), decoded)) for n in names}
    new, _ = strategy.aggregate_train(1, replies)
    assert strategy.round_report(1)["reconfigured"] is True
    shapes = {n: tuple(dense[n].shape) for n in names}
    counts = erk_counts(shapes, 0.5)
    state = new.to_torch_state_dict()
    for n in names:
        kept = strategy.masks[n].numpy()
        assert int(kept.sum()) == counts[n]
        if 0 < counts[n] < kept.size:
            assert np.abs(dense[n][kept]).min() >= np.abs(dense[n][~kept]).max() - 1e-7
        assert bool((state[n].numpy()[~kept] == 0).all())
    with seeded_sampling(3, 2):
        msgs2 = list(strategy.configure_train(2, new, ConfigRecord({"server-round": 2}), grid))
    _, sent = decode_global(msgs2[0].content["arrays"], names)
    assert all(torch.equal(sent[n], strategy.masks[n]) for n in names)


def test_magnitude_erk_without_dense_rounds_masks_the_initial_weights() -> None:
    cfg = _cfg(**{"initial-mask": "magnitude-erk", "dense-rounds": 0})
    strategy = build_strategy(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    strategy.configure_train(1, arrays, ConfigRecord({"server-round": 1}), _grid(cfg))
    state = arrays.to_torch_state_dict()
    expected = magnitude_erk_masks({n: state[n] for n in strategy.prunable}, 0.5)
    assert all(torch.equal(strategy.masks[n], expected[n]) for n in strategy.prunable)


def test_dense_rounds_must_leave_a_pruned_round() -> None:
    with pytest.raises(ConfigError, match=r"dense-rounds = 6 .*allowed: 0 \.\. 5"):
        _cfg(**{"dense-rounds": 6})
    with pytest.raises(ConfigError, match="initial-mask"):
        _cfg(**{"initial-mask": "magnitude"})


def test_round_report_has_the_regulariser_gradient_share_per_layer() -> None:
    cfg = _cfg(**{"lambda-max": 0.3, "rounds": 4, "lambda-steps": 2})
    strategy = build_strategy(cfg)
    _drive(strategy, _grid(cfg), cfg, rounds=4)
    columns = [f"reg_grad_ratio:{n}" for n in strategy.prunable]
    first, last = strategy.round_report(1), strategy.round_report(4)
    assert first["lambda"] == 0 and all(first[c] == 0.0 for c in columns)
    assert last["lambda"] > 0 and all(0 < last[c] < math.inf for c in columns)


def test_persistent_regrowth_accumulates_pruned_changes_across_rounds_and_lets_them_back() -> None:
    """``regrowth = persistent``: the uplink is dense every round; what a pruned position gains in a
    round that does not re-prune is kept by the server (not sent back: the downlink stays masked)
    and added to what it gains later, until the next re-pruning can keep it; ``regrown`` counts it."""
    cfg = _cfg(rounds=4, **{"regrowth": "persistent", "reconfig-every": 2, "feddip-schedule-rounds": 100})
    strategy = build_strategy(cfg)
    grid = _grid(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    name = "classifier.0.weight"
    with seeded_sampling(3, 1):
        msgs = list(strategy.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid))
    assert msgs[0].content["config"]["feddip-sparse-uplink"] is False
    pruned_pos = tuple(np.argwhere(~strategy.masks[name].numpy())[0])
    initial = arrays[name].numpy()[pruned_pos]
    sent, _ = decode_global(msgs[0].content["arrays"], [name])
    base = {n: t.numpy() for n, t in sent.items()}
    reply = {n: x.copy() for n, x in base.items()}
    reply[name][pruned_pos] = 30.0  # the client's change from the 0 it received
    out, _ = strategy.aggregate_train(1, [_reply_to(msgs[0], reply, {}, 10)])
    assert strategy.round_report(1)["reconfigured"] is False
    assert float(out.to_torch_state_dict()[name][pruned_pos]) == 0.0  # still pruned in the model sent
    with seeded_sampling(3, 2):
        msgs2 = list(strategy.configure_train(2, out, ConfigRecord({"server-round": 2}), grid))
    assert msgs2[0].content["config"]["feddip-sparse-uplink"] is False
    sent2, _ = decode_global(msgs2[0].content["arrays"], [name])
    reply2 = {n: t.numpy().copy() for n, t in sent2.items()}
    reply2[name][pruned_pos] = 20.0
    out2, _ = strategy.aggregate_train(2, [_reply_to(msgs2[0], reply2, {}, 10)])
    assert bool(strategy.masks[name][pruned_pos])  # back in the mask, with both rounds' changes
    assert float(out2.to_torch_state_dict()[name][pruned_pos]) == pytest.approx(initial + 50.0)
    assert strategy.round_report(2)["regrown"] >= 1
    # and the persistent copy survives a checkpoint
    again = build_strategy(cfg)
    again.load_state_dict(strategy.state_dict())
    assert np.array_equal(again._dense[name], strategy._dense[name])


def test_zero_dimensional_tensors_stay_zero_dimensional() -> None:
    """BatchNorm's ``num_batches_tracked`` is 0-d; the model FedDIP returns and constrains must keep
    it 0-d (``np.ascontiguousarray`` would make it (1,), and every later reply would be refused)."""
    strategy = FedDIP(total_rounds=4, dense_rounds=0, initial_mask="random-erk", fraction_evaluate=0.0)
    state = {"w": np.ones((4, 4), np.float32), "bn.num_batches_tracked": np.array(7, dtype=np.int64)}
    arrays = ArrayRecord({k: Array(v) for k, v in state.items()})
    strategy._init_masks(arrays)
    masked = strategy._masked(state)
    assert masked["bn.num_batches_tracked"].shape == () and masked["w"].shape == (4, 4)
    constrained = strategy.constrain(arrays)
    assert constrained["bn.num_batches_tracked"].numpy().shape == ()
