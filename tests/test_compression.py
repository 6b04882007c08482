"""Uplink-compression baselines (Top-k + EF, Rand-k, FedPAQ) and SNIP, in process (no Ray).

The compressors are tested on plain arrays (selection, round trip, byte counts, unbiasedness); the
strategies with real Flower messages through our real ClientApp on a loopback grid
(tests/loopback.py: a real ``flwr.serverapp.Grid`` that calls the ClientApp in this process, as the
simulation engine does through Ray actors).
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from loopback import LoopbackGrid, set_task_identity, train_reply

from clients import compression as client_compression
from fedsparse import codec
from fedsparse import compressors as cc
from fedsparse.accounting import payload_bytes
from fedsparse.config import ConfigError, resolve_config
from fedsparse.grid import seeded_sampling
from fedsparse.masks import global_magnitude_masks, num_pruned
from fedsparse.methods import build_strategy
from fedsparse.models import build_model
from fedsparse.protocol import snip as snip_protocol
from fedsparse.server import initial_model, run_server


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages built outside a running app need a task identity (flower-notes, 'Tests without Ray')."""
    set_task_identity(node_id=0)


def loopback_grid(cfg: dict, num_nodes: int) -> LoopbackGrid:
    """Our ClientApp for ``cfg`` on nodes 2000, 2011, 2022, … (test_bench and
    test_compression_combinations use it too)."""
    return LoopbackGrid.for_config(cfg, num_nodes, first_node_id=2000, node_id_step=11)


def tiny_cfg(**over) -> dict:
    base = {
        "num-clients": 4,
        "clients-per-round": 2,
        "rounds": 2,
        "local-steps": 3,
        "batch-size": 16,
        "lr": 0.05,
        "seed": 5,
        "wire-bytes": False,
        "eval-batch-size": 5000,
    }
    base.update(over)
    return resolve_config(None, base)


def _update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(size=(6, 1, 5, 5)).astype(np.float32),
        "conv.bias": rng.normal(size=6).astype(np.float32),
        "fc.weight": (0.1 * rng.normal(size=(10, 84))).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def _numel(tensors) -> int:
    return sum(np.asarray(v).size for v in tensors.values() if np.asarray(v).dtype.kind == "f")


# ----------------------------------------------------------------------------- Top-k


def test_topk_picks_largest_absolute_values_model_and_tensor_scope() -> None:
    x = {"a": np.array([0.1, -5.0, 2.0, 0.0], np.float32), "b": np.array([[-3.0, 0.5], [4.0, -0.2]], np.float32)}
    masks = cc.topk_masks(x, ratio=3 / 8, scope="model")  # k = 3 of 8, over both tensors
    assert masks["a"].tolist() == [False, True, False, False]
    assert masks["b"].tolist() == [[True, False], [True, False]]  # |-3| and |4| beat 2.0, and negatives count
    per = cc.topk_masks(x, ratio=0.5, scope="tensor")  # 2 per tensor
    assert per["a"].tolist() == [False, True, True, False]
    assert per["b"].tolist() == [[True, False], [True, False]]
    with pytest.raises(ValueError, match="unknown topk scope"):
        cc.topk_masks(x, 0.5, scope="layer")


def test_topk_round_trip_residual_and_bytes() -> None:
    update = _update()
    config = {cc.CFG_METHOD: "topk", cc.CFG_RATIO: 0.05, cc.CFG_SCOPE: "model", cc.CFG_EF: True}
    old_residual = {k: np.full(v.shape, 0.01, np.float32) for k, v in update.items() if v.dtype.kind == "f"}
    payload, residual, stats = cc.compress_update(update, config, residual=old_residual)
    decoded, raws = cc.decode_update(payload)

    acc = {k: update[k] + old_residual[k] for k in old_residual}
    n = _numel(update)
    k = int(math.floor(0.05 * n + 0.5))
    sent = sum(int(np.count_nonzero(decoded[name])) for name in acc)
    assert sent == k and stats["kept-fraction"] == pytest.approx(k / n)
    threshold = min(np.abs(decoded[name][decoded[name] != 0]).min() for name in acc if np.any(decoded[name]))
    for name in acc:
        kept = decoded[name] != 0
        np.testing.assert_array_equal(decoded[name][kept], acc[name][kept])  # float32 values, exact
        assert (np.abs(acc[name][~kept]) <= threshold).all()  # nothing larger was left behind
        np.testing.assert_allclose(decoded[name] + residual[name], acc[name], rtol=0, atol=1e-7)  # a = C(a) + e
    assert raws["bn.num_batches_tracked"] == 7  # non-float tensors travel raw

    # bytes: exactly what the codec writes — 4 bytes per kept value, plus the per-tensor index
    per = codec.tensor_nbytes(payload)
    assert payload["values"].nbytes == 4 * k
    for name in acc:
        size = update[name].size
        assert per[name]["index_bytes"] <= (size + 7) // 8
    dense = sum(v.nbytes for v in update.values())
    assert codec.payload_nbytes(payload) < 0.25 * dense


