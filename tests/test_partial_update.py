"""Partial-update broadcast (DPU in FL), in process: the strategy and the client's patch function
driven directly with real Flower messages (no Ray).

The clients here patch their copies with the real protocol (``clients.partial_update``) and reply
with "trained" models (the patched model plus seeded noise), so every assertion is about what the
server and the clients actually exchange.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from clients.partial_update import (
    PatchError,
    apply_part,
    load_held,
    masked_values,
    model_digest,
    patch_held_model,
    store_held,
    train_with_local_contribution,
    training_masks,
    unpack_parts,
)
from fedsparse import codec
from fedsparse.accounting import array_record_bytes
from fedsparse.config import ConfigError, resolve_config
from fedsparse.protocol.partial_update import encode_contribution
from strategies.partial_update import UNKNOWN, PartialUpdate, num_updated


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    """Messages can be built outside a running app once the task identity is set (flower-notes)."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


class LocalGrid(Grid):
    """The part of a Grid a strategy's configure_train uses: the connected node ids."""

    def __init__(self, nodes: Iterable[int], partition_of: dict[int, int] | None = None) -> None:
        self.nodes = list(nodes)
        if partition_of is not None:
            self.partition_of = partition_of

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def set_run(self, run_id: int) -> None:  # pragma: no cover - unused here
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError


def tiny_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "fc1.weight": (rng.standard_normal((24, 40)) * 0.1).astype(np.float32),
        "fc1.bias": np.zeros(24, np.float32),
        "conv.weight": (rng.standard_normal((4, 2, 3, 3)) * 0.1).astype(np.float32),
        "bn.num_batches_tracked": np.array(0, dtype=np.int64),
        "fc2.weight": (rng.standard_normal((10, 24)) * 0.1).astype(np.float32),
        "fc2.bias": np.zeros(10, np.float32),
    }


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def as_numpy(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in rec.items()}


def bit_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in a
    )


class Client:
    """A client holding its copy in a real Flower Context, patched with the real protocol."""

    def __init__(self, node: int, pid: int, initial: dict[str, np.ndarray]) -> None:
        self.node, self.pid, self.initial = node, pid, initial
        self.context = Context(
            run_id=1, node_id=node, node_config={"partition-id": pid}, state=RecordDict(), run_config={}
        )

    def patch(self, msg: Message) -> tuple[dict[str, np.ndarray], int]:
        held, version = load_held(self.context)
        arrays, target = patch_held_model(
            held, version, msg.content["config"], msg.content["arrays"], lambda: self.initial, who=f"client {self.pid}"
        )
        store_held(self.context, arrays, target)
        return arrays, target

    def reply(self, msg: Message, arrays: dict[str, np.ndarray], version: int, rng: np.random.Generator) -> Message:
        trained = {}
        for k, v in arrays.items():
            if v.dtype.kind == "f":
                trained[k] = (v + rng.standard_normal(v.shape).astype(np.float32) * 0.01).astype(np.float32)
            else:
                trained[k] = v + 3
        config = msg.content["config"]
        masks = training_masks(
            config, msg.content["arrays"], {k: v.shape for k, v in arrays.items() if v.ndim > 1 and v.dtype.kind == "f"}
        )
        if masks is not None:  # a masked round (RPU, fine-tuning): only the masked values go up
            trained = masked_values(trained, masks)
        content = RecordDict(
            {
                "arrays": record(trained),
                "metrics": MetricRecord(
                    {
                        "num-examples": int(rng.integers(5, 50)),
                        "train-loss": 1.0,
                        "partition-id": self.pid,
                        "pu-version": version,
                    }
                ),
            }
        )
        if config["pu-local-contribution"]:
            contrib = {
                k: np.abs(rng.standard_normal(v.shape)).astype(np.float32) for k, v in arrays.items() if v.ndim > 1
            }
            content["contribution"] = encode_contribution(
                contrib, str(config["pu-local-metric"]), int(config["pu-local-topk"])
            )
        return Message(content=content, reply_to=msg)


def error_reply(msg: Message) -> Message:
    return Message(Error(code=0, reason="client crashed"), reply_to=msg)


def run_rounds(
    strategy: PartialUpdate,
    clients: dict[int, Client],
    rounds: int,
    seed: int,
    *,
    fail_rate: float = 0.0,
    use_grid_partitions: bool = False,
    fraction: float | None = None,
) -> Iterator[tuple[int, list[Message], list[tuple[Client, dict[str, np.ndarray]]], ArrayRecord, ArrayRecord]]:
    """Drive ``rounds`` rounds; yield (round, messages, patched copies, deployed before, after)."""
    rng = np.random.default_rng(seed)
    grid = LocalGrid(clients, {n: c.pid for n, c in clients.items()} if use_grid_partitions else None)
    deployed = record(next(iter(clients.values())).initial)
    for t in range(1, rounds + 1):
        # a random participation pattern (or a fixed fraction)
        strategy.base.fraction_train = float(rng.uniform(0.1, 0.9)) if fraction is None else fraction
        random.seed(seed * 1000 + t)
        msgs = list(strategy.configure_train(t, deployed, ConfigRecord({"server-round": t}), grid))
        patched, replies = [], []
        for msg in msgs:
            client = clients[msg.metadata.dst_node_id]
            arrays, version = client.patch(msg)
            patched.append((client, arrays))
            if rng.random() < fail_rate:
                replies.append(error_reply(msg))
            else:
                replies.append(client.reply(msg, arrays, version, rng))
        before = deployed
        new, _ = strategy.aggregate_train(t, replies)
        assert new is not None
        deployed = new
        yield t, msgs, patched, before, deployed


