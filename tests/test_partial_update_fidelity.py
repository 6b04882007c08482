"""Partial-update broadcast as the DPU paper runs it (issue 15, items 5–7), in process, no Ray.

RPU's subset chosen before training (clients change only it), DPU's second step (sparse
fine-tuning of the selected weights in a masked round), and the local term of ``combined``
estimated on the server at zero uplink bytes (the exact client metric as an option, 8-bit or
top-2k, with its bytes measured). The real client step runs on real MNIST data where the
assertion is about what a client changes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from clients.partial_update import train_with_local_contribution
from fedsparse import codec
from fedsparse.accounting import array_record_bytes
from fedsparse.config import ConfigError, resolve_config
from fedsparse.protocol.partial_update import (
    decode_contribution,
    encode_contribution,
    num_updated,
    random_layer_masks,
)
from strategies.partial_update import PartialUpdate
from tests.test_partial_update import LocalGrid, as_numpy, make_clients, record, tiny_model


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def _strategy(**kwargs: Any) -> PartialUpdate:
    base = FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)
    return PartialUpdate(base, **kwargs)


# ----------------------------------------------------------------------------------- masked training


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def _batches(n: int = 6) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        yield torch.randn(8, 12, generator=gen), torch.randint(0, 4, (8,), generator=gen)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.05),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.05),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05),
    ],
    ids=["sgd-momentum-wd", "adam-wd", "nesterov-wd"],
)
def test_masked_training_keeps_frozen_weights_bit_exact_under_momentum_and_weight_decay(make_opt: Any) -> None:
    """Weight decay and momentum move a weight whose gradient is zero; the mask must stop that."""
    net = _tiny_net()
    names = ["0.weight", "2.weight"]
    rng = np.random.default_rng(0)
    masks = {n: rng.random(tuple(dict(net.named_parameters())[n].shape)) < 0.2 for n in names}
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    _, contrib = train_with_local_contribution(net, _batches(), make_opt(net.parameters()), names, masks=masks)
    after = net.state_dict()
    for n in names:
        keep = torch.from_numpy(masks[n])
        assert torch.equal(after[n][~keep], before[n][~keep]), f"{n}: a frozen weight moved"
        assert (after[n][keep] != before[n][keep]).float().mean() > 0.9, f"{n}: the selected weights did not train"
        assert torch.all(contrib[n][~keep] == 0)  # no step, no local contribution
    assert not torch.equal(after["0.bias"], before["0.bias"])  # biases train freely (as the reference)
    # the same training without masks does move the "frozen" positions: the test can fail
    free = _tiny_net()
    train_with_local_contribution(free, _batches(), make_opt(free.parameters()), names)
    keep = torch.from_numpy(masks["0.weight"])
    assert not torch.equal(free.state_dict()["0.weight"][~keep], before["0.weight"][~keep])


def _mnist_cfg(**over: Any) -> Any:
    base = {
        "strategy": "partial-update",
        "dataset": "mnist",
        "model": "mlp",
        "num-clients": 20,
        "local-steps": 3,
        "seed": 3,
        "momentum": 0.9,
        "weight-decay": 1e-3,
    }
    return resolve_config({**base, **over})


def _real_round(strat: PartialUpdate, t: int, model: ArrayRecord, contexts: dict[int, Context], cfg: Any):
    from fedsparse.methods import train_step

    random.seed(t)
    msgs = list(strat.configure_train(t, model, ConfigRecord({"server-round": t}), LocalGrid(contexts)))
    step = train_step("partial-update")
    replies = [step(m, contexts[m.metadata.dst_node_id], cfg) for m in msgs]
    for r in replies:
        assert not r.has_error()
        assert strat.validate_reply(t, r) is None
    return msgs, replies


def _contexts(n: int) -> dict[int, Context]:
    return {
        40 + i: Context(run_id=1, node_id=40 + i, node_config={"partition-id": i}, state=RecordDict(), run_config={})
        for i in range(n)
    }


def _initial(cfg: Any) -> dict[str, np.ndarray]:
    from fedsparse.server import initial_model

    return {k: v.numpy() for k, v in initial_model(cfg).state_dict().items()}


# ----------------------------------------------------------------------------------- RPU (item 5)


def test_rpu_clients_change_only_the_chosen_positions() -> None:
    """RPU as the paper runs it: the random subset is fixed before training (a seed in the round's
    config), clients (SGD with momentum and weight decay) train only it and send only its values."""
    cfg = _mnist_cfg(**{"contribution": "random", "update-ratio": 0.01})
    init = _initial(cfg)
    strat = _strategy(update_ratio=0.01, contribution="random", seed=5)
    contexts = _contexts(2)
    msgs, replies = _real_round(strat, 1, record(init), contexts, cfg)
    config = msgs[0].content["config"]
    assert config["pu-train-mask"] == "seed" and strat.round_report(1)["phase"] == "rpu"
    shapes = {n: init[n].shape for n in strat.partial}
    masks = random_layer_masks(shapes, 0.01, int(config["pu-mask-seed"]))
    for n in strat.partial:  # the paper's per-layer ratio, and the server's own mask
        assert int(masks[n].sum()) == num_updated(0.01, init[n].size)
        np.testing.assert_array_equal(masks[n], strat._train_masks[n])  # type: ignore[index]
    dense = sum(array_record_bytes(record(init)).values())
    for reply in replies:
        sent = reply.content["arrays"]
        for n in strat.partial:
            vals = sent[n].numpy()
            assert vals.shape == (int(masks[n].sum()),)
            assert np.mean(vals != init[n][masks[n]]) > 0.9  # the chosen weights trained
        assert sum(array_record_bytes(sent).values()) < 0.05 * dense  # only the chosen values go up
    new, _ = strat.aggregate_train(1, replies)
    dep = as_numpy(new)  # type: ignore[arg-type]
    for n in strat.partial:
        changed = dep[n] != init[n]
        assert not np.any(changed & ~masks[n]), f"{n}: RPU changed a weight outside its subset"
        assert changed.sum() > 0.9 * masks[n].sum()
    assert strat.round_report(1)["updated_weights"] == sum(int(m.sum()) for m in masks.values())
    # the next round draws a new subset (and round 2's clients hold exactly version 1)
    msgs2, _ = _real_round(strat, 2, new, contexts, cfg)  # type: ignore[arg-type]
    assert msgs2[0].content["config"]["pu-mask-seed"] != config["pu-mask-seed"]


def test_rpu_after_training_keeps_the_former_behaviour_and_bad_combinations_are_refused() -> None:
    strat = _strategy(update_ratio=0.05, contribution="random", random_mask="after-training")
    clients = make_clients(3, tiny_model(2))
    random.seed(0)
    msgs = list(strat.configure_train(1, record(tiny_model(2)), ConfigRecord({"server-round": 1}), LocalGrid(clients)))
    assert msgs[0].content["config"]["pu-train-mask"] == "none"
    base = {"strategy": "partial-update", "dataset": "mnist", "model": "mlp", "contribution": "random"}
    for mode in ("finetune", "residual"):
        with pytest.raises(ConfigError, match=f"after-broadcast = '{mode}' does not apply to contribution = 'random'"):
            resolve_config(base, {"after-broadcast": mode})
    resolve_config(base, {"after-broadcast": "residual", "random-mask": "after-training"})
    with pytest.raises(ConfigError, match="random-mask"):
        resolve_config(base, {"random-mask": "during"})


# ----------------------------------------------------------------------------------- fine-tuning (item 6)


def test_finetuning_changes_only_the_selected_indices() -> None:
    """after-broadcast = finetune: round 1 trains in full and selects k·I weights (rewind); round 2
    fine-tunes exactly those on the clients and the server takes their mean at the same indices;
    round 3 trains in full again."""
    cfg = _mnist_cfg(**{"after-broadcast": "finetune", "finetune-steps": 2})
    init = _initial(cfg)
    strat = _strategy(update_ratio=0.01, contribution="global", after_broadcast="finetune", finetune_steps=2)
    contexts = _contexts(2)
    _, replies = _real_round(strat, 1, record(init), contexts, cfg)
    cand_rec, _ = strat.aggregate_train(1, replies)
    cand = as_numpy(cand_rec)  # type: ignore[arg-type]
    selected = {n: cand[n] != init[n] for n in strat.partial}
    assert sum(int(s.sum()) for s in selected.values()) == num_updated(0.01, strat.partial_size)
    msgs, replies = _real_round(strat, 2, cand_rec, contexts, cfg)  # type: ignore[arg-type]
    config = msgs[0].content["config"]
    assert strat.round_report(2)["phase"] == "finetune"
    assert config["pu-train-mask"] == "part" and config["pu-train-steps"] == 2
    assert not config["pu-local-contribution"]
    for reply in replies:
        for n in strat.partial:
            assert reply.content["arrays"][n].numpy().shape == (int(selected[n].sum()),)
    new_rec, _ = strat.aggregate_train(2, replies)
    new = as_numpy(new_rec)  # type: ignore[arg-type]
    moved = 0
    for n in strat.partial:
        changed = new[n] != cand[n]
        assert not np.any(changed & ~selected[n]), f"{n}: fine-tuning changed an unselected weight"
        moved += int(changed.sum())
    assert moved > 0.9 * sum(int(s.sum()) for s in selected.values())
    assert strat.round_report(2)["updated_weights"] == sum(int(s.sum()) for s in selected.values())
    # the clients that fine-tuned got exactly the candidate (digest-checked) and round 3 trains in full
    msgs3, _ = _real_round(strat, 3, new_rec, contexts, cfg)  # type: ignore[arg-type]
    assert msgs3[0].content["config"]["pu-train-mask"] == "none" and strat.round_report(3)["phase"] == "train"


def test_a_pending_finetune_survives_a_checkpoint() -> None:
    initial = tiny_model(4)
    clients = make_clients(4, initial)
    strat = _strategy(update_ratio=0.05, contribution="global", after_broadcast="finetune")
    rng = np.random.default_rng(0)
    random.seed(0)
    msgs = list(strat.configure_train(1, record(initial), ConfigRecord({"server-round": 1}), LocalGrid(clients)))
    replies = []
    for m in msgs:
        c = clients[m.metadata.dst_node_id]
        arrays, v = c.patch(m)
        replies.append(c.reply(m, arrays, v, rng))
    new, _ = strat.aggregate_train(1, replies)
    other = _strategy(update_ratio=0.05, contribution="global", after_broadcast="finetune")
    other.load_state_dict(strat.state_dict())
    random.seed(1)
    msgs2 = list(other.configure_train(2, new, ConfigRecord({"server-round": 2}), LocalGrid(clients)))  # type: ignore[arg-type]
    assert msgs2[0].content["config"]["pu-train-mask"] == "part"


def test_finetune_steps_is_checked() -> None:
    base = {"strategy": "partial-update", "dataset": "mnist", "model": "mlp"}
    with pytest.raises(ConfigError, match="finetune-steps"):
        resolve_config(base, {"finetune-steps": -1})
    with pytest.raises(ConfigError, match="after-broadcast"):
        resolve_config(base, {"after-broadcast": "later"})
    with pytest.raises(ValueError, match="finetune_steps"):
        _strategy(finetune_steps=-2)


# ----------------------------------------------------------------------------------- local metric (item 7)


def test_the_default_combined_sends_no_extra_uplink_arrays() -> None:
    """combined (DPU) by default estimates the local term on the server: the reply is the model
    alone, so the uplink is FedAvg's (ratio 1.00, target ≤ 1.02)."""
    cfg = _mnist_cfg()
    assert cfg["contribution"] == "combined" and cfg["local-metric"] == "server"
    init = _initial(cfg)
    from fedsparse.methods import build_strategy

    strat = build_strategy(cfg)
    assert isinstance(strat, PartialUpdate)
    strat.base.fraction_train = 1.0
    strat.base.min_train_nodes = strat.base.min_available_nodes = 1  # two of the config's 20 clients here
    msgs, replies = _real_round(strat, 1, record(init), _contexts(2), cfg)
    assert not msgs[0].content["config"]["pu-local-contribution"]
    dense = sum(array_record_bytes(record(init)).values())
    for reply in replies:
        assert set(reply.content.array_records) == {"arrays"}
        assert sum(array_record_bytes(reply.content["arrays"]).values()) <= 1.02 * dense
    # a reply that does send a contribution now is off-protocol and rejected
    extra = Message(
        content=RecordDict(
            {
                "arrays": replies[0].content["arrays"],
                "metrics": replies[0].content["metrics"],
                "contribution": ArrayRecord({n: replies[0].content["arrays"][n] for n in strat.partial}),
            }
        ),
        reply_to=msgs[0],
    )
    assert "expected ArrayRecords ['arrays']" in str(strat.validate_reply(1, extra))