def test_error_feedback_conserves_the_update_over_rounds() -> None:
    """Σ sent + final residual = Σ updates: error feedback loses nothing, it only delays."""
    config = {cc.CFG_METHOD: "topk", cc.CFG_RATIO: 0.02, cc.CFG_SCOPE: "tensor", cc.CFG_EF: True}
    residual: dict[str, np.ndarray] = {}
    total_update: dict[str, np.ndarray] = {}
    total_sent: dict[str, np.ndarray] = {}
    for r in range(4):
        update = {k: v for k, v in _update(r).items() if v.dtype.kind == "f"}
        payload, residual, _ = cc.compress_update(update, config, residual=residual)
        decoded, _ = cc.decode_update(payload)
        for name in update:
            total_update[name] = total_update.get(name, 0) + update[name].astype(np.float64)
            total_sent[name] = total_sent.get(name, 0) + decoded[name].astype(np.float64)
    for name in total_update:
        np.testing.assert_allclose(total_sent[name] + residual[name], total_update[name], atol=1e-5)
    # without error feedback the residual stays what it was (empty)
    _, no_ef, _ = cc.compress_update(_update(9), {**config, cc.CFG_EF: False}, residual={})
    assert no_ef == {}


# ----------------------------------------------------------------------------- Rand-k


def test_randk_seed_payload_has_no_index_and_regenerates_the_mask() -> None:
    update = _update(1)
    config = {cc.CFG_METHOD: "randk", cc.CFG_RATIO: 0.1, cc.CFG_RANDK_SCALE: "unbiased", cc.CFG_RANDK_INDEX: "seed"}
    payload, _, _ = cc.compress_update(update, config, seed=1234)
    decoded, raws = cc.decode_update(payload)
    floats = {k: v for k, v in update.items() if v.dtype.kind == "f"}
    ks = [cc.kept_count(0.1, v.size) for v in floats.values()]
    assert payload["values"].nbytes == 4 * sum(ks)  # values only: the positions come from the seed
    assert payload["header"].nbytes < 600  # JSON header + the raw int64, no index bytes
    for i, (name, x) in enumerate(floats.items()):
        pos = cc.randk_positions(1234, i, x.size, ks[i])
        expected = np.zeros(x.size, np.float32)
        expected[pos] = x.reshape(-1)[pos] * (x.size / ks[i])
        np.testing.assert_allclose(decoded[name].reshape(-1), expected, rtol=1e-6)
        assert np.count_nonzero(decoded[name]) == ks[i]  # exactly k per tensor
    assert raws["bn.num_batches_tracked"] == 7

    # the codec variant sends the same values plus an index, and decodes to the same update
    payload_c, _, _ = cc.compress_update(update, {**config, cc.CFG_RANDK_INDEX: "codec"}, seed=1234)
    decoded_c, _ = cc.decode_update(payload_c)
    for name in floats:
        np.testing.assert_array_equal(decoded_c[name], decoded[name])
    assert codec.payload_nbytes(payload_c) > codec.payload_nbytes(payload)
    # another seed, another mask
    other, _ = cc.decode_update(cc.compress_update(update, config, seed=99)[0])
    assert not np.array_equal(other["fc.weight"] != 0, decoded["fc.weight"] != 0)