def make_clients(n: int, initial: dict[str, np.ndarray]) -> dict[int, Client]:
    return {1000 + 17 * i: Client(1000 + 17 * i, i, initial) for i in range(n)}


def strategy(**kwargs: Any) -> PartialUpdate:
    base = FedAvg(fraction_train=0.5, min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0)
    return PartialUpdate(base, **kwargs)


# ----------------------------------------------------------------------------------- property test

PROPERTY_CASES = [
    dict(value_bits=32, after_broadcast="rewind", contribution="combined", initial_sync="seed"),
    dict(value_bits=32, after_broadcast="residual", contribution="global", initial_sync="dense"),
    dict(
        value_bits=16,
        after_broadcast="rewind",
        contribution="local",
        local_metric="client",
        initial_sync="seed",
        history_rounds=3,
    ),
    dict(
        value_bits=8,
        after_broadcast="residual",
        contribution="random",
        random_mask="after-training",
        initial_sync="seed",
        history_rounds=2,
    ),
    dict(value_bits=32, after_broadcast="rewind", contribution="random", initial_sync="seed"),
    dict(value_bits=8, after_broadcast="rewind", contribution="random", initial_sync="dense", history_rounds=2),
    dict(value_bits=32, after_broadcast="finetune", contribution="combined", initial_sync="seed"),
    dict(value_bits=8, after_broadcast="finetune", contribution="global", initial_sync="seed", history_rounds=3),
    dict(value_bits=32, after_broadcast="rewind", contribution="combined", local_metric="client-top2k"),
    dict(value_bits=32, after_broadcast="residual", contribution="local", local_metric="client-8bit"),
    dict(value_bits=8, after_broadcast="rewind", contribution="combined", initial_sync="dense", history_rounds=0),
    dict(value_bits=16, after_broadcast="residual", contribution="combined", initial_sync="seed", history_rounds=2),
]