def test_the_server_estimate_is_the_weighted_sum_of_squared_client_updates() -> None:
    initial = tiny_model(6)
    clients = make_clients(4, initial)
    strat = _strategy(update_ratio=0.05, contribution="local", initial_sync="dense")
    rng = np.random.default_rng(6)
    random.seed(6)
    msgs = list(strat.configure_train(1, record(initial), ConfigRecord({"server-round": 1}), LocalGrid(clients)))
    replies = []
    for m in msgs:
        c = clients[m.metadata.dst_node_id]
        arrays, v = c.patch(m)
        replies.append(c.reply(m, arrays, v, rng))
    new, _ = strat.aggregate_train(1, replies)
    counts = np.array([r.content["metrics"]["num-examples"] for r in replies], dtype=np.float64)
    rho = counts / counts.sum()
    est = {
        n: sum(w * (r.content["arrays"][n].numpy().astype(np.float64) - initial[n]) ** 2 for w, r in zip(rho, replies))
        for n in strat.partial
    }
    flat = np.concatenate([est[n].reshape(-1) for n in strat.partial])
    k = num_updated(0.05, flat.size)
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    got = np.concatenate([(as_numpy(new)[n] != initial[n]).reshape(-1) for n in strat.partial])  # type: ignore[arg-type]
    np.testing.assert_array_equal(got, keep)