def test_randk_unbiased_scaling_is_unbiased_in_expectation() -> None:
    x = {"w": np.random.default_rng(3).normal(size=50).astype(np.float32)}
    config = {cc.CFG_METHOD: "randk", cc.CFG_RATIO: 0.2, cc.CFG_RANDK_SCALE: "unbiased", cc.CFG_RANDK_INDEX: "seed"}
    draws = 4000
    mean = np.zeros(50)
    for s in range(draws):
        mean += cc.decode_update(cc.compress_update(x, config, seed=s)[0])[0]["w"] / draws
    # each coordinate: (n/k)·x w.p. k/n, else 0 → variance x²(n/k − 1)
    sigma = np.abs(x["w"]) * math.sqrt(50 / 10 - 1) / math.sqrt(draws)
    assert (np.abs(mean - x["w"]) <= 5 * sigma + 1e-9).all()
    unscaled = np.mean(
        [
            cc.decode_update(cc.compress_update(x, {**config, cc.CFG_RANDK_SCALE: "none"}, seed=s)[0])[0]["w"]
            for s in range(400)
        ],
        axis=0,
    )
    np.testing.assert_allclose(unscaled, 0.2 * x["w"], atol=0.15 * np.abs(x["w"]).max())  # biased by k/n


# ----------------------------------------------------------------------------- FedPAQ (QSGD)


def _z_scores(mean: np.ndarray, v: np.ndarray, s: int, draws: int) -> np.ndarray:
    u = np.abs(v) / np.linalg.norm(v) * s
    p = u - np.floor(u)
    sigma = np.linalg.norm(v) / s * np.sqrt(p * (1 - p) / draws)
    return np.where(sigma > 0, (mean - v) / np.where(sigma > 0, sigma, 1), (mean - v) * 1e12)


def test_qsgd_is_unbiased_in_expectation() -> None:
    """Statistical test: the mean of many quantisations converges to v at the rate its variance allows."""
    v = np.random.default_rng(0).normal(size=64)
    s, draws = 2, 3000
    rng = np.random.default_rng(1)
    mean = np.zeros(64)
    for _ in range(draws):
        codes, norms = cc.qsgd_quantize(v, s, rng)
        mean += cc.qsgd_dequantize(codes, norms, s, v.size) / draws
    z = _z_scores(mean, v, s, draws)
    assert np.abs(z).max() < 5.0
    assert 0.6 < float(np.mean(z**2)) < 1.5  # the z² average is ≈ 1 for an unbiased estimator

    # the same test rejects a biased quantiser (rounding to the nearest level): it can fail
    u = np.abs(v) / np.linalg.norm(v) * s
    nearest = np.sign(v) * np.rint(u) * np.linalg.norm(v) / s
    assert np.abs(_z_scores(nearest, v, s, draws)).max() > 5.0


def test_fedpaq_codes_pack_and_byte_count() -> None:
    update = _update(2)
    for levels, bucket in ((1, 0), (8, 0), (16, 0), (127, 0), (4, 100)):
        config = {cc.CFG_METHOD: "fedpaq", cc.CFG_LEVELS: levels, cc.CFG_BUCKET: bucket}
        payload, residual, _ = cc.compress_update(update, config, seed=levels)
        assert residual == {}
        bits = cc.code_bits(levels)
        assert bits == math.ceil(math.log2(2 * levels + 1))
        n = _numel(update)
        assert payload["levels"].dtype == np.uint8 and payload["levels"].size == math.ceil(n * bits / 8)
        decoded, raws = cc.decode_update(payload)
        assert raws["bn.num_batches_tracked"] == 7
        for name, x in update.items():
            if x.dtype.kind != "f":
                continue
            # every decoded value is norm·j/s for an integer level j in [-s, s]
            flat = x.reshape(-1).astype(np.float64)
            size = flat.size if bucket == 0 else bucket
            for start in range(0, flat.size, size):
                block = flat[start : start + size]
                norm = np.float32(np.linalg.norm(block))
                levels_seen = decoded[name].reshape(-1)[start : start + size] / float(norm) * levels
                np.testing.assert_allclose(levels_seen, np.rint(levels_seen), atol=1e-3)
                assert np.abs(levels_seen).max() <= levels + 1e-3
                # sign is preserved wherever the coordinate is not quantised to 0
                nz = np.rint(levels_seen) != 0
                assert (np.sign(levels_seen[nz]) == np.sign(block[nz])).all()
        floats = [v for v in update.values() if v.dtype.kind == "f"]
        norms = len(floats) if bucket == 0 else sum(math.ceil(v.size / bucket) for v in floats)
        header = payload["header"]
        hlen = int.from_bytes(header[:4].tobytes(), "little")
        assert header.size == 4 + hlen + 4 * norms + 8  # JSON, one float32 per norm, the raw int64
    # the paper's Q(x) on the whole update: one norm for all tensors together
    payload, _, _ = cc.compress_update(
        update, {cc.CFG_METHOD: "fedpaq", cc.CFG_LEVELS: 8, cc.CFG_QSCOPE: "model"}, seed=3
    )
    decoded, _ = cc.decode_update(payload)
    floats = {k: v for k, v in update.items() if v.dtype.kind == "f"}
    whole = np.concatenate([v.reshape(-1).astype(np.float64) for v in floats.values()])
    norm = float(np.float32(np.linalg.norm(whole)))
    got = np.concatenate([decoded[k].reshape(-1).astype(np.float64) for k in floats]) / norm * 8
    np.testing.assert_allclose(got, np.rint(got), atol=1e-3)
    hlen = int.from_bytes(payload["header"][:4].tobytes(), "little")
    assert payload["header"].size == 4 + hlen + 4 + 8
    codes = np.random.default_rng(0).integers(0, 33, size=1001).astype(np.uint32)
    np.testing.assert_array_equal(cc.unpack_codes(cc.pack_codes(codes, 6), 6, 1001), codes)
    with pytest.raises(ValueError, match="does not fit"):
        cc.pack_codes(np.array([64]), 6)


