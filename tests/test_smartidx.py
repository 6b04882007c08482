"""SmartIdx (Wu et al., AAAI 2022) as an uplink compressor, in process (no Ray; the Ray run is
tests/test_smartidx_ray.py).

The selection is checked against an independent numpy implementation of the kernel rule and the
package split; the payload against the format's byte arithmetic (module docstring of
fedsparse/smartidx.py); the decode for exact positions and signs and, for the quantised values, the
package's mean (value bits 0) or its levels; the kernel package for one index per kernel; and the
method through the real strategy and client step on the loopback grid.
"""

from __future__ import annotations

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
from fedsparse.smartidx import PACKAGES, SmartIdx, package_bytes, select_packages
from strategies.compression import UplinkCompression


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    set_task_identity(node_id=0)


# ----------------------------------------------------------------------------- independent helpers


def _k(ratio: float, n: int) -> int:
    return min(n, max(1, int(math.floor(ratio * n + 0.5))))


def _leb128_len(value: int) -> int:
    length = 1
    while value >= 128:
        value >>= 7
        length += 1
    return length


def _golomb_len(positions: np.ndarray, b: int) -> int:
    """⌈Σ(q_i + 1 + b) / 8⌉ bytes over the gaps, written out here (not the codec's helper)."""
    gaps = np.diff(np.asarray(positions, np.int64), prepend=-1) - 1
    return (int(sum((int(g) >> b) + 1 + b for g in gaps)) + 7) // 8


