"""Combinations built by composition: FedLUAR over FedPAQ, FedDIP with a LUAR-recycled uplink, and
partial-update broadcast with 8-bit values — in process, real ClientApp on a loopback grid."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from loopback import set_task_identity
from test_compression import loopback_grid, tiny_cfg

from clients.partial_update import unpack_parts
from fedsparse import codec
from fedsparse import compressors as cc
from fedsparse.accounting import payload_bytes
from fedsparse.config import ConfigError
from fedsparse.grid import seeded_sampling
from fedsparse.masks import num_pruned
from fedsparse.methods import build_strategy
from fedsparse.protocol import OMITTED_ARRAYS
from fedsparse.server import initial_model, run_server

PRUNABLE = [
    "features.0.weight",
    "features.3.weight",
    "classifier.0.weight",
    "classifier.2.weight",
    "classifier.4.weight",
]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity(node_id=0)


def _drive(cfg: dict, rounds: int):
    grid = loopback_grid(cfg, int(cfg["num-clients"]))
    strategy = build_strategy(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    history = []
    for t in range(1, rounds + 1):
        with seeded_sampling(int(cfg["seed"]), t):
            msgs = list(strategy.configure_train(t, arrays, ConfigRecord({"server-round": t}), grid))
        replies = list(grid.send_and_receive(msgs))
        assert all(strategy.validate_reply(t, r) is None for r in replies)
        before = arrays
        arrays, _ = strategy.aggregate_train(t, replies)
        history.append({"msgs": msgs, "replies": replies, "before": before, "after": arrays})
    return strategy, history


def test_fedluar_over_fedpaq_omits_recycled_layers_and_recycles_their_update() -> None:
    cfg = tiny_cfg(strategy="fedluar-paq", rounds=3, **{"recycled-layers": 2, "quant-levels": 8})
    strategy, history = _drive(cfg, 3)
    assert history[0]["msgs"][0].content["config"].get(OMITTED_ARRAYS) is None  # R_1 is empty
    for t, h in enumerate(history[1:], start=2):
        recycled = list(h["msgs"][0].content["config"][OMITTED_ARRAYS])
        assert len(recycled) == 2 and h["msgs"][0].content["config"][cc.CFG_METHOD] == "fedpaq"
        for reply in h["replies"]:
            deltas, _ = cc.decode_update(codec.from_array_record(reply.content["arrays"]))
            assert not set(recycled) & set(deltas)  # left out of the quantised payload entirely
            assert len(deltas) == len(h["before"]) - 2
        # recycled arrays move by the update they got in the previous round
        prev = history[t - 2]
        for name in recycled:
            step = prev["after"][name].numpy() - prev["before"][name].numpy()
            np.testing.assert_allclose(h["after"][name].numpy() - h["before"][name].numpy(), step, rtol=1e-5, atol=1e-7)
        full = payload_bytes(history[0]["replies"][0].content).total
        assert payload_bytes(h["replies"][0].content).total < full  # fewer bytes than FedPAQ alone
    report = strategy.round_report(3)
    assert report["num_recycled"] == 2 and report["compressor"] == "fedpaq" and report["quant_bits"] == 5


def test_feddip_with_luar_uplink_keeps_the_mask_and_sends_less(tmp_path: Path) -> None:
    cfg = tiny_cfg(strategy="feddip-luar", rounds=4, **{"recycled-layers": 2, "reconfig-every": 2})
    grid = loopback_grid(cfg, 4)
    result = run_server(grid, cfg, tmp_path, show_progress=False)
    df = result.rounds
    assert (df["rejected"] == 0).all() and (df["aggregated"]).all()
    assert df["num_recycled"].tolist() == [0, 2, 2, 2]
    for msgs, replies in grid.exchanges[1:]:
        recycled = set(msgs[0].content["config"][OMITTED_ARRAYS])
        tensors, _ = codec.decode(codec.from_array_record(replies[0].content["arrays"]))
        assert recycled and not recycled & set(tensors)
    # the returned model respects FedDIP's final mask (exact target sparsity over the prunable weights)
    state = result.arrays.to_torch_state_dict()
    total = sum(state[n].numel() for n in PRUNABLE)
    zeros = sum(int((state[n] == 0).sum()) for n in PRUNABLE)
    assert zeros == num_pruned(total, 0.9)  # exactly s_p: neither under- nor over-pruned
    # one weight too many or too few is 1/total ≈ 2e-5: far outside the float tolerance
    assert df["mask_sparsity"].iloc[-1] == pytest.approx(zeros / total, rel=0, abs=1e-12)
    assert df["sparsity"].iloc[-1] == pytest.approx(zeros / total, rel=0, abs=1e-12)
    # the uplink is smaller than FedDIP's own once layers are recycled
    plain = tiny_cfg(strategy="feddip", rounds=4, **{"reconfig-every": 2})
    plain_df = run_server(loopback_grid(plain, 4), plain, tmp_path / "plain", show_progress=False).rounds
    assert df["bytes_up"].iloc[1:].sum() < 0.95 * plain_df["bytes_up"].iloc[1:].sum()
    assert df["bytes_up"].iloc[0] == plain_df["bytes_up"].iloc[0]  # round 1 recycles nothing


def test_dpu_with_8bit_values_is_a_configuration() -> None:
    """DPU + Q needs no new code: partial-update's value-bits = 8 quantises the broadcast values —
    what goes down the wire is the 8-bit codec: uint8 values, one byte per sent value."""
    cfg = tiny_cfg(
        strategy="partial-update", rounds=3, **{"value-bits": 8, "update-ratio": 0.05, "clients-per-round": 4}
    )
    strategy, history = _drive(cfg, 3)
    assert strategy.value_bits == 8
    patches = 0
    for h in history[1:]:  # round 1 starts every client from the seed; later rounds send patches
        for msg in h["msgs"]:
            semantics = list(msg.content["config"].get("pu-parts", []))
            parts = unpack_parts(msg.content["arrays"], len(semantics))
            for how, payload in zip(semantics, parts):
                if how != "add":  # an exact (assign) patch: a dense resync or catch-up, float32
                    continue
                patches += 1
                header, _ = codec.parse_header(payload[codec.INDEX_KEY])
                values = payload[codec.VALUES_KEY]
                assert header["value_bits"] == 8 and values.dtype == np.uint8
                sent = sum(t["nnz"] for t in codec.tensor_nbytes(payload).values() if t["kind"] != "raw")
                assert values.nbytes == sent > 0  # one byte per value
                assert all(
                    t["value_bytes"] == t["nnz"] for t in codec.tensor_nbytes(payload).values() if t["kind"] != "raw"
                )
    assert patches >= 4  # 8-bit patches were really sent (8 today: 4 clients in each of rounds 2 and 3)


def test_combination_config_errors() -> None:
    with pytest.raises(ConfigError, match="recycled-layers = 9 exceeds the 5"):
        tiny_cfg(strategy="fedluar-paq", **{"recycled-layers": 9})
    with pytest.raises(ConfigError, match="luar-base"):
        tiny_cfg(strategy="fedluar-paq", **{"luar-base": "fedadam"})
    with pytest.raises(ConfigError, match="persist-momentum"):
        tiny_cfg(strategy="feddip-luar", momentum=0.9, **{"persist-momentum": True})
    with pytest.raises(ConfigError, match="initial-sparsity"):
        tiny_cfg(strategy="feddip-luar", **{"initial-sparsity": 0.95, "target-sparsity": 0.9})


def test_feddip_with_luar_uplink_rejects_entries_outside_the_mask() -> None:
    """The FedDIP+LUAR screen keeps FedDIP's rule: with nested masks a reply may carry values only
    inside the round's mask; a reply that sends a kept (not recycled) prunable layer dense is rejected,
    while the same round's honest replies pass."""
    cfg = tiny_cfg(strategy="feddip-luar", rounds=3, **{"recycled-layers": 2, "reconfig-every": 2})
    strategy, history = _drive(cfg, 2)  # _drive asserts every honest reply passes the screen
    last = history[-1]
    recycled = set(last["msgs"][0].content["config"][OMITTED_ARRAYS])
    reply = last["replies"][0]
    tensors, kept = codec.decode(codec.from_array_record(reply.content["arrays"]))
    name = next(n for n in PRUNABLE if n not in recycled)
    assert not kept[name].all()  # an honest reply is sparse in that layer
    forged = {n: (np.ones_like(x) if n == name else x) for n, x in tensors.items()}
    masks = {n: (None if n == name else kept[n]) for n in tensors}
    bad = copy.copy(reply)
    bad.content = RecordDict(
        {"arrays": codec.to_array_record(codec.encode(forged, masks)), "metrics": reply.content["metrics"]}
    )
    reason = strategy.validate_reply(2, bad)
    assert reason is not None and "outside the round's mask" in reason and repr(name) in reason