def test_decode_update_rejects_bad_payloads() -> None:
    payload, _, _ = cc.compress_update(_update(), {cc.CFG_METHOD: "fedpaq", cc.CFG_LEVELS: 8})
    with pytest.raises(ValueError, match="truncated"):
        cc.decode_update({**payload, "levels": payload["levels"][:-3]})
    bad = cc._pack_header({"codec": "other", "version": 1})
    with pytest.raises(ValueError, match="unsupported payload codec"):
        cc.decode_update({"header": bad, "levels": payload["levels"]})
    with pytest.raises(ValueError, match="holds exactly the arrays"):
        cc.decode_update({**payload, "smuggled": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="bit-packed uint8 codes"):
        cc.decode_update({**payload, "levels": payload["levels"].astype(np.int16)})
    randk, _, _ = cc.compress_update(_update(), {cc.CFG_METHOD: "randk", cc.CFG_RATIO: 0.1})
    with pytest.raises(ValueError, match="holds exactly the arrays"):
        cc.decode_update({**randk, "smuggled": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="unknown compress-method"):
        cc.compress_update(_update(), {cc.CFG_METHOD: "signsgd"})


# ----------------------------------------------------------------------------- the strategies


@pytest.mark.parametrize(
    "strategy,extra",
    [("topk", {"compress-ratio": 0.05}), ("randk", {"compress-ratio": 0.1}), ("fedpaq", {"quant-levels": 4})],
)
def test_strategy_applies_the_weighted_mean_of_decoded_updates(strategy: str, extra: dict) -> None:
    cfg = tiny_cfg(strategy=strategy, **extra)
    grid = loopback_grid(cfg, 4)
    strat = build_strategy(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    for t in (1, 2):
        with seeded_sampling(int(cfg["seed"]), t):
            msgs = list(strat.configure_train(t, arrays, ConfigRecord({"server-round": t}), grid))
        assert msgs[0].content["config"][cc.CFG_METHOD] == strategy
        replies = list(grid.send_and_receive(msgs))
        new, _ = strat.aggregate_train(t, replies)
        # independent recomputation from the replies: x + Σ ρ_i Δ̂_i
        counts = [int(r.content["metrics"]["num-examples"]) for r in replies]
        decoded = [cc.decode_update(codec.from_array_record(r.content["arrays"]))[0] for r in replies]
        for name, x in arrays.items():
            expected = x.numpy().astype(np.float64) + sum(c / sum(counts) * d[name] for c, d in zip(counts, decoded))
            np.testing.assert_allclose(new[name].numpy(), expected, rtol=1e-6, atol=1e-7)
        # the uplink really is smaller than a dense model reply
        dense = payload_bytes(RecordDict({"arrays": arrays})).total
        up = payload_bytes(RecordDict({"arrays": replies[0].content["arrays"]})).total
        assert up < 0.25 * dense
        arrays = new
    report = strat.round_report(2)
    assert report["compressor"] == strategy
    # Top-k keeps its residual in the client's context.state; the unbiased methods keep nothing
    touched = [grid.contexts[m.metadata.dst_node_id] for m in grid.exchanges[0][0]]
    assert all((cc.RESIDUAL_STATE_KEY in c.state) == (strategy == "topk") for c in touched)
    if strategy == "topk":
        res = touched[0].state[cc.RESIDUAL_STATE_KEY]
        assert set(res.keys()) == {k for k, a in arrays.items()}
        assert report["uplink_nonzero_fraction"] == pytest.approx(0.05, abs=1e-3)


def test_topk_error_feedback_round_two_sends_topk_of_update_plus_stored_residual() -> None:
    """Round 2's reply is top-k(Δ₂ + e₁), e₁ the residual round 1 left in the client's context.state.

    Δ₂ is recovered by replaying the same client round on a copy of its context without the
    residual: that reply and its new residual split Δ₂ exactly (sent + e = a, entry by entry)."""
    cfg = tiny_cfg(strategy="topk", **{"compress-ratio": 0.05, "clients-per-round": 4})
    grid = loopback_grid(cfg, 4)
    strat = build_strategy(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    with seeded_sampling(int(cfg["seed"]), 1):
        msgs = list(strat.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid))
    arrays, _ = strat.aggregate_train(1, list(grid.send_and_receive(msgs)))
    before = {n: copy.deepcopy(c) for n, c in grid.contexts.items()}  # every client holds a residual e₁
    with seeded_sampling(int(cfg["seed"]), 2):
        msgs = list(strat.configure_train(2, arrays, ConfigRecord({"server-round": 2}), grid))
    replies = list(grid.send_and_receive(msgs))
    assert len(replies) == 4
    residual_mattered = False
    for msg, reply in zip(msgs, replies):
        context = before[msg.metadata.dst_node_id]
        e1 = {k: a.numpy() for k, a in context.state[cc.RESIDUAL_STATE_KEY].items()}
        assert any(np.any(v) for v in e1.values())
        sent, _ = cc.decode_update(codec.from_array_record(reply.content["arrays"]))

        del context.state[cc.RESIDUAL_STATE_KEY]
        replay = grid.client_app(msg, context)
        sent0, _ = cc.decode_update(codec.from_array_record(replay.content["arrays"]))
        e0 = {k: a.numpy() for k, a in context.state[cc.RESIDUAL_STATE_KEY].items()}
        delta = {k: sent0[k] + e0[k] for k in sent0}  # Δ₂, exactly

        acc = {k: delta[k] + e1[k] for k in delta}  # a = Δ₂ + e₁, in float32 as the client adds them
        keep = cc.topk_masks(acc, 0.05, "model")
        for k in acc:
            np.testing.assert_array_equal(sent[k], np.where(keep[k], acc[k], np.float32(0)))
        residual_mattered |= any(not np.array_equal(sent[k], sent0[k]) for k in sent)
        # and the residual stored for round 3 is a − top-k(a)
        e2 = {k: a.numpy() for k, a in grid.contexts[msg.metadata.dst_node_id].state[cc.RESIDUAL_STATE_KEY].items()}
        for k in acc:
            np.testing.assert_array_equal(e2[k], acc[k] - np.where(keep[k], acc[k], np.float32(0)))
    assert residual_mattered  # ignoring the residual would have sent something else


def test_compression_config_errors_name_the_value() -> None:
    with pytest.raises(ConfigError, match="compress-ratio"):
        tiny_cfg(strategy="topk", **{"compress-ratio": 0.0})
    with pytest.raises(ConfigError, match="randk-error-feedback"):
        tiny_cfg(strategy="randk", **{"randk-error-feedback": True})
    tiny_cfg(strategy="randk", **{"randk-error-feedback": True, "randk-scale": "none"})
    with pytest.raises(ConfigError, match="quant-levels"):
        tiny_cfg(strategy="fedpaq", **{"quant-levels": 0})
    with pytest.raises(ConfigError, match="topk-scope"):
        tiny_cfg(strategy="topk", **{"topk-scope": "layer"})
    with pytest.raises(ConfigError, match="target-sparsity"):
        tiny_cfg(strategy="snip", **{"target-sparsity": 1.0})


# ----------------------------------------------------------------------------- SNIP


def test_snip_saliency_is_normalised_connection_sensitivity() -> None:
    torch.manual_seed(0)
    model = build_model("lenet5", 10, 1, 28)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    names = [n for n, p in model.named_parameters() if p.ndim > 1]
    sal = client_compression.snip_saliency(model, [(x, y)], names)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names])
    raw = [(g * dict(model.named_parameters())[n]).abs() for g, n in zip(grads, names)]
    total = sum(float(r.detach().sum()) for r in raw)
    for r, n in zip(raw, names):
        torch.testing.assert_close(sal[n], r.detach() / total)
    assert sum(float(s.sum()) for s in sal.values()) == pytest.approx(1.0)


def test_masked_training_keeps_pruned_weights_at_zero() -> None:
    torch.manual_seed(1)
    model = torch.nn.Linear(6, 3)
    keep = {"weight": torch.rand(3, 6) > 0.5}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    with client_compression.masked_training(model, keep):
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(4, 6)).pow(2).sum().backward()
            opt.step()
        assert (model.weight[~keep["weight"]] == 0).all()
        assert (model.weight[keep["weight"]] != 0).all()
    opt.zero_grad()
    model(torch.randn(4, 6)).pow(2).sum().backward()  # hooks removed: pruned positions get gradient again
    assert model.weight.grad[~keep["weight"]].abs().sum() > 0