def _reference_select(a: np.ndarray, ratio: float, threshold: float, pattern_min: int) -> dict:
    """The paper's rules on one tensor, in plain numpy and loops: top-k important entries; a kernel
    with ≥ ⌈threshold·n_k⌉ important entries is selected; selected kernels whose sign pattern at
    least ``pattern_min`` selected kernels share form pattern packages, the rest kernel packages;
    the other important entries are individual."""
    flat = a.reshape(-1)
    order = np.argsort(-np.abs(flat), kind="stable")
    important = np.zeros(flat.size, bool)
    important[order[: _k(ratio, flat.size)]] = True
    if a.ndim != 4 or a.shape[2] * a.shape[3] < 2:
        return {"ip": np.flatnonzero(important), "kp": [], "pp": {}}
    n_k = a.shape[2] * a.shape[3]
    selected, ip = [], []
    for j in range(flat.size // n_k):
        block = important[j * n_k : (j + 1) * n_k]
        if block.sum() >= math.ceil(threshold * n_k):
            selected.append(j)
        else:
            ip += [j * n_k + i for i in np.flatnonzero(block)]
    by_pattern: dict[tuple[bool, ...], list[int]] = {}
    for j in selected:
        by_pattern.setdefault(tuple(flat[j * n_k : (j + 1) * n_k] < 0), []).append(j)
    kp = sorted(j for group in by_pattern.values() if len(group) < pattern_min for j in group)
    pp = {p: group for p, group in by_pattern.items() if len(group) >= pattern_min}
    return {"ip": np.array(sorted(ip), np.int64), "kp": kp, "pp": pp}


def _conv_update(seed: int = 0) -> dict[str, np.ndarray]:
    """A conv update where some kernels are large as a whole (the structure SmartIdx exploits), a
    few of them with one of two shared sign patterns, plus a bias, an FC weight and an int buffer."""
    rng = np.random.default_rng(seed)
    w = (0.01 * rng.normal(size=(8, 6, 3, 3))).astype(np.float32)
    kernels = w.reshape(-1, 9)
    big = rng.choice(48, size=12, replace=False)
    kernels[big] = rng.normal(size=(12, 9)).astype(np.float32)
    pattern_a = np.array([1, -1, 1, 1, -1, 1, 1, 1, -1], np.float32)
    pattern_b = -pattern_a
    for j, p in zip(big[:7], [pattern_a] * 4 + [pattern_b] * 3):
        kernels[j] = p * (1 + rng.random(9)).astype(np.float32)
    return {
        "conv.weight": w,
        "conv.bias": rng.normal(size=8).astype(np.float32),
        "fc.weight": (0.1 * rng.normal(size=(10, 40))).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }


def _floats(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in tensors.items() if v.dtype.kind == "f"}


def _npy_overhead(arr: np.ndarray) -> int:
    buf = io.BytesIO()
    np.save(buf, np.zeros(arr.shape, arr.dtype), allow_pickle=False)
    return buf.tell() - arr.nbytes


def _header_json_len(blob: np.ndarray) -> int:
    return int.from_bytes(blob[:4].tobytes(), "little")


# ----------------------------------------------------------------------------- selection


def test_selection_follows_the_kernel_rule_and_the_package_split() -> None:
    update = _conv_update()
    w = update["conv.weight"]
    for ratio, threshold, pattern_min in ((0.25, 0.5, 2), (0.25, 0.8, 2), (0.3, 0.3, 3), (0.05, 0.5, 2)):
        got = select_packages(w, ratio, threshold, pattern_min)
        ref = _reference_select(w, ratio, threshold, pattern_min)
        np.testing.assert_array_equal(got.ip, ref["ip"])
        np.testing.assert_array_equal(got.kp, ref["kp"])
        assert {tuple(bool(b) for b in p): list(k) for p, k in got.pp} == ref["pp"]
    # the designed structure shows at the default rule: both shared patterns are pattern packages
    got = select_packages(w, 0.25, 0.5, 2)
    assert len(got.pp) == 2 and sorted(k.size for _, k in got.pp) == [3, 4]
    assert got.kp.size > 0 and got.ip.size > 0
    # a tensor without kernels (FC, bias, 1×1 conv) is all individual packages: the top-k entries
    for x in (update["fc.weight"], update["conv.bias"], np.ones((4, 3, 1, 1), np.float32)):
        pk = select_packages(x, 0.2, 0.5, 2)
        assert pk.n_k == 0 and pk.kp.size == 0 and pk.pp == []
        np.testing.assert_array_equal(pk.ip, _reference_select(x, 0.2, 0.5, 2)["ip"])


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("bits", [0, 3])
def test_round_trip_positions_and_signs_exact_values_by_package(bits: int) -> None:
    update = _conv_update()
    compressor = SmartIdx(0.25, value_bits=bits)
    payload, memory, stats = cc.compress_with_memory(update, compressor.round_config())
    decoded, raws = cc.decode_update(payload)
    np.testing.assert_array_equal(raws["bn.num_batches_tracked"], update["bn.num_batches_tracked"])
    sent_total = 0
    for name, a in _floats(update).items():
        d = decoded[name]
        assert d.dtype == a.dtype and d.shape == a.shape
        ref = _reference_select(a, 0.25, 0.5, 2)
        n_k = a.shape[2] * a.shape[3] if a.ndim == 4 else 0
        groups = {"ip": ref["ip"]}
        if n_k:
            groups["kp"] = np.concatenate([np.arange(j * n_k, (j + 1) * n_k) for j in ref["kp"]] or [[]]).astype(int)
            pp = [j for group in ref["pp"].values() for j in group]
            groups["pp"] = np.concatenate([np.arange(j * n_k, (j + 1) * n_k) for j in pp] or [[]]).astype(int)
        sent = np.zeros(a.size, bool)
        for package, where in groups.items():
            sent[where] = True
            orig, got = a.reshape(-1)[where].astype(np.float64), d.reshape(-1)[where].astype(np.float64)
            if not where.size:
                continue
            # signs travel exactly (a 0 entry counts as positive); a magnitude quantised to level 0
            # decodes to 0 whatever its sign
            nz = got != 0
            assert bits > 0 or nz.all()
            np.testing.assert_array_equal(got[nz] < 0, orig[nz] < 0, err_msg=f"{name} {package}")
            mags = np.abs(orig)
            if bits == 0:  # one magnitude per package: the package's mean |a|
                np.testing.assert_allclose(np.abs(got), np.float32(mags.mean()), rtol=1e-6, err_msg=package)
            else:  # 2^b uniform levels up to the package's largest |a|, nearest level
                step = float(np.float32(mags.max())) / (2**bits - 1)
                np.testing.assert_allclose(np.abs(got), np.rint(mags / step) * step, rtol=1e-5, atol=1e-7)
                assert np.abs(np.abs(got) - mags).max() <= step / 2 + 1e-6
        assert not d.reshape(-1)[~sent].any()  # nothing outside the packages
        sent_total += int(sent.sum())
        # error feedback keeps exactly what was not sent: e = a − C(a)
        np.testing.assert_allclose(memory.residual[name], a - d, atol=1e-7)
    assert stats["kept-fraction"] == pytest.approx(sent_total / sum(x.size for x in _floats(update).values()))


def test_round_trip_is_exact_where_the_quantiser_is_lossless() -> None:
    """±c entries (one magnitude per package) and magnitudes on the 2^b levels decode exactly."""
    rng = np.random.default_rng(3)
    signs = np.where(rng.random((6, 4, 3, 3)) < 0.5, -1.0, 1.0).astype(np.float32)
    binary = {"conv.weight": 0.125 * signs, "fc.weight": np.float32(0.5) * signs[:, :, 0, 0]}
    payload, _, _ = cc.compress_update(binary, SmartIdx(0.3, value_bits=0).round_config())
    decoded, _ = cc.decode_update(payload)
    masks = cc.SmartIdx(0.3).encode(binary, {}, 0, want_sent=False).masks
    assert masks is not None
    for name, a in binary.items():
        np.testing.assert_array_equal(decoded[name], np.where(masks[name], a, np.float32(0)))
    levels = {"conv.weight": (rng.integers(0, 8, size=(6, 4, 3, 3)) * signs / 7).astype(np.float32)}
    levels["conv.weight"].reshape(-1)[: 6 * 4 * 9] = np.float32(1.0) * signs.reshape(-1)  # max 1: scale is 1
    payload, _, _ = cc.compress_update(levels, SmartIdx(1.0, kernel_threshold=1.0, value_bits=3).round_config())
    decoded, _ = cc.decode_update(payload)
    np.testing.assert_array_equal(decoded["conv.weight"], levels["conv.weight"])


# ----------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("bits", [0, 4])
def test_bytes_equal_the_format_arithmetic(bits: int) -> None:
    """header = [4][JSON][meta varints][Golomb index streams][raw]; values = [float32 scale per
    non-empty package][b-bit codes per package][sign bits per package], each stream padded once."""
    update = _conv_update(1)
    ratio = 0.25
    payload, _, _ = cc.compress_with_memory(update, SmartIdx(ratio, value_bits=bits).round_config())
    assert set(payload) == {"header", "values"}
    head = json.loads(payload["header"][4 : 4 + _header_json_len(payload["header"])].tobytes())
    assert head["codec"] == "fedsparse-smartidx" and head["value_bits"] == bits
    meta = index = 0
    entries = dict.fromkeys(PACKAGES, 0)
    signbits = dict.fromkeys(PACKAGES, 0)
    parts = {f"{p}_{q}": 0 for p in PACKAGES for q in ("index", "value", "sign")}

    def index_set(positions: list[int] | np.ndarray, universe: int, package: str) -> None:
        nonlocal meta, index
        positions = np.asarray(positions, np.int64)
        b, length = codec.golomb_choose(positions, universe)
        if positions.size:
            assert length == _golomb_len(positions, b)  # the Golomb–Rice length, by hand
        meta += _leb128_len(positions.size) + _leb128_len(b) + _leb128_len(length)
        index += length
        parts[f"{package}_index"] += length

    for a in _floats(update).values():
        ref = _reference_select(a, ratio, 0.5, 2)
        index_set(ref["ip"], a.size, "ip")
        entries["ip"] += len(ref["ip"])
        signbits["ip"] += len(ref["ip"])
        if a.ndim == 4:
            n_k, kernels = a.shape[2] * a.shape[3], a.shape[0] * a.shape[1]
            index_set(ref["kp"], kernels, "kp")
            meta += _leb128_len(len(ref["pp"]))
            for group in sorted(ref["pp"].items()):  # patterns in ascending order of their sign tuple
                index_set(group[1], kernels, "pp")
            entries["kp"] += n_k * len(ref["kp"])
            signbits["kp"] += n_k * len(ref["kp"])
            entries["pp"] += n_k * sum(len(g) for g in ref["pp"].values())
            signbits["pp"] += n_k * len(ref["pp"])  # ONE sign set per pattern
    # scales: one float32 per non-empty package per tensor
    scales = 4 * sum(
        int(len(r["ip"]) > 0) + int(len(r["kp"]) > 0) + int(len(r["pp"]) > 0)
        for r in (_reference_select(a, ratio, 0.5, 2) for a in _floats(update).values())
    )
    raw = update["bn.num_batches_tracked"].nbytes
    expected = {
        "header": 4 + _header_json_len(payload["header"]) + meta + index + raw,
        "values": scales
        + sum(math.ceil(entries[p] * bits / 8) for p in PACKAGES)
        + sum(math.ceil(signbits[p] / 8) for p in PACKAGES),
    }
    assert {k: a.nbytes for k, a in payload.items()} == expected
    assert head["meta_len"] == meta
    metered = array_record_bytes(codec.to_array_record(payload))
    assert metered == {k: _npy_overhead(payload[k]) + n + len(k) for k, n in expected.items()}
    # the per-package report: its parts and the header overhead are the arrays' sizes exactly
    report = package_bytes(payload)
    for key, value in parts.items():
        if key.endswith("_index"):
            assert report[key] == value
    for p in PACKAGES:
        assert report[f"{p}_sign"] == math.ceil(signbits[p] / 8)
        assert report[f"{p}_entries"] == entries[p]
    assert report["header"] + sum(report[f"{p}_{q}"] for p in PACKAGES for q in ("index", "value", "sign")) == sum(
        expected.values()
    )


def test_kernel_package_shares_one_index_per_kernel() -> None:
    """A KP kernel costs one kernel number in the index (not n_k positions), and the pattern package
    one index set per pattern and n_k signs per pattern (not per kernel)."""
    rng = np.random.default_rng(7)
    w = (0.001 * rng.normal(size=(16, 8, 3, 3))).astype(np.float32)
    chosen = np.sort(rng.choice(128, size=20, replace=False))
    w.reshape(-1, 9)[chosen] = rng.normal(size=(20, 9)).astype(np.float32)  # 20 kernels, random signs
    # pattern_min larger than any pattern count: every selected kernel is a kernel package
    compressor = SmartIdx(20 * 9 / w.size, kernel_threshold=1.0, pattern_min=21)
    pk = compressor.select({"w": w})["w"]
    np.testing.assert_array_equal(pk.kp, chosen)
    assert pk.ip.size == 0 and pk.pp == []
    payload = compressor.encode({"w": w}, {}, 0, want_sent=False).payload
    report = package_bytes(payload)
    b, one_per_kernel = codec.golomb_choose(chosen, 128)
    assert report["kp_index"] == one_per_kernel == _golomb_len(chosen, b)
    assert report["kp_kernels"] == 20 and report["kp_entries"] == 180 and report["ip_index"] == 0
    # the same entries as individual positions (Top-k's view) need a longer index
    positions = (chosen[:, None] * 9 + np.arange(9)).reshape(-1)
    assert codec.golomb_choose(positions, w.size)[1] > 2 * report["kp_index"]
    decoded, _ = cc.decode_update(payload)
    whole = decoded["w"].reshape(-1, 9)
    assert (whole[chosen] != 0).all() and not np.delete(whole, chosen, axis=0).any()  # whole kernels, nothing else
    # one shared pattern: one index set and 9 signs for all its kernels
    same = np.abs(w.reshape(-1, 9)[chosen]) * np.where(np.arange(9) % 2, -1, 1)
    w.reshape(-1, 9)[chosen] = same
    payload = SmartIdx(20 * 9 / w.size, kernel_threshold=1.0).encode({"w": w}, {}, 0, want_sent=False).payload
    report = package_bytes(payload)
    assert (report["pp_patterns"], report["pp_kernels"], report["kp_kernels"]) == (1, 20, 0)
    assert report["pp_sign"] == 2 and report["pp_index"] == one_per_kernel  # 9 sign bits -> 2 bytes
    decoded, _ = cc.decode_update(payload)
    np.testing.assert_array_equal(np.sign(decoded["w"].reshape(-1, 9)[chosen]), np.sign(same))


def test_decode_rejects_bad_payloads() -> None:
    payload, _, _ = cc.compress_with_memory(_conv_update(), SmartIdx(0.2, value_bits=2).round_config())
    with pytest.raises(ValueError, match="holds exactly the arrays"):
        cc.decode_update({**payload, "smuggled": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="cut short|truncated"):
        cc.decode_update({**payload, "values": payload["values"][:-1]})
    with pytest.raises(ValueError, match="trailing"):
        cc.decode_update({**payload, "values": np.concatenate([payload["values"], np.zeros(1, np.uint8)])})
    with pytest.raises(ValueError, match="uint8"):
        cc.decode_update({**payload, "values": payload["values"].astype(np.float32)})
    with pytest.raises(ValueError, match="truncated|trailing|cut short|corrupt"):
        cc.decode_update({**payload, "header": payload["header"][:-3]})


def test_compressor_options_are_checked() -> None:
    for kwargs, match in (
        ({"value_bits": 9}, "value_bits"),
        ({"pattern_min": 1}, "pattern_min"),
        ({"kernel_threshold": 0.0}, "kernel_threshold"),
    ):
        with pytest.raises(ValueError, match=match):
            SmartIdx(0.1, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ratio"):
        SmartIdx(0.0)
    config = SmartIdx(0.2, kernel_threshold=0.7, pattern_min=3, value_bits=2).round_config()
    again = cc.compressor_from_config(config)
    assert isinstance(again, SmartIdx) and again.round_config() == config and again.error_feedback


# ----------------------------------------------------------------------------- through the real round


def test_config_keys_and_errors() -> None:
    with pytest.raises(ConfigError, match="smartidx-value-bits = 9"):
        tiny_cfg(strategy="smartidx", **{"smartidx-value-bits": 9})
    with pytest.raises(ConfigError, match="smartidx-pattern-min"):
        tiny_cfg(strategy="smartidx", **{"smartidx-pattern-min": 1})
    with pytest.raises(ConfigError, match="smartidx-kernel-threshold"):
        tiny_cfg(strategy="smartidx", **{"smartidx-kernel-threshold": 1.5})
    cfg = tiny_cfg(
        strategy="smartidx",
        **{"smartidx-value-bits": 3, "smartidx-pattern-min": 4, "smartidx-error-feedback": False},
    )
    compressor = build_strategy(cfg).compressor
    assert isinstance(compressor, SmartIdx)
    assert (compressor.value_bits, compressor.pattern_min, compressor.error_feedback) == (3, 4, False)
    assert UplinkCompression("smartidx", ratio=0.05).compressor.error_feedback


def test_in_process_rounds_report_bytes_by_package() -> None:
    cfg = tiny_cfg(strategy="smartidx", **{"compress-ratio": 0.1})
    grid = loopback_grid(cfg, 4)
    strat = build_strategy(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    for t in (1, 2):
        with seeded_sampling(5, t):
            msgs = list(strat.configure_train(t, arrays, ConfigRecord({"server-round": t}), grid))
        replies = list(grid.send_and_receive(msgs))
        assert all(m.content["config"][cc.CFG_METHOD] == "smartidx" for m in msgs)
        assert all(strat.validate_reply(t, r) is None for r in replies)
        new, _ = strat.aggregate_train(t, replies)
        payloads = [codec.from_array_record(r.content["arrays"]) for r in replies]
        counts = [int(r.content["metrics"]["num-examples"]) for r in replies]
        decoded = [cc.decode_update(p)[0] for p in payloads]
        for name, x in arrays.items():
            expected = x.numpy().astype(np.float64) + sum(c / sum(counts) * d[name] for c, d in zip(counts, decoded))
            np.testing.assert_allclose(new[name].numpy(), expected, rtol=1e-6, atol=1e-7)
        report = strat.round_report(t)
        assert report["compressor"] == "smartidx" and report["smartidx_value_bits"] == 0
        parts = [f"smartidx_{p}_{q}" for p in PACKAGES for q in ("index", "value", "sign")]
        # the columns are the round's replies summed, and with the header they are the payload bytes
        for key in [*parts, "smartidx_header", "smartidx_pp_kernels", "smartidx_kp_kernels"]:
            assert report[key] == sum(package_bytes(p)[key.removeprefix("smartidx_")] for p in payloads)
        assert sum(report[k] for k in parts) + report["smartidx_header"] == sum(
            a.nbytes for p in payloads for a in p.values()
        )
        assert report["smartidx_ip_index"] > 0  # LeNet-5's FC layers always fall back to IP
        arrays = new
    touched = [grid.contexts[m.metadata.dst_node_id] for m in grid.exchanges[0][0]]
    assert all(cc.RESIDUAL_STATE_KEY in c.state for c in touched)


def test_bn_buffers_keep_their_0d_shape_across_rounds() -> None:
    """BatchNorm's ``num_batches_tracked`` is a 0-d integer array: the aggregate must keep it 0-d
    (``np.ascontiguousarray`` made it (1,), and every client's round-2 reply was then refused)."""
    cfg = tiny_cfg(strategy="smartidx", model="resnet20", **{"local-steps": 1, "batch-size": 8})
    grid = loopback_grid(cfg, 4)
    strat = build_strategy(cfg)
    arrays = ArrayRecord(initial_model(cfg).state_dict())
    buffers = [k for k, a in arrays.items() if k.endswith("num_batches_tracked")]
    assert buffers and all(arrays[k].numpy().shape == () for k in buffers)
    for t in (1, 2):
        with seeded_sampling(5, t):
            msgs = list(strat.configure_train(t, arrays, ConfigRecord({"server-round": t}), grid))
        replies = list(grid.send_and_receive(msgs))
        assert all(strat.validate_reply(t, r) is None for r in replies)
        arrays, _ = strat.aggregate_train(t, replies)
        assert all(arrays[k].numpy().shape == () and int(arrays[k].numpy()) == t for k in buffers)