def test_the_exact_client_metric_costs_what_it_serialises() -> None:
    rng = np.random.default_rng(0)
    contrib = {
        "a": rng.standard_normal((300, 200)).astype(np.float32),
        "b": rng.standard_normal((50, 40)).astype(np.float32),
    }
    shapes = {n: c.shape for n, c in contrib.items()}
    total = sum(c.size for c in contrib.values())
    dense = sum(array_record_bytes(encode_contribution(contrib, "dense")).values())
    assert 4 * total <= dense <= 4 * total + 400  # float32 values + the arrays' npy headers
    q8 = encode_contribution(contrib, "8bit")
    assert sum(array_record_bytes(q8).values()) < 0.27 * dense  # 1 byte a value plus the codec header
    back = decode_contribution(q8, "8bit", shapes)
    for n in contrib:
        step = (contrib[n].max() - contrib[n].min()) / 255
        assert np.max(np.abs(back[n] - contrib[n])) <= step / 2 + 1e-6
    k2 = 2 * num_updated(0.01, total)
    top = encode_contribution(contrib, "top2k", k2)
    nbytes = sum(array_record_bytes(top).values())
    assert nbytes < 4 * k2 + codec.shannon_bound_bytes(total, k2) * 1.2 + 400
    back = decode_contribution(top, "top2k", shapes)
    flat = np.concatenate([contrib[n].reshape(-1) for n in contrib])
    kept = np.concatenate([(back[n] != 0).reshape(-1) for n in contrib])
    assert kept.sum() == k2 and np.all(flat[kept].min() >= np.delete(flat, np.flatnonzero(kept)).max())
    with pytest.raises(ValueError, match="expected the partial set"):
        decode_contribution(top, "top2k", {"a": (300, 200)})