def test_snip_run_static_mask_exact_sparsity_and_sparse_both_ways(tmp_path: Path) -> None:
    cfg = tiny_cfg(strategy="snip", rounds=3, **{"target-sparsity": 0.8, "snip-batches": 2})
    grid = loopback_grid(cfg, 4)
    result = run_server(grid, cfg, tmp_path, show_progress=False)
    df = result.rounds
    state = result.arrays.to_torch_state_dict()
    prunable = [
        "features.0.weight",
        "features.3.weight",
        "classifier.0.weight",
        "classifier.2.weight",
        "classifier.4.weight",
    ]
    total = sum(state[n].numel() for n in prunable)
    kept_positions = {n: state[n] != 0 for n in prunable}
    assert total - sum(int(k.sum()) for k in kept_positions.values()) >= num_pruned(total, 0.8)
    assert df["mask_sparsity"].tolist() == pytest.approx([num_pruned(total, 0.8) / total] * 3)
    assert (df["sparsity"] >= df["mask_sparsity"] - 1e-12).all()

    # round 1 = saliency exchange (dense prunable tensors up) + a train exchange; then one exchange per round
    saliency_msgs, saliency_replies = grid.exchanges[0]
    assert saliency_msgs[0].content["config"][snip_protocol.CFG_SNIP_PHASE] == "saliency"
    assert saliency_msgs[0].content["config"][snip_protocol.CFG_SNIP_BATCHES] == 2
    assert set(saliency_replies[0].content["arrays"].keys()) == set(prunable)
    assert len(grid.exchanges) == 4
    # the mask, recomputed from the saliency replies: their example-weighted mean (partition order =
    # node-id order on this grid), then the (1 − s) fraction of the pooled weights with the largest one
    ordered = sorted(saliency_replies, key=lambda m: m.metadata.src_node_id)
    counts = [float(m.content["metrics"]["num-examples"]) for m in ordered]
    saliency = {
        n: sum((c / sum(counts)) * m.content["arrays"][n].numpy().astype(np.float64) for c, m in zip(counts, ordered))
        for n in prunable
    }
    keep = total - num_pruned(total, 0.8)
    masks = []
    for msgs, replies in grid.exchanges[1:]:
        assert msgs[0].content["config"][snip_protocol.CFG_SNIP_PHASE] == "train"
        _, down_masks = codec.decode(codec.from_array_record(msgs[0].content["arrays"]))
        masks.append({n: down_masks[n] for n in prunable})
        _, up_masks = codec.decode(codec.from_array_record(replies[0].content["arrays"]))
        for n in prunable:
            np.testing.assert_array_equal(up_masks[n], down_masks[n])  # the uplink uses the same mask
    for later in masks[1:]:  # static mask
        for n in prunable:
            np.testing.assert_array_equal(later[n], masks[0][n])
    assert sum(int(masks[0][n].sum()) for n in prunable) == keep
    kept_min = min(float(saliency[n][masks[0][n]].min()) for n in prunable if masks[0][n].any())
    pruned_max = max(float(saliency[n][~masks[0][n]].max()) for n in prunable if (~masks[0][n]).any())
    assert kept_min >= pruned_max  # nothing more salient was pruned
    expected = global_magnitude_masks({n: torch.from_numpy(saliency[n]) for n in prunable}, 0.8)
    for n in prunable:
        np.testing.assert_array_equal(masks[0][n], expected[n].numpy())
    assert df["saliency_replies"].iloc[0] == 2 and df["saliency_rejected"].iloc[0] == 0
    assert df["saliency_failures"].iloc[0] == 0
    for n in prunable:  # the final model is zero outside the mask
        assert not state[n][~torch.from_numpy(masks[0][n])].any()
    # the saliency exchange is metered in round 1; later rounds move far less than the dense model
    assert df["bytes_up"].iloc[0] > 2 * df["bytes_up"].iloc[1]
    assert df["comm_ratio_down"].iloc[-1] < 0.75
    assert (tmp_path / "snip_layer_sparsity.csv").is_file()