@pytest.mark.parametrize("case", PROPERTY_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("seed", [0, 1])
def test_every_patched_copy_equals_the_deployed_model_bit_for_bit(case: dict[str, Any], seed: int) -> None:
    initial = tiny_model(seed)
    clients = make_clients(12, initial)
    strat = strategy(update_ratio=0.05, seed=seed, **case)
    kinds_seen: set[str] = set()
    patched_total = advanced = 0
    version = ft_count = 0
    for t, _msgs, patched, before, after in run_rounds(strat, clients, 40, seed, fail_rate=0.1):
        want = as_numpy(before)
        for client, arrays in patched:
            assert bit_equal(arrays, want), f"round {t}: client {client.pid}'s copy differs from the deployed model"
            patched_total += 1
        report = strat.round_report(t)
        kinds_seen.update(item.split(":")[0] for item in report["patch_kinds"].split(";"))
        # exactly k·I weights of the partial set change per aggregated round (none if every reply failed);
        # RPU: k of every tensor; a fine-tuning round: the weights the round before it changed
        if report["deployed_version"] > version:
            if report["phase"] == "rpu":
                want_k = sum(num_updated(0.05, strat.w_dep[n].size) for n in strat.partial)  # type: ignore[index]
            elif report["phase"] == "finetune":
                want_k = ft_count
            else:
                want_k = num_updated(0.05, strat.partial_size)
            assert report["updated_weights"] == want_k
            ft_count = sum(int((strat.last_changed[n] == strat.version).sum()) for n in strat.partial)
            advanced += 1
        else:
            assert report["updated_weights"] == 0 and bit_equal(as_numpy(after), want)
        version = report["deployed_version"]
    assert patched_total > 100 and advanced > 30
    # the random participation pattern exercised fresh patches, catch-ups and dense resyncs
    assert {"fresh", "dense"} <= kinds_seen
    assert kinds_seen & {"merged", "sequence"}


def test_clients_identified_by_grid_partitions_or_reply_metrics_agree() -> None:
    """With the grid's partition map or only the replies' partition-id, the same bytes go down."""
    reports = []
    for use_grid in (True, False):
        initial = tiny_model(3)
        strat = strategy(update_ratio=0.1, contribution="global", initial_sync="dense")
        for _ in run_rounds(strat, make_clients(8, initial), 12, 3, use_grid_partitions=use_grid):
            pass
        assert all(key.startswith("p:") for key in strat.client_versions)
        reports.append([strat.round_report(t)["patch_bytes_down"] for t in range(1, 13)])
    assert reports[0][1:] == reports[1][1:]


def test_failed_clients_are_resynchronised_densely() -> None:
    initial = tiny_model(5)
    clients = make_clients(6, initial)
    strat = strategy(update_ratio=0.1, contribution="global", initial_sync="seed")
    strat.base.fraction_train = 1.0
    random.seed(0)
    grid = LocalGrid(clients)
    msgs = list(strat.configure_train(1, record(initial), ConfigRecord({"server-round": 1}), grid))
    replies = []
    rng = np.random.default_rng(0)
    for i, msg in enumerate(msgs):
        c = clients[msg.metadata.dst_node_id]
        arrays, v = c.patch(msg)
        replies.append(error_reply(msg) if i == 0 else c.reply(msg, arrays, v, rng))
    strat.aggregate_train(1, replies)
    failed = clients[msgs[0].metadata.dst_node_id]
    assert strat.client_versions[f"n:{failed.node}"] == UNKNOWN
    msgs = list(strat.configure_train(2, record(initial), ConfigRecord({"server-round": 2}), grid))
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    cfg = by_node[failed.node].content["config"]
    assert cfg["pu-base-version"] == -1 and cfg["pu-parts"] == ["assign"]
    failed.patch(by_node[failed.node])  # the dense patch replaces whatever it held


# ----------------------------------------------------------------------------------- the version check


def _two_round_setup() -> tuple[PartialUpdate, dict[int, Client], list[Message]]:
    initial = tiny_model(7)
    clients = make_clients(4, initial)
    strat = strategy(update_ratio=0.1, contribution="global", initial_sync="dense")
    for _ in run_rounds(strat, clients, 1, 7, fraction=1.0):
        pass
    random.seed(1)
    msgs = list(strat.configure_train(2, ArrayRecord(), ConfigRecord({"server-round": 2}), LocalGrid(clients)))
    return strat, clients, msgs


def test_a_mismatched_version_is_refused_with_a_clear_error() -> None:
    strat, clients, msgs = _two_round_setup()
    msg = msgs[0]
    client = clients[msg.metadata.dst_node_id]
    held, version = load_held(client.context)
    assert msg.content["config"]["pu-base-version"] == version == 0  # patched to version 0 in round 1
    # the client holds a different version than the patch starts from
    store_held(client.context, held, version + 5)
    with pytest.raises(PatchError, match=r"holds version 5 .* starts from version 0; refusing"):
        client.patch(msg)
    # ... or no copy at all
    client.context.state = RecordDict()
    with pytest.raises(PatchError, match="holds no copy"):
        client.patch(msg)


def test_a_corrupted_copy_fails_the_digest_check() -> None:
    strat, clients, msgs = _two_round_setup()
    msg = msgs[0]
    client = clients[msg.metadata.dst_node_id]
    held, version = load_held(client.context)
    w = held["fc1.weight"].copy()
    w[w == held["fc1.weight"]] = np.nextafter(w, np.float32(1))[w == held["fc1.weight"]]  # one ulp off
    held["fc1.weight"] = w
    store_held(client.context, held, version)
    with pytest.raises(PatchError, match="differs from the server's deployed model"):
        client.patch(msg)


def test_seed_rebuild_must_reproduce_the_initial_model() -> None:
    initial = tiny_model(8)
    strat = strategy(initial_sync="seed")
    strat.base.fraction_train = 1.0
    random.seed(0)
    msgs = list(strat.configure_train(1, record(initial), ConfigRecord({"server-round": 1}), LocalGrid([5])))
    other = tiny_model(9)
    with pytest.raises(PatchError, match="rebuilt from the seed .* differs"):
        patch_held_model(None, -1, msgs[0].content["config"], msgs[0].content["arrays"], lambda: other)
    arrays, v = patch_held_model(None, -1, msgs[0].content["config"], msgs[0].content["arrays"], lambda: initial)
    assert v == 0 and bit_equal(arrays, initial)
    # first contact from a seed costs no model bytes at all
    assert sum(array_record_bytes(msgs[0].content["arrays"]).values()) == 0


# ----------------------------------------------------------------------------------- top-k and scores


def _one_round(contribution: str, ratio: float, seed: int = 11, **kw: Any):
    initial = tiny_model(seed)
    clients = make_clients(5, initial)
    strat = strategy(update_ratio=ratio, contribution=contribution, initial_sync="dense", seed=seed, **kw)
    strat.base.fraction_train = 1.0
    random.seed(seed)
    msgs = list(strat.configure_train(1, record(initial), ConfigRecord({"server-round": 1}), LocalGrid(clients)))
    rng = np.random.default_rng(seed)
    replies = []
    for msg in msgs:
        c = clients[msg.metadata.dst_node_id]
        arrays, v = c.patch(msg)
        replies.append(c.reply(msg, arrays, v, rng))
    new, _ = strat.aggregate_train(1, replies)
    return strat, initial, replies, as_numpy(new)


def _fedavg(replies: list[Message]) -> dict[str, np.ndarray]:
    """FedAvg written out independently (Python-float weights, float32 accumulation, as Flower)."""
    counts = [int(r.content["metrics"]["num-examples"]) for r in replies]
    weights = [c / sum(counts) for c in counts]
    out: dict[str, np.ndarray] = {}
    for w, r in zip(weights, replies):
        for k, a in r.content["arrays"].items():
            out[k] = out[k] + a.numpy() * w if k in out else a.numpy() * w
    return out


def _expected_mask(scores: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    names = list(scores)
    flat = np.concatenate([scores[n].reshape(-1) for n in names])
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    out, off = {}, 0
    for n in names:
        out[n] = keep[off : off + scores[n].size].reshape(scores[n].shape)
        off += scores[n].size
    return out


@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.3])
def test_global_topk_is_exact(ratio: float) -> None:
    strat, initial, replies, new = _one_round("global", ratio)
    avg = _fedavg(replies)
    partial = ["fc1.weight", "conv.weight", "fc2.weight"]
    assert strat.partial == partial
    delta = {n: avg[n].astype(np.float32) - initial[n] for n in partial}
    k = num_updated(ratio, sum(initial[n].size for n in partial))
    want = _expected_mask({n: delta[n].astype(np.float64) ** 2 for n in partial}, k)
    for n in partial:
        changed = new[n] != initial[n]
        np.testing.assert_array_equal(changed, want[n])
        # the selected weights take FedAvg's values exactly (float32, rewind)
        np.testing.assert_array_equal(new[n][changed], avg[n].astype(np.float32)[changed])
    # small tensors are always updated dense
    np.testing.assert_array_equal(new["fc1.bias"], avg["fc1.bias"].astype(np.float32))
    assert new["bn.num_batches_tracked"] == np.rint(avg["bn.num_batches_tracked"])