@pytest.mark.parametrize("metric", ["client", "client-8bit", "client-top2k"])
def test_the_real_client_sends_the_exact_metric_when_asked(metric: str) -> None:
    cfg = _mnist_cfg(**{"local-metric": metric})
    init = _initial(cfg)
    strat = _strategy(update_ratio=0.01, contribution="combined", local_metric=metric)
    msgs, replies = _real_round(strat, 1, record(init), _contexts(1), cfg)
    config = msgs[0].content["config"]
    assert config["pu-local-contribution"] and config["pu-local-topk"] == 2 * num_updated(0.01, strat.partial_size)
    up = sum(array_record_bytes(replies[0].content["contribution"]).values())
    model = sum(array_record_bytes(replies[0].content["arrays"]).values())
    limit = {"client": 1.0, "client-8bit": 0.26, "client-top2k": 0.05}[metric]
    assert up <= limit * model
    new, _ = strat.aggregate_train(1, replies)
    assert strat.round_report(1)["updated_weights"] == num_updated(0.01, strat.partial_size)


def test_local_metric_is_checked() -> None:
    base = {"strategy": "partial-update", "dataset": "mnist", "model": "mlp"}
    with pytest.raises(ConfigError, match="local-metric"):
        resolve_config(base, {"local-metric": "exact"})
    with pytest.raises(ValueError, match="unknown local_metric 'exact'"):
        _strategy(local_metric="exact")