def _snip_round_one(cfg: dict, tamper=None, reverse: bool = False):
    """Build a SNIP strategy and run its round-1 configure_train (the saliency exchange) on a
    loopback grid whose saliency replies can be tampered with (``tamper(i, msg, reply)``, i in
    node order) and arrive in reverse order."""
    grid = loopback_grid(cfg, int(cfg["num-clients"]))
    inner = grid.send_and_receive
    seen: dict[str, list] = {}

    def send_and_receive(messages, *, timeout=None):
        messages = list(messages)
        replies = list(inner(messages, timeout=timeout))
        if messages[0].content["config"][snip_protocol.CFG_SNIP_PHASE] != "saliency":
            return replies
        by_node = {m.metadata.dst_node_id: m for m in messages}
        replies = sorted(replies, key=lambda r: r.metadata.src_node_id)
        if tamper is not None:
            replies = [tamper(i, by_node[r.metadata.src_node_id], r) for i, r in enumerate(replies)]
        seen["replies"] = replies
        return replies[::-1] if reverse else replies

    grid.send_and_receive = send_and_receive  # type: ignore[method-assign]  # wraps the real one to tamper
    strat = build_strategy(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    with seeded_sampling(int(cfg["seed"]), 1):
        list(strat.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid))
    return strat, seen["replies"]


