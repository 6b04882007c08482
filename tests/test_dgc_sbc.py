"""DGC (Lin et al. 2018) and SBC (Sattler et al. 2019) as uplink compressors, in process (no Ray).

The compressors are checked against independent numpy implementations of the papers' rules (the
DGC recurrence over several rounds, SBC's two-sided selection), their payloads against the
formats' byte arithmetic, and both methods through the real strategy and the real client step on
the loopback grid (tests/loopback.py).
"""

from __future__ import annotations

import copy
import io
import json
import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from loopback import set_task_identity
from test_compression import loopback_grid, tiny_cfg

from fedsparse import codec
from fedsparse import compressors as cc
from fedsparse.accounting import array_record_bytes
from fedsparse.config import ConfigError
from fedsparse.grid import seeded_sampling
from fedsparse.methods import build_strategy
from fedsparse.server import initial_model
from strategies.compression import UplinkCompression


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity(node_id=0)


def _update(seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": (scale * rng.normal(size=(6, 1, 5, 5))).astype(np.float32),
        "conv.bias": (scale * rng.normal(size=6)).astype(np.float32),
        "fc.weight": (0.1 * scale * rng.normal(size=(10, 84))).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def _floats(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in tensors.items() if v.dtype.kind == "f"}


# ----------------------------------------------------------------------------- independent helpers


def _topk_flat(x: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k largest |x| (numpy; random data has no ties)."""
    flat = np.abs(x.reshape(-1))
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argsort(-flat, kind="stable")[:k]] = True
    return mask.reshape(x.shape)


def _k(ratio: float, n: int) -> int:
    return min(n, max(1, int(math.floor(ratio * n + 0.5))))


def _leb128_len(value: int) -> int:
    length = 1
    while value >= 128:
        value >>= 7
        length += 1
    return length


def _index_bytes(mask: np.ndarray, kind: str, ilen: int) -> int:
    """The index bytes of one tensor from the format's arithmetic: a bitmap is ⌈n/8⌉ bytes, a
    coordinate list Σ varint(gap) bytes, and the codec keeps the smaller (ties: bitmap). A kind this
    test does not know (a newer codec's) must at least beat both."""
    flat = mask.reshape(-1)
    bitmap = (flat.size + 7) // 8
    positions = np.flatnonzero(flat)
    gaps = np.diff(positions, prepend=-1) - 1
    coords = sum(_leb128_len(int(g)) for g in gaps)
    if positions.size == flat.size:
        assert kind == "dense" and ilen == 0
        return 0
    if kind == "bitmap":
        assert bitmap <= coords
        return bitmap
    if kind == "coords":
        assert coords < bitmap
        return coords
    assert ilen <= min(bitmap, coords), (kind, ilen, bitmap, coords)
    return ilen


def _npy_overhead(arr: np.ndarray) -> int:
    """What Flower's Array adds to the raw bytes: the .npy header for this shape and dtype."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(arr.shape, arr.dtype), allow_pickle=False)
    return buf.tell() - arr.nbytes


def _header_json_len(blob: np.ndarray) -> int:
    return int.from_bytes(blob[:4].tobytes(), "little")


def _reference_dgc(
    updates: list[dict[str, np.ndarray]], m: float, ratio: float, masking: bool
) -> list[tuple[dict, dict, dict]]:
    """The paper's Algorithm (momentum correction + masking), per tensor, in numpy:
    u ← m·u + Δ; v ← v + u; send top-k(v); v ← v ⊙ ¬mask; u ← u ⊙ ¬mask (masking).
    Returns (sent, u, v) after each round."""
    u: dict[str, np.ndarray] = {}
    v: dict[str, np.ndarray] = {}
    out = []
    for delta in updates:
        sent = {}
        for name, d in delta.items():
            u[name] = m * u[name] + d if name in u else d.copy()
            v[name] = v[name] + u[name] if name in v else u[name].copy()
            mask = _topk_flat(v[name], _k(ratio, d.size))
            sent[name] = np.where(mask, v[name], np.float32(0))
            v[name] = np.where(mask, np.float32(0), v[name])
            if masking:
                u[name] = np.where(mask, np.float32(0), u[name])
        out.append((sent, copy.deepcopy(u), copy.deepcopy(v)))
    return out


def _reference_sbc(x: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """SBC on one tensor, in numpy: top-k positive and top-k negative, the larger mean magnitude wins."""
    flat = x.reshape(-1).astype(np.float64)
    pos = np.flatnonzero(flat > 0)
    neg = np.flatnonzero(flat < 0)
    pos = pos[np.argsort(-flat[pos], kind="stable")[:k]]
    neg = neg[np.argsort(flat[neg], kind="stable")[:k]]
    mu_pos = float(flat[pos].mean()) if pos.size else 0.0
    mu_neg = float(-flat[neg].mean()) if neg.size else 0.0
    mask = np.zeros(flat.size, dtype=bool)
    if pos.size and mu_pos >= mu_neg:
        mask[pos] = True
        return mask.reshape(x.shape), mu_pos
    mask[neg] = True
    return mask.reshape(x.shape), -mu_neg if neg.size else 0.0


# ----------------------------------------------------------------------------- DGC


def test_dgc_round_trip_decodes_exactly_the_sent_topk() -> None:
    update = _update(1)
    config = cc.DGC(0.1, "tensor", momentum=0.9).round_config()
    payload, memory, stats = cc.compress_with_memory(update, config, seed=0)
    decoded, raws = cc.decode_update(payload)
    assert raws["bn.num_batches_tracked"] == 7
    kept = 0
    for name, d in _floats(update).items():
        mask = _topk_flat(d, _k(0.1, d.size))  # first round: u = Δ, v = u
        np.testing.assert_array_equal(decoded[name], np.where(mask, d, np.float32(0)))  # float32, exact
        kept += int(mask.sum())
        np.testing.assert_array_equal(memory.residual[name], np.where(mask, np.float32(0), d))
    assert stats["kept-fraction"] == pytest.approx(kept / sum(v.size for v in _floats(update).values()))
    # the model scope pools the tensors, as Top-k's
    pooled = cc.DGC(0.05, "model", momentum=0.9).round_config()
    decoded, _ = cc.decode_update(cc.compress_with_memory(update, pooled)[0])
    expected = cc.topk_masks(_floats(update), 0.05, "model")
    for name in expected:
        np.testing.assert_array_equal(decoded[name] != 0, expected[name])


def test_dgc_bytes_equal_the_format_arithmetic() -> None:
    """The payload is the sparse codec's: [4-byte length][JSON][index bytes][raw bytes] + 4 bytes per
    kept value; the metered bytes add the .npy header and the key of each array."""
    update = _update(2)
    config = cc.DGC(0.03, "tensor", momentum=0.9).round_config()
    payload, _, _ = cc.compress_with_memory(update, config)
    header, _ = codec.parse_header(payload["index"])
    decoded, _ = cc.decode_update(payload)
    floats = _floats(update)
    index = sum(
        _index_bytes(
            decoded[n] != 0, header["kinds"][header["names"].index(n)], header["ilen"][header["names"].index(n)]
        )
        for n in floats
    )
    raw = update["bn.num_batches_tracked"].nbytes
    expected = {
        "index": 4 + _header_json_len(payload["index"]) + index + raw,
        "values": 4 * sum(_k(0.03, x.size) for x in floats.values()),
    }
    assert {k: a.nbytes for k, a in payload.items()} == expected
    metered = array_record_bytes(codec.to_array_record(payload))
    assert metered == {k: _npy_overhead(payload[k]) + n + len(k) for k, n in expected.items()}


@pytest.mark.parametrize("masking", [True, False])
def test_dgc_momentum_correction_follows_the_papers_recurrence(masking: bool) -> None:
    """Three rounds of hand-made updates: what is sent and the client's u and v follow the paper's
    recurrence exactly (an independent numpy implementation)."""
    rng = np.random.default_rng(7)
    updates = [
        {"w": rng.normal(size=(4, 5)).astype(np.float32), "b": rng.normal(size=7).astype(np.float32)} for _ in range(3)
    ]
    m, ratio = 0.9, 0.2
    config = cc.DGC(ratio, "tensor", momentum=m, momentum_masking=masking).round_config()
    memory = None
    for (sent, u, v), delta in zip(_reference_dgc(updates, m, ratio, masking), updates):
        payload, memory, _ = cc.compress_with_memory(delta, config, memory)
        decoded, _ = cc.decode_update(payload)
        for name in delta:
            np.testing.assert_array_equal(decoded[name], sent[name])
            np.testing.assert_array_equal(memory.momentum[name], u[name])
            np.testing.assert_array_equal(memory.residual[name], v[name])
    # the ablation matters: the other masking setting leaves another u on this sequence
    other = _reference_dgc(updates, m, ratio, not masking)[-1]
    assert any(not np.array_equal(other[1][n], memory.momentum[n]) for n in ("w", "b"))


def test_dgc_without_momentum_is_topk_with_error_feedback() -> None:
    topk = {cc.CFG_METHOD: "topk", cc.CFG_RATIO: 0.1, cc.CFG_SCOPE: "tensor", cc.CFG_EF: True}
    dgc = cc.DGC(0.1, "tensor", momentum=0.0).round_config()
    residual: dict = {}
    memory = None
    for r in range(3):
        update = _update(10 + r)
        a, residual, _ = cc.compress_update(update, topk, residual=residual)
        b, memory, _ = cc.compress_with_memory(update, dgc, memory)
        for name, x in cc.decode_update(a)[0].items():
            np.testing.assert_array_equal(cc.decode_update(b)[0][name], x)
            np.testing.assert_array_equal(memory.residual[name], residual[name])
        assert memory.momentum == {}  # nothing else is kept
    # with momentum the residual-only entry point refuses (it would drop u silently)
    with pytest.raises(ValueError, match="compress_with_memory"):
        cc.compress_update(_update(), cc.DGC(0.1, momentum=0.5).round_config())


def test_dgc_local_clipping_bounds_the_norm() -> None:
    update = _update(3, scale=10.0)
    floats = _floats(update)
    norm = math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in floats.values()))
    tau = norm / 8
    config = cc.DGC(1.0, momentum=0.0, client_clip=tau).round_config()  # ratio 1: everything is sent
    decoded, _ = cc.decode_update(cc.compress_with_memory(update, config)[0])
    sent_norm = math.sqrt(sum(float(np.sum(decoded[n].astype(np.float64) ** 2)) for n in floats))
    assert sent_norm <= tau * (1 + 1e-6) and sent_norm == pytest.approx(tau, rel=1e-6)
    for name, x in floats.items():  # the direction is kept: Δ·τ/‖Δ‖
        np.testing.assert_allclose(decoded[name], x * (tau / norm), rtol=1e-5, atol=1e-7)
    # an update within the bound is not touched, bit for bit
    loose = cc.DGC(1.0, momentum=0.0, client_clip=2 * norm).round_config()
    decoded, _ = cc.decode_update(cc.compress_with_memory(update, loose)[0])
    for name, x in floats.items():
        np.testing.assert_array_equal(decoded[name], x)
    # the clipping comes before the momentum: u holds the clipped update
    _, memory, _ = cc.compress_with_memory(update, cc.DGC(0.1, momentum=0.9, client_clip=tau).round_config())
    u_norm = math.sqrt(sum(float(np.sum(memory.momentum[n].astype(np.float64) ** 2)) for n in floats))
    assert u_norm <= tau * (1 + 1e-6)
    # the per-client threshold of the paper's N^-1/2 rule for an average over N clients: √N·thr
    assert cc.dgc_client_clip(2.0, 9) == pytest.approx(6.0)
    assert cc.dgc_client_clip(0.0, 9) == 0.0


def test_momentum_masking_zeroes_u_at_the_sent_positions() -> None:
    update = _update(4)
    memory = cc.ClientMemory(momentum={k: np.full(v.shape, 0.5, np.float32) for k, v in _floats(update).items()})
    for masking in (True, False):
        config = cc.DGC(0.1, momentum=0.9, momentum_masking=masking).round_config()
        payload, after, _ = cc.compress_with_memory(update, config, copy.deepcopy(memory))
        decoded, _ = cc.decode_update(payload)
        for name, d in _floats(update).items():
            sent = decoded[name] != 0
            u = np.float32(0.9) * np.float32(0.5) + d
            assert sent.sum() == _k(0.1, d.size)
            if masking:
                assert not after.momentum[name][sent].any()
            else:
                np.testing.assert_array_equal(after.momentum[name][sent], u[sent])
            np.testing.assert_array_equal(after.momentum[name][~sent], u[~sent])  # elsewhere u stays
            assert not after.residual[name][sent].any()  # v is always zeroed where sent


def test_dgc_warmup_ratios_per_round() -> None:
    # the paper's schedule: 0.1 % target, 4 warm-up epochs → 75 %, 93.75 %, 98.4375 %, 99.6 %, then 99.9 %
    sparsity = [1 - cc.dgc_warmup_ratio(0.001, 4, t) for t in range(1, 7)]
    for got, paper in zip(sparsity, (0.75, 0.9375, 0.984375, 0.996, 0.999, 0.999)):
        assert got == pytest.approx(paper, abs=2e-3)
    assert sparsity == sorted(sparsity)  # rising
    assert cc.dgc_warmup_ratio(0.05, 1, 1) == pytest.approx(math.sqrt(0.05))
    assert cc.dgc_warmup_ratio(0.05, 0, 1) == 0.05  # no warm-up
    # the server sends the round's ratio; clients need no schedule
    base = cc.DGC(0.01, warmup_rounds=3, clip_norm=1.0)
    assert base.for_round(1, 4).round_config()[cc.CFG_RATIO] == pytest.approx(0.01**0.25)
    assert base.for_round(4, 4).round_config()[cc.CFG_RATIO] == 0.01
    assert base.for_round(2, 4).round_config()[cc.CFG_DGC_CLIP] == pytest.approx(2.0)


# ----------------------------------------------------------------------------- SBC


def _sbc_update() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    neg_heavy = rng.normal(size=200).astype(np.float32)
    neg_heavy[neg_heavy < 0] *= 3  # the negative side has the larger mean magnitude
    few_pos = -np.abs(rng.normal(size=50)).astype(np.float32)
    few_pos[[3, 17]] = [9.0, 8.0]  # only two positives, far larger than any negative
    return {
        "conv.weight": rng.normal(size=(6, 1, 5, 5)).astype(np.float32),
        "neg": neg_heavy,
        "few_pos": few_pos,
        "zero": np.zeros(9, np.float32),
        "bn.num_batches_tracked": np.array(3, dtype=np.int64),
    }


def test_sbc_decodes_to_one_signed_mean_at_the_kept_positions() -> None:
    update = _sbc_update()
    payload, _, stats = cc.compress_with_memory(update, cc.SBC(0.1, error_feedback=False).round_config())
    decoded, raws = cc.decode_update(payload)
    assert raws["bn.num_batches_tracked"] == 3
    signs = {}
    for name, x in _floats(update).items():
        mask, mean = _reference_sbc(x, _k(0.1, x.size))
        np.testing.assert_array_equal(decoded[name] != 0, mask)
        assert decoded[name].dtype == np.float32
        kept = decoded[name][mask]
        assert (kept == np.float32(mean)).all()  # one magnitude, the side's mean, with its sign
        assert not decoded[name][~mask].any()
        signs[name] = np.sign(mean)
    assert signs["neg"] == -1 and signs["few_pos"] == 1  # both sides win somewhere
    assert int((decoded["few_pos"] != 0).sum()) == 2  # fewer positives than k: only those
    assert not decoded["zero"].any()
    n = sum(x.size for x in _floats(update).values())
    assert stats["kept-fraction"] == pytest.approx(sum(int((decoded[k] != 0).sum()) for k in decoded) / n)


def test_sbc_bytes_equal_the_format_arithmetic() -> None:
    """header = [4-byte length][JSON][codec index bytes of the positions][raw bytes];
    values = ONE float32 per floating tensor, not one per position."""
    update = _sbc_update()
    payload, _, _ = cc.compress_with_memory(update, cc.SBC(0.05).round_config())
    assert set(payload) == {"header", "values"}
    head = json.loads(payload["header"][4 : 4 + _header_json_len(payload["header"])].tobytes())
    assert head["codec"] == "fedsparse-sbc" and head["index"]["codec"] == codec.CODEC_NAME
    decoded, _ = cc.decode_update(payload)
    inner = head["index"]
    floats = _floats(update)
    index = sum(
        _index_bytes(decoded[n] != 0, inner["kinds"][inner["names"].index(n)], inner["ilen"][inner["names"].index(n)])
        for n in floats
    )
    expected = {
        "header": 4 + _header_json_len(payload["header"]) + index + update["bn.num_batches_tracked"].nbytes,
        "values": 4 * len(floats),
    }
    assert {k: a.nbytes for k, a in payload.items()} == expected
    metered = array_record_bytes(codec.to_array_record(payload))
    assert metered == {k: _npy_overhead(payload[k]) + n + len(k) for k, n in expected.items()}
    # against Top-k of the same k: the same kind of index, but 4 bytes per tensor instead of per value
    topk, _, _ = cc.compress_update(update, {cc.CFG_METHOD: "topk", cc.CFG_RATIO: 0.05, cc.CFG_SCOPE: "tensor"})
    assert payload["values"].nbytes < topk["values"].nbytes


def test_sbc_residual_keeps_exactly_the_unsent_part() -> None:
    update = _sbc_update()
    old = {k: np.full(x.shape, 0.25, np.float32) for k, x in _floats(update).items()}
    payload, memory, _ = cc.compress_with_memory(update, cc.SBC(0.1).round_config(), cc.ClientMemory(dict(old)))
    decoded, _ = cc.decode_update(payload)
    for name, x in _floats(update).items():
        acc = x + old[name]  # the compressor sees the residual-corrected update
        mask, mean = _reference_sbc(acc, _k(0.1, x.size))
        np.testing.assert_array_equal(decoded[name], np.where(mask, np.float32(mean), np.float32(0)))
        np.testing.assert_array_equal(memory.residual[name], acc - decoded[name])  # update + old residual − sent
    assert memory.momentum == {}
    # without error feedback nothing is kept
    _, memory, _ = cc.compress_with_memory(update, cc.SBC(0.1, error_feedback=False).round_config())
    assert memory.residual == {}


def test_sbc_decode_rejects_bad_payloads() -> None:
    payload, _, _ = cc.compress_with_memory(_sbc_update(), cc.SBC(0.1).round_config())
    with pytest.raises(ValueError, match="holds exactly the arrays"):
        cc.decode_update({**payload, "smuggled": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="means for"):
        cc.decode_update({**payload, "values": payload["values"][:-1]})
    with pytest.raises(ValueError, match="float32"):
        cc.decode_update({**payload, "values": payload["values"].astype(np.float64)})
    with pytest.raises(ValueError, match="truncated|trailing|cut short"):
        cc.decode_update({**payload, "header": payload["header"][:-3]})


# ----------------------------------------------------------------------------- through the real round


def _run_round(strat, grid, arrays, t):  # noqa: ANN001, ANN202
    with seeded_sampling(5, t):
        msgs = list(strat.configure_train(t, arrays, ConfigRecord({"server-round": t}), grid))
    return msgs, list(grid.send_and_receive(msgs))


def test_dgc_in_process_rounds_send_the_servers_schedule_and_keep_u_and_v() -> None:
    cfg = tiny_cfg(
        strategy="dgc",
        **{"compress-ratio": 0.05, "dgc-warmup-rounds": 1, "dgc-clip-norm": 0.01, "clients-per-round": 4},
    )
    grid = loopback_grid(cfg, 4)
    strat = build_strategy(cfg)
    assert isinstance(strat, UplinkCompression) and strat.method == "dgc"
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    tau = 0.01 * math.sqrt(4)

    # round 1: the warm-up's ratio and the per-client threshold √N·thr, in every message
    msgs, replies = _run_round(strat, grid, arrays, 1)
    for msg in msgs:
        config = msg.content["config"]
        assert config[cc.CFG_METHOD] == "dgc" and config[cc.CFG_RATIO] == pytest.approx(math.sqrt(0.05))
        assert config[cc.CFG_DGC_CLIP] == pytest.approx(tau)
    new, _ = strat.aggregate_train(1, replies)
    counts = [int(r.content["metrics"]["num-examples"]) for r in replies]
    decoded = [cc.decode_update(codec.from_array_record(r.content["arrays"]))[0] for r in replies]
    for name, x in arrays.items():
        expected = x.numpy().astype(np.float64) + sum(c / sum(counts) * d[name] for c, d in zip(counts, decoded))
        np.testing.assert_allclose(new[name].numpy(), expected, rtol=1e-6, atol=1e-7)
    report = strat.round_report(1)
    assert report["compressor"] == "dgc" and report["compress_ratio"] == pytest.approx(math.sqrt(0.05))
    for msg, d in zip(msgs, decoded):
        kept = sum(int(np.count_nonzero(v)) for v in d.values())
        floats = {k: v for k, v in arrays.items() if v.numpy().dtype.kind == "f"}
        assert kept == sum(_k(math.sqrt(0.05), a.numpy().size) for a in floats.values())
        # after a first round u = v: both are clip(Δ) with the sent positions zeroed
        state = grid.contexts[msg.metadata.dst_node_id].state
        u = {k: a.numpy() for k, a in state[cc.MOMENTUM_STATE_KEY].items()}
        v = {k: a.numpy() for k, a in state[cc.RESIDUAL_STATE_KEY].items()}
        assert set(u) == set(v) == set(floats)
        for k in u:
            np.testing.assert_array_equal(u[k], v[k])
            assert not u[k][d[k] != 0].any()
        # sent + v is the clipped update: its norm is the threshold (these updates are larger)
        clipped = math.sqrt(sum(float(np.sum((d[k] + v[k]).astype(np.float64) ** 2)) for k in v))
        assert clipped == pytest.approx(tau, rel=1e-5)
    assert report["uplink_nonzero_fraction"] == pytest.approx(math.sqrt(0.05), abs=1e-3)

    # round 2: the target ratio; each reply is top-k(v₁ + m·u₁ + Δ₂) with Δ₂ recovered by replaying
    # the client's round on a copy of its context without the memory (sent + v = Δ₂ exactly)
    arrays = new
    before = {nid: copy.deepcopy(c) for nid, c in grid.contexts.items()}
    msgs, replies = _run_round(strat, grid, arrays, 2)
    assert all(m.content["config"][cc.CFG_RATIO] == 0.05 for m in msgs)
    assert len(replies) == 4
    for msg, reply in zip(msgs, replies):
        context = before[msg.metadata.dst_node_id]  # every client took part in round 1
        memory = cc.load_memory(context.state)
        sent, _ = cc.decode_update(codec.from_array_record(reply.content["arrays"]))
        del context.state[cc.RESIDUAL_STATE_KEY]
        del context.state[cc.MOMENTUM_STATE_KEY]
        replay = grid.client_app(msg, context)
        sent0, _ = cc.decode_update(codec.from_array_record(replay.content["arrays"]))
        v0 = {k: a.numpy() for k, a in context.state[cc.RESIDUAL_STATE_KEY].items()}
        delta = {k: sent0[k] + v0[k] for k in sent0}  # the clipped Δ₂
        u2 = {k: np.float32(0.9) * memory.momentum[k] + delta[k] for k in delta}
        v2 = {k: memory.residual[k] + u2[k] for k in delta}
        for k in delta:
            mask = _topk_flat(v2[k], _k(0.05, v2[k].size))
            np.testing.assert_array_equal(sent[k], np.where(mask, v2[k], np.float32(0)))
    assert strat.round_report(2)["compress_ratio"] == 0.05


def test_sbc_in_process_round_sends_positions_and_one_mean_per_tensor() -> None:
    cfg = tiny_cfg(strategy="sbc", **{"compress-ratio": 0.02})
    grid = loopback_grid(cfg, 4)
    strat = build_strategy(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    floats = [k for k, a in arrays.items() if a.numpy().dtype.kind == "f"]
    for t in (1, 2):
        msgs, replies = _run_round(strat, grid, arrays, t)
        for reply in replies:
            payload = codec.from_array_record(reply.content["arrays"])
            assert set(payload) == {"header", "values"} and payload["values"].size == len(floats)
            assert strat.validate_reply(t, reply) is None
            decoded, _ = cc.decode_update(payload)
            for name in floats:
                assert np.unique(decoded[name][decoded[name] != 0]).size <= 1  # one value per tensor
        new, _ = strat.aggregate_train(t, replies)
        counts = [int(r.content["metrics"]["num-examples"]) for r in replies]
        decoded = [cc.decode_update(codec.from_array_record(r.content["arrays"]))[0] for r in replies]
        for name, x in arrays.items():
            expected = x.numpy().astype(np.float64) + sum(c / sum(counts) * d[name] for c, d in zip(counts, decoded))
            np.testing.assert_allclose(new[name].numpy(), expected, rtol=1e-6, atol=1e-7)
        arrays = new
    touched = [grid.contexts[m.metadata.dst_node_id] for m in grid.exchanges[0][0]]
    assert all(cc.RESIDUAL_STATE_KEY in c.state and cc.MOMENTUM_STATE_KEY not in c.state for c in touched)
    assert strat.round_report(2)["compressor"] == "sbc"


def test_dgc_and_sbc_config() -> None:
    with pytest.raises(ConfigError, match="dgc-momentum = 1.0"):
        tiny_cfg(strategy="dgc", **{"dgc-momentum": 1.0})
    with pytest.raises(ConfigError, match="dgc-scope"):
        tiny_cfg(strategy="dgc", **{"dgc-scope": "layer"})
    cfg = tiny_cfg(strategy="dgc", **{"dgc-momentum": 0.0, "dgc-momentum-masking": False, "dgc-warmup-rounds": 0})
    compressor = build_strategy(cfg).compressor
    assert (compressor.momentum, compressor.momentum_masking, compressor.warmup_rounds) == (0.0, False, 0)
    assert not build_strategy(tiny_cfg(strategy="sbc", **{"sbc-error-feedback": False})).error_feedback
    assert UplinkCompression("sbc", ratio=0.01).compressor.error_feedback  # the paper's default
    assert UplinkCompression(cc.DGC(0.01, warmup_rounds=2)).method == "dgc"