def test_combined_score_mixes_normalised_global_and_local() -> None:
    strat, initial, replies, new = _one_round("combined", 0.05, contribution_lambda=0.3, local_metric="client")
    avg = _fedavg(replies)
    partial = strat.partial
    weights = np.array([r.content["metrics"]["num-examples"] for r in replies], dtype=np.float64)
    weights /= weights.sum()
    c_l = {
        n: sum(w * r.content["contribution"][n].numpy().astype(np.float64) for w, r in zip(weights, replies))
        for n in partial
    }
    c_g = {n: (avg[n].astype(np.float32) - initial[n]).astype(np.float64) ** 2 for n in partial}
    gs, ls = sum(v.sum() for v in c_g.values()), sum(v.sum() for v in c_l.values())
    scores = {n: 0.3 * c_g[n] / gs + 0.7 * c_l[n] / ls for n in partial}
    want = _expected_mask(scores, num_updated(0.05, strat.partial_size))
    for n in partial:
        np.testing.assert_array_equal(new[n] != initial[n], want[n])
    # and it is not simply the global ranking
    gwant = _expected_mask(c_g, num_updated(0.05, strat.partial_size))
    assert any((gwant[n] != want[n]).any() for n in partial)


def test_random_mask_is_uniform_reproducible_and_checkpointable() -> None:
    a, initial, _, new_a = _one_round("random", 0.1, seed=4)
    b, _, _, new_b = _one_round("random", 0.1, seed=4)
    assert bit_equal(new_a, new_b)
    count = sum(int((new_a[n] != initial[n]).sum()) for n in a.partial)
    assert count == num_updated(0.1, a.partial_size)
    # the RNG state travels with state_dict: a restored strategy draws the same next mask
    c = strategy(update_ratio=0.1, contribution="random", initial_sync="dense", seed=99)
    c.load_state_dict(a.state_dict())
    delta = {n: np.ones_like(initial[n]) for n in a.partial}
    ma = a._scores(delta, [])
    mc = c._scores(delta, [])
    assert all(torch.equal(ma[n], mc[n]) for n in a.partial)


def test_state_dict_round_trip_continues_identically() -> None:
    initial = tiny_model(2)
    s1 = strategy(update_ratio=0.05, contribution="combined", value_bits=8, initial_sync="seed", history_rounds=3)
    clients = make_clients(6, initial)
    for _ in run_rounds(s1, clients, 5, 2):
        pass
    s2 = strategy(update_ratio=0.05, contribution="combined", value_bits=8, initial_sync="seed", history_rounds=3)
    s2.load_state_dict(s1.state_dict())
    assert bit_equal(s1.w_dep, s2.w_dep) and s1.client_versions == s2.client_versions
    s1.base.fraction_train = s2.base.fraction_train = 0.7
    random.seed(5)
    grid = LocalGrid(clients)
    m1 = list(s1.configure_train(6, ArrayRecord(), ConfigRecord({"server-round": 6}), grid))
    random.seed(5)
    m2 = list(s2.configure_train(6, ArrayRecord(), ConfigRecord({"server-round": 6}), grid))
    assert [m.metadata.dst_node_id for m in m1] == [m.metadata.dst_node_id for m in m2]
    for x, y in zip(m1, m2):
        assert bit_equal(as_numpy(x.content["arrays"]), as_numpy(y.content["arrays"]))
        assert dict(x.content["config"].items()) == dict(y.content["config"].items())


# ----------------------------------------------------------------------------------- encoding