def _expected_snip_mask(replies: list, prunable: list[str], sparsity: float) -> dict[str, np.ndarray]:
    counts = [float(r.content["metrics"]["num-examples"]) for r in replies]
    saliency = {
        n: torch.from_numpy(
            sum((c / sum(counts)) * r.content["arrays"][n].numpy().astype(np.float64) for c, r in zip(counts, replies))
        )
        for n in prunable
    }
    return {n: m.numpy() for n, m in global_magnitude_masks(saliency, sparsity).items()}


def test_snip_saliency_replies_are_aggregated_in_partition_order_and_screened(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import strategies.snip as snip_module

    cfg = tiny_cfg(strategy="snip", **{"clients-per-round": 4, "target-sparsity": 0.8})
    order: list[list[np.ndarray]] = []
    real = snip_module.weighted_mean
    monkeypatch.setattr(snip_module, "weighted_mean", lambda parts, rho: order.append(parts) or real(parts, rho))

    # replies arriving in reverse are summed in partition (here: node-id) order
    strat, replies = _snip_round_one(cfg, reverse=True)
    prunable = strat.prunable
    first = [r.content["arrays"][prunable[0]].numpy().astype(np.float64) for r in replies]
    assert len(order[0]) == 4 and all(np.array_equal(a, b) for a, b in zip(order[0], first))
    expected = _expected_snip_mask(replies, prunable, 0.8)
    for n in prunable:
        np.testing.assert_array_equal(strat.masks[n], expected[n])

    # bad saliencies are dropped with a logged reason, counted, and the mask is built from the rest
    def tamper(i, msg, reply):
        tensors = {n: a.numpy().copy() for n, a in reply.content["arrays"].items()}
        count = int(reply.content["metrics"]["num-examples"])
        if i == 1:
            tensors[prunable[0]].flat[0] = np.nan
        elif i == 2:
            del tensors[prunable[-1]]
        elif i == 3:
            count = 0
        return train_reply(msg, ArrayRecord({n: Array(x) for n, x in tensors.items()}), count)

    caplog.set_level(logging.WARNING, logger="fedsparse")
    strat, replies = _snip_round_one(cfg, tamper=tamper)
    expected = _expected_snip_mask(replies[:1], prunable, 0.8)
    for n in prunable:
        np.testing.assert_array_equal(strat.masks[n], expected[n])
    assert (strat.saliency_clients, strat.saliency_rejected, strat.saliency_failures) == (1, 3, 0)
    report = strat.round_report(1)
    assert report["saliency_replies"] == 1 and report["saliency_rejected"] == 3
    assert "saliency_rejected" not in strat.round_report(2)
    text = caplog.text
    assert (
        "contains NaN" in text
        and f"missing saliency tensors: {prunable[-1]}" in text
        and "num-examples = 0 is not > 0" in text
    )

    # nothing valid: a clear refusal instead of a mask from garbage (or a division by zero)
    with pytest.raises(RuntimeError, match="no valid saliency reply .*4 invalid"):
        _snip_round_one(cfg, tamper=lambda i, msg, r: tamper(3, msg, r))

    # the per-reply check: shapes/dtypes of the prunable tensors, >= 0, normalised
    good = replies[0]
    spec = {n: (tuple(good.content["arrays"][n].shape), "<f4") for n in prunable}
    assert strat.check_saliency(good, spec) is None

    def variant(change) -> str | None:
        tensors = {n: a.numpy().copy() for n, a in good.content["arrays"].items()}
        change(tensors)
        return strat.check_saliency(train_reply(good, ArrayRecord({n: Array(x) for n, x in tensors.items()}), 10), spec)

    assert "negative" in variant(lambda t: t[prunable[0]].__setitem__((0,) * t[prunable[0]].ndim, -1.0))
    assert "sum to" in variant(lambda t: [np.multiply(x, 5, out=x) for x in t.values()])
    assert "dtype float64" in variant(lambda t: t.__setitem__(prunable[0], t[prunable[0]].astype(np.float64)))
    assert "unexpected saliency tensors: extra" in variant(lambda t: t.__setitem__("extra", np.zeros(3, np.float32)))


def test_validate_reply_rejects_bad_updates() -> None:
    """fedsparse's reply screen asks the strategy: NaN, wrong shapes and junk payloads are rejected."""
    cfg = tiny_cfg(strategy="topk")
    grid = loopback_grid(cfg, 4)
    strat = build_strategy(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    msgs = list(strat.configure_train(1, arrays, ConfigRecord({"server-round": 1}), grid))
    good = list(grid.send_and_receive(msgs[:1]))[0]
    assert strat.validate_reply(1, good) is None

    def reply_with(tensors: dict, masks: dict | None = None) -> Message:
        payload = codec.to_array_record(codec.encode(tensors, masks or {}))
        return train_reply(msgs[0], payload, 10)

    update = {k: np.zeros_like(a.numpy()) for k, a in arrays.items()}
    nan = dict(update)
    nan["classifier.4.bias"] = np.full_like(nan["classifier.4.bias"], np.nan)
    assert "'classifier.4.bias' contains NaN" in strat.validate_reply(1, reply_with(nan))
    wrong = dict(update)
    wrong["classifier.4.bias"] = np.zeros(3, np.float32)
    assert "has shape (3,), expected (10,)" in strat.validate_reply(1, reply_with(wrong))
    wrong["classifier.4.bias"] = np.zeros(10, np.float64)
    assert "has dtype float64, expected float32" in strat.validate_reply(1, reply_with(wrong))
    missing = dict(update)
    del missing["features.0.bias"]
    assert "missing arrays: features.0.bias" in strat.validate_reply(1, reply_with(missing))
    junk = train_reply(msgs[0], codec.to_array_record({"index": np.zeros(3, np.uint8)}), 1)
    assert "does not decode" in strat.validate_reply(1, junk)