def test_index_encoding_and_patch_are_the_smaller_measured_choice() -> None:
    initial = tiny_model(6)
    clients = make_clients(10, initial)
    strat = strategy(update_ratio=0.02, contribution="global", initial_sync="seed")
    checked_kinds: set[str] = set()
    for _t, msgs, _, _, _ in run_rounds(strat, clients, 25, 6):
        for msg in msgs:
            cfg = msg.content["config"]
            parts = unpack_parts(msg.content["arrays"], len(cfg.get("pu-parts", [])))
            for payload in parts:
                tensors, masks = codec.decode(payload)
                has_rice = "rice" in codec.parse_header(payload[codec.INDEX_KEY])[0]
                for name, info in codec.tensor_nbytes(payload).items():
                    if info["kind"] in codec.INDEX_KINDS:
                        positions = np.flatnonzero(masks[name])
                        n = masks[name].size
                        sizes = {"bitmap": (n + 7) // 8, "coords": codec.coords_encode(positions).size}
                        b, golomb = codec.golomb_choose(positions, n)
                        # golomb's bytes include its entry in the header's rice list
                        cost = {**sizes, "golomb": golomb + len(f"{b},")}
                        best = min(codec.INDEX_KINDS, key=lambda kind: cost[kind])  # ties: earlier
                        if best == "golomb" and not has_rice:  # the list did not pay for itself
                            best = min(sizes, key=lambda kind: sizes[kind])
                        assert info["kind"] == best
                        assert info["index_bytes"] == {**sizes, "golomb": golomb}[best]
                        checked_kinds.add(info["kind"])
    assert "golomb" in checked_kinds and len(checked_kinds) >= 2
    # a client that is far behind gets the dense model only when the merged change is larger
    far = strat._patch_for(0)
    dense = strat._dense_patch()
    merged = strat._finish("merged", 0, False, ["assign"], [strat._merged_payload(0)])
    assert far.nbytes == min(dense.nbytes, merged.nbytes)
    assert far.kind == ("dense" if dense.nbytes < merged.nbytes else "merged")
    fresh = strat._patch_for(strat.version - 1)
    assert fresh.kind == "fresh" and fresh.nbytes < dense.nbytes / 5


@pytest.mark.parametrize("bits", [16, 8])
def test_quantised_changes_decode_within_their_step_and_biases_stay_exact(bits: int) -> None:
    strat, initial, replies, new = _one_round("global", 0.2, value_bits=bits)
    avg = _fedavg(replies)
    payload = strat.history[-1][1]
    kinds = codec.index_kinds(payload)
    assert kinds["fc1.bias"] == "raw" and kinds["fc2.bias"] == "raw"  # float32, not quantised
    np.testing.assert_array_equal(new["fc1.bias"], avg["fc1.bias"].astype(np.float32))
    for n in strat.partial:
        changed = new[n] != initial[n]
        mask = codec.decode(payload)[1][n]
        delta = avg[n].astype(np.float32) - initial[n]
        sent = delta[mask]
        got = (new[n] - initial[n])[mask].astype(np.float64)
        if bits == 8:
            step = (sent.max() - sent.min()) / 255
            tol = step / 2 + 2 * np.abs(new[n][mask]).max() * np.finfo(np.float32).eps
        else:
            tol = np.abs(sent) * 2.0**-11 + 2 * np.abs(new[n][mask]).max() * np.finfo(np.float32).eps + 6e-8
        assert np.all(np.abs(got - sent) <= tol)
        assert not changed[~mask].any()
    # the stored (quantised) patch is much smaller than the float32 one would be
    f32 = strat._finish("merged", 0, False, ["assign"], [strat._merged_payload(0)])
    assert sum(a.nbytes for a in payload.values()) < f32.nbytes


def test_apply_part_semantics() -> None:
    base = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
    mask = np.array([[True, False, False], [False, False, True]])
    change = {"w": np.full((2, 3), 0.5, np.float32), "b": np.array([7, 8], np.float32)}
    add = apply_part(base, codec.encode(change, {"w": mask, "b": None}, 32, raw_dense=True), "add")
    np.testing.assert_array_equal(add["w"], base["w"] + 0.5 * mask)
    np.testing.assert_array_equal(add["b"], [7, 8])
    assign = apply_part(base, codec.encode(change, {"w": mask}, 32), "assign")
    np.testing.assert_array_equal(assign["w"], np.where(mask, 0.5, base["w"]))
    np.testing.assert_array_equal(base["w"], np.arange(6, dtype=np.float32).reshape(2, 3))  # not modified
    with pytest.raises(PatchError, match="semantics"):
        apply_part(base, codec.encode(change, {}, 32), "xor")
    assert model_digest(base) == model_digest(dict(reversed(list(base.items()))))
    assert model_digest(base) != model_digest(assign)


# ----------------------------------------------------------------------------------- the client's local contribution


def test_local_contribution_is_minus_sum_of_gradient_times_step() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    x = torch.randn(12, 5)
    y = torch.randint(0, 3, (12,))
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    ref = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats, contrib = train_with_local_contribution(model, iter(batches), opt, ["0.weight", "2.weight"])
    assert stats["num-steps"] == 2 and set(contrib) == {"0.weight", "2.weight"}
    # by hand: plain SGD, Δw = −lr·g, so c = lr·Σ g²
    want = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for xb, yb in batches:
        ref.zero_grad()
        torch.nn.functional.cross_entropy(ref(xb), yb).backward()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                want[n] += 0.1 * p.grad**2
                p -= 0.1 * p.grad
    for n in contrib:
        torch.testing.assert_close(contrib[n], want[n], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(model.state_dict()["0.weight"], ref.state_dict()["0.weight"])


def test_the_real_client_step_patches_trains_and_reports(tmp_path: Any) -> None:
    """The registered ClientApp step on real MNIST data, a real MLP and real Flower records."""
    from fedsparse.methods import train_step
    from fedsparse.server import initial_model

    cfg = resolve_config(
        {
            "strategy": "partial-update",
            "dataset": "mnist",
            "model": "mlp",
            "num-clients": 20,
            "local-steps": 3,
            "seed": 3,
        }
    )
    init = {k: v.numpy() for k, v in initial_model(cfg).state_dict().items()}
    strat = strategy(update_ratio=0.01, contribution="combined", initial_sync="seed", local_metric="client")
    strat.base.fraction_train = 1.0
    random.seed(0)
    msgs = list(strat.configure_train(1, record(init), ConfigRecord({"server-round": 1}), LocalGrid([42])))
    context = Context(run_id=1, node_id=42, node_config={"partition-id": 2}, state=RecordDict(), run_config={})
    step = train_step("partial-update")
    out = step(msgs[0], context, cfg)
    assert not out.has_error()
    metrics = out.content["metrics"]
    assert metrics["partition-id"] == 2 and metrics["pu-version"] == 0
    contrib = out.content["contribution"]
    assert set(contrib.keys()) == set(strat.partial)
    assert all(float(np.abs(a.numpy()).sum()) > 0 for a in contrib.values())
    held, version = load_held(context)
    assert version == 0 and bit_equal(held, init)
    new, _ = strat.aggregate_train(1, [out])
    assert strat.round_report(1)["updated_weights"] == num_updated(0.01, strat.partial_size)
    # round 2: the client receives only the sparse change, and ends up holding the deployed model
    msgs = list(strat.configure_train(2, new, ConfigRecord({"server-round": 2}), LocalGrid([42])))
    assert msgs[0].content["config"]["pu-base-version"] == 0
    sent = sum(array_record_bytes(msgs[0].content["arrays"]).values())
    dense = sum(array_record_bytes(record(init)).values())
    assert sent < 0.05 * dense
    step(msgs[0], context, cfg)
    held, version = load_held(context)
    assert version == 1 and bit_equal(held, as_numpy(new))


# ----------------------------------------------------------------------------------- configuration


def test_configuration_errors_name_the_value() -> None:
    base = {"strategy": "partial-update", "dataset": "mnist", "model": "mlp"}
    with pytest.raises(ConfigError, match="value-bits = 12 .* 32, 16, 8"):
        resolve_config(base, {"value-bits": 12})
    with pytest.raises(ConfigError, match="update-ratio = 0.0 is out of range"):
        resolve_config(base, {"update-ratio": 0.0})
    with pytest.raises(ConfigError, match="unknown contribution 'dpu'"):
        resolve_config(base, {"contribution": "dpu"})
    with pytest.raises(ValueError, match="unknown after_broadcast"):
        PartialUpdate(after_broadcast="later")
    from fedsparse.methods import build_strategy

    s = build_strategy(resolve_config(base, {"update-ratio": 0.01, "value-bits": 8, "partial-base": "fedprox"}))
    assert isinstance(s, PartialUpdate) and s.value_bits == 8 and s.update_ratio == 0.01
    assert type(s.base).__name__ == "FedProx"


def test_num_updated_rounds_half_up() -> None:
    assert num_updated(0.05, 100) == 5
    assert num_updated(0.005, 100) == 1  # 0.5 rounds up
    assert num_updated(1e-9, 100) == 1  # k > 0 changes at least one weight
    assert num_updated(1.0, 100) == 100
    assert math.isclose(num_updated(0.01, 669_706), 6697)


def _configured_round(contribution: str, seed: int = 11, **kw: Any):
    """Round 1 configured and the clients' replies built, not yet aggregated (the screen's moment)."""
    initial = tiny_model(seed)
    clients = make_clients(5, initial)
    strat = strategy(update_ratio=0.05, contribution=contribution, initial_sync="dense", seed=seed, **kw)
    strat.base.fraction_train = 1.0
    random.seed(seed)
    msgs = list(strat.configure_train(1, record(initial), ConfigRecord({"server-round": 1}), LocalGrid(clients)))
    rng = np.random.default_rng(seed)
    replies = []
    for msg in msgs:
        c = clients[msg.metadata.dst_node_id]
        arrays, v = c.patch(msg)
        replies.append(c.reply(msg, arrays, v, rng))
    return strat, clients, msgs, replies


def test_validate_reply_accepts_the_protocol_and_names_what_is_wrong() -> None:
    strat, _, _, replies = _configured_round("combined", local_metric="client")
    assert all(strat.validate_reply(1, r) is None for r in replies)
    good = replies[0]
    bad_shape = RecordDict(
        {
            "arrays": record({**as_numpy(good.content["arrays"]), "fc1.bias": np.zeros(3, np.float32)}),
            "metrics": good.content["metrics"],
            "contribution": good.content["contribution"],
        }
    )
    assert "fc1.bias" in strat.validate_reply(1, Message(content=bad_shape, reply_to=_instruction()))
    contrib = as_numpy(good.content["contribution"])
    contrib["fc2.weight"] = contrib["fc2.weight"].copy()
    contrib["fc2.weight"][0, 0] = np.nan
    nan = RecordDict(
        {"arrays": good.content["arrays"], "metrics": good.content["metrics"], "contribution": record(contrib)}
    )
    assert "contribution 'fc2.weight' contains NaN" in strat.validate_reply(
        1, Message(content=nan, reply_to=_instruction())
    )
    missing = RecordDict({"arrays": good.content["arrays"], "metrics": good.content["metrics"]})
    assert "expected ArrayRecords" in strat.validate_reply(1, Message(content=missing, reply_to=_instruction()))
    # a well-formed reply from a node that was not sent this round's version
    stranger = RecordDict({k: good.content[k] for k in ("arrays", "metrics", "contribution")})
    assert "was not sent version 0" in strat.validate_reply(1, Message(content=stranger, reply_to=_instruction()))


def _claiming(reply: Message, instruction: Message, version: int) -> Message:
    """The same reply (model, metrics, contribution) claiming it trained from ``version``."""
    content = RecordDict(
        {
            "arrays": reply.content["arrays"],
            "metrics": MetricRecord({**dict(reply.content["metrics"].items()), "pu-version": version}),
        }
    )
    if "contribution" in reply.content:
        content["contribution"] = reply.content["contribution"]
    return Message(content=content, reply_to=instruction)


def _round_two(seed: int = 13):
    """Round 1 aggregated with every client; round 2 configured, the clients' replies built."""
    initial = tiny_model(seed)
    clients = make_clients(4, initial)
    strat = strategy(update_ratio=0.1, contribution="global", initial_sync="dense", seed=seed)
    for _ in run_rounds(strat, clients, 1, seed, fraction=1.0):
        pass
    assert strat.version == 1
    random.seed(seed)
    msgs = list(strat.configure_train(2, ArrayRecord(), ConfigRecord({"server-round": 2}), LocalGrid(clients)))
    rng = np.random.default_rng(seed)
    replies = []
    for msg in msgs:
        c = clients[msg.metadata.dst_node_id]
        arrays, v = c.patch(msg)
        replies.append(c.reply(msg, arrays, v, rng))
    return strat, clients, msgs, replies


def test_a_stale_reply_is_rejected_by_the_screen_with_its_reason() -> None:
    from fedsparse.server import _aggregate
    from fedsparse.validation import ReplyScreen, spec_of

    strat, clients, msgs, replies = _round_two()
    screen = ReplyScreen(strat, spec_of(strat.w_dep))
    # the first client claims it trained from version 0 (the deployed one is 1)
    screened = screen.screen(2, [_claiming(replies[0], msgs[0], 0), *replies[1:]])
    assert len(screened.valid) == len(replies) - 1 and len(screened.rejected) == 1
    reason = screened.rejected[0][1]
    assert "trained from version 0" in reason and "current version 1 (stale)" in reason
    arrays, aggregated = _aggregate(strat, 2, screened, 1, ArrayRecord())
    assert aggregated and strat.version == 2
    assert strat.round_report(2)["updated_weights"] == num_updated(0.1, strat.partial_size)
    # the stale client is resynchronised densely; the others hold version 1 (they get the fresh patch)
    assert strat.client_versions[f"p:{clients[msgs[0].metadata.dst_node_id].pid}"] == UNKNOWN
    assert all(strat.client_versions[f"p:{clients[m.metadata.dst_node_id].pid}"] == 1 for m in msgs[1:])


def test_a_round_whose_only_replies_are_stale_keeps_the_model() -> None:
    from fedsparse.server import _aggregate
    from fedsparse.validation import ReplyScreen, spec_of

    strat, clients, msgs, replies = _round_two()
    deployed = {k: v.copy() for k, v in strat.w_dep.items()}
    screened = ReplyScreen(strat, spec_of(deployed)).screen(2, [_claiming(r, m, 0) for r, m in zip(replies, msgs)])
    assert screened.valid == [] and len(screened.rejected) == len(msgs)
    arrays, aggregated = _aggregate(strat, 2, screened, 1, record(deployed))
    assert not aggregated and strat.version == 1
    assert bit_equal(as_numpy(arrays), deployed) and bit_equal(strat.w_dep, deployed)
    report = strat.round_report(2)
    assert report["updated_weights"] == 0 and report["deployed_version"] == 1
    # every client of the round is resynchronised densely next time
    assert all(strat.client_versions[f"p:{clients[m.metadata.dst_node_id].pid}"] == UNKNOWN for m in msgs)
    # Flower's own loop has no screen: aggregate_train itself drops them and keeps the model
    strat2, _, msgs2, replies2 = _round_two()
    new, metrics = strat2.aggregate_train(2, [_claiming(r, m, 0) for r, m in zip(replies2, msgs2)])
    assert metrics is None and strat2.version == 1 and bit_equal(as_numpy(new), deployed)


def _instruction() -> Message:
    return Message(content=RecordDict(), dst_node_id=7, message_type="train")


class RoutingGrid(LocalGrid):
    """An in-process Grid for Flower's own ``Strategy.start`` loop: each message goes to its
    client's real patch function; the client replies with its patched model plus noise."""

    def __init__(self, clients: dict[int, Client], seed: int) -> None:
        super().__init__(clients)
        self.clients = clients
        self.rng = np.random.default_rng(seed)
        self.patched: list[tuple[int, dict[str, np.ndarray], int]] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            client = self.clients[msg.metadata.dst_node_id]
            arrays, version = client.patch(msg)
            self.patched.append((client.pid, arrays, version))
            replies.append(client.reply(msg, arrays, version, self.rng))
        return replies


def test_runs_in_flowers_own_strategy_start_loop() -> None:
    """Plain ``Strategy.start`` (no fedsparse loop, no partition map): clients are learned from
    their replies, and what ``start`` evaluates is what the clients hold."""
    initial = tiny_model(12)
    clients = make_clients(8, initial)
    grid = RoutingGrid(clients, 12)
    strat = strategy(update_ratio=0.1, contribution="combined", initial_sync="dense")
    deployed: dict[int, dict[str, np.ndarray]] = {0: initial}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        deployed[server_round] = as_numpy(arrays)
        return MetricRecord({"round": server_round})

    random.seed(12)
    result = strat.start(grid, record(initial), num_rounds=6, evaluate_fn=evaluate_fn)
    assert bit_equal(as_numpy(result.arrays), deployed[6])
    assert len(grid.patched) == 6 * 4  # fraction 0.5 of 8 clients per round
    for _pid, arrays, version in grid.patched:
        assert bit_equal(arrays, deployed[version])
    assert set(strat.client_versions) == {
        f"p:{c.pid}" for c in clients.values() if any(p == c.pid for p, _, _ in grid.patched)
    }
    assert strat.version == 6


# ----------------------------------------------------------------------------------- review fixes


def test_the_constructor_and_the_config_key_default_to_the_seed_rebuild() -> None:
    cfg = resolve_config({"strategy": "partial-update", "dataset": "mnist", "model": "mlp"})
    assert cfg["initial-sync"] == "seed" == PartialUpdate().initial_sync


def _replies_from(strat: PartialUpdate, clients: dict[int, Client], t: int, rng: np.random.Generator):
    msgs = list(strat.configure_train(t, ArrayRecord(), ConfigRecord({"server-round": t}), LocalGrid(clients)))
    replies = []
    for msg in msgs:
        c = clients[msg.metadata.dst_node_id]
        arrays, v = c.patch(msg)
        replies.append(c.reply(msg, arrays, v, rng))
    return replies


def test_residual_keeps_the_local_contribution_pending_like_the_residual() -> None:
    """Residual + combined: δ = pending residual + this round's change, so c_l is this round's c_l
    plus the pending c_l of the weights not sent yet; what was sent starts afresh."""
    initial = tiny_model(21)
    clients = make_clients(5, initial)
    strat = strategy(
        update_ratio=0.05,
        contribution="combined",
        after_broadcast="residual",
        initial_sync="dense",
        seed=21,
        local_metric="client",
    )
    strat.base.fraction_train = 1.0
    random.seed(21)
    rng = np.random.default_rng(21)
    strat.configure_train(1, record(initial), ConfigRecord({"server-round": 1}), LocalGrid(clients))  # initialise
    strat._pending = {}
    pending: dict[str, np.ndarray] = {n: np.zeros(initial[n].shape) for n in strat.partial}
    differs_from_round_only = False
    k = None
    for t in range(1, 5):
        random.seed(21 + t)
        replies = _replies_from(strat, clients, t, rng)
        dep = {n: v.copy() for n, v in strat.w_dep.items()}
        srv = strat.w_srv if strat.w_srv is not None else dep
        avg = _fedavg(replies)
        weights = np.array([r.content["metrics"]["num-examples"] for r in replies], dtype=np.float64)
        weights /= weights.sum()
        c_round = {
            n: sum(w * r.content["contribution"][n].numpy().astype(np.float64) for w, r in zip(weights, replies))
            for n in strat.partial
        }
        w_new = {n: (srv[n] + (avg[n].astype(np.float32) - dep[n])).astype(np.float32) for n in strat.partial}
        c_g = {n: (w_new[n] - dep[n]).astype(np.float32).astype(np.float64) ** 2 for n in strat.partial}
        c_l = {n: pending[n] + c_round[n] for n in strat.partial}

        k = num_updated(0.05, strat.partial_size)

        def ranked(local: dict[str, np.ndarray], c_g: dict[str, np.ndarray] = c_g, k: int = k) -> dict[str, np.ndarray]:
            gs, ls = sum(v.sum() for v in c_g.values()), sum(v.sum() for v in local.values())
            return _expected_mask({n: 0.5 * c_g[n] / gs + 0.5 * local[n] / ls for n in strat.partial}, k)

        want = ranked(c_l)
        if t > 1 and any((ranked(c_round)[n] != want[n]).any() for n in strat.partial):
            differs_from_round_only = True
        strat.aggregate_train(t, replies)
        for n in strat.partial:
            np.testing.assert_array_equal(strat.w_dep[n] != dep[n], want[n])
            pending[n] = np.where(want[n], 0.0, c_l[n])
            np.testing.assert_allclose(strat.c_pending[n], pending[n], rtol=1e-12, atol=0)
            assert not strat.c_pending[n][want[n]].any()
    assert differs_from_round_only  # the pending part changed the ranking at least once
    # and it travels with the checkpoint
    other = strategy(contribution="combined", after_broadcast="residual", local_metric="client")
    other.load_state_dict(strat.state_dict())
    assert all(np.array_equal(other.c_pending[n], strat.c_pending[n]) for n in strat.partial)


def test_only_weights_whose_bits_changed_are_marked_changed() -> None:
    """k = 1 selects every weight; those with δ = 0 keep their value and stay out of catch-up patches."""
    from strategies.partial_update import _bits_differ

    assert _bits_differ(np.array([0.0, 1.0], np.float32), np.array([-0.0, 1.0], np.float32)).tolist() == [True, False]
    initial = tiny_model(22)
    clients = make_clients(1, initial)
    client = next(iter(clients.values()))
    strat = strategy(update_ratio=1.0, contribution="global", initial_sync="seed")
    strat.base.fraction_train = 1.0
    random.seed(0)
    (msg,) = strat.configure_train(1, record(initial), ConfigRecord({"server-round": 1}), LocalGrid(clients))
    arrays, version = client.patch(msg)
    trained = {k: v.copy() for k, v in arrays.items()}
    trained["fc1.weight"] = trained["fc1.weight"] + np.float32(0.01)  # only fc1.weight is trained
    reply = Message(
        content=RecordDict(
            {
                "arrays": record(trained),
                "metrics": MetricRecord({"num-examples": 10, "partition-id": 0, "pu-version": version}),
            }
        ),
        reply_to=msg,
    )
    new, _ = strat.aggregate_train(1, [reply])
    assert strat.round_report(1)["updated_weights"] == strat.partial_size  # every weight selected
    assert (strat.last_changed["fc1.weight"] == 1).all()
    assert not strat.last_changed["conv.weight"].any() and not strat.last_changed["fc2.weight"].any()
    tensors, _ = codec.decode(strat._merged_payload(0))
    assert set(tensors) == {"fc1.weight"}
    # a client at version 0 patched with it holds the deployed model bit for bit
    other = Client(77, 5, initial)
    store_held(other.context, initial, 0)
    random.seed(0)
    (msg2,) = strat.configure_train(2, new, ConfigRecord({"server-round": 2}), LocalGrid({77: other}))
    assert msg2.content["config"]["pu-base-version"] == 0
    got, v = other.patch(msg2)
    assert v == 1 and bit_equal(got, as_numpy(new))
