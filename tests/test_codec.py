"""Tests for fedsparse.codec: exact round trips, index choice by measured size, quantisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedsparse import codec
from fedsparse.codec import (
    coords_decode,
    coords_encode,
    decode,
    encode,
    from_array_record,
    index_kinds,
    payload_nbytes,
    shannon_bound_bytes,
    tensor_nbytes,
    to_array_record,
    varint_decode,
    varint_encode,
)
from fedsparse.models import build_model

SHAPES = [(1,), (7,), (6, 1, 5, 5), (120, 400), (3, 4, 5), (1000,)]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]


def random_mask(rng: np.random.Generator, shape: tuple[int, ...], sparsity: float) -> np.ndarray:
    """Exactly round((1 - sparsity)·n) kept entries at random positions."""
    n = math.prod(shape)
    k = int(round((1 - sparsity) * n))
    flat = np.zeros(n, dtype=bool)
    flat[rng.choice(n, size=k, replace=False)] = True
    return flat.reshape(shape)


def header_len(arrays: dict[str, np.ndarray]) -> int:
    return 4 + int.from_bytes(arrays["index"][:4].tobytes(), "little")


def assert_exact(orig: np.ndarray, mask: np.ndarray, dec: np.ndarray, dmask: np.ndarray) -> None:
    assert dec.dtype == orig.dtype and dec.shape == orig.shape
    np.testing.assert_array_equal(dmask, mask)
    # Bitwise equality of kept values (NaN and -0.0 included), exact zeros elsewhere.
    np.testing.assert_array_equal(dec[mask].view(np.uint32), orig[mask].view(np.uint32))
    assert not dec[~mask].any()
    assert not np.signbit(dec[~mask]).any()


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_exact_round_trip_float32(sparsity: float) -> None:
    rng = np.random.default_rng(int(sparsity * 1000))
    tensors = {f"t{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(SHAPES)}
    tensors["t2"].reshape(-1)[:4] = [np.nan, -0.0, np.inf, 1e-45]  # odd bit patterns survive
    masks = {name: random_mask(rng, t.shape, sparsity) for name, t in tensors.items()}
    masks["t2"].reshape(-1)[:4] = True if sparsity < 1.0 else False
    arrays = encode(tensors, masks)
    assert set(arrays) == {"index", "values"}
    assert arrays["values"].dtype == np.float32
    dec, dmasks = decode(arrays)
    assert list(dec) == list(tensors)
    for name in tensors:
        assert_exact(tensors[name], masks[name], dec[name], dmasks[name])
    kinds = set(index_kinds(arrays).values())
    if sparsity == 0.0:
        assert kinds == {"dense"}
    if sparsity == 1.0:
        assert kinds == {"coords"}  # empty coordinate lists: zero index bytes
        assert arrays["values"].size == 0
        assert arrays["index"].size == header_len(arrays)


def test_edge_cases_one_element_empty_mask_none_and_int() -> None:
    rng = np.random.default_rng(1)
    tensors = {
        "one_kept": np.array([3.5], dtype=np.float32),
        "one_dropped": np.array([[2.0]], dtype=np.float32),
        "scalar": np.array(1.25, dtype=np.float32),
        "none_kept": rng.standard_normal((50, 10)).astype(np.float32),
        "all_kept": rng.standard_normal((4, 4)).astype(np.float32),
        "bias": rng.standard_normal(16).astype(np.float32),
        "zero_size": np.zeros((0, 5), dtype=np.float32),
        "f64": rng.standard_normal(33),
        "num_batches_tracked": np.array(123456789012, dtype=np.int64),
    }
    masks = {
        "one_kept": np.array([True]),
        "one_dropped": np.array([[False]]),
        "scalar": None,
        "none_kept": np.zeros((50, 10), dtype=bool),
        "all_kept": np.ones((4, 4), dtype=bool),
        "zero_size": np.zeros((0, 5), dtype=bool),
        "f64": rng.random(33) < 0.3,
        # "bias" absent from masks: sent dense
    }
    arrays = encode(tensors, masks)
    dec, dmasks = decode(arrays)
    kinds = index_kinds(arrays)
    assert kinds["one_kept"] == "dense" and kinds["all_kept"] == "dense"
    assert kinds["scalar"] == "dense" and kinds["bias"] == "dense"
    assert kinds["one_dropped"] == "coords" and kinds["none_kept"] == "coords"
    assert kinds["num_batches_tracked"] == "raw"
    stats = tensor_nbytes(arrays)
    assert stats["none_kept"] == {
        "kind": "coords",
        "numel": 500,
        "nnz": 0,
        "index_bytes": 0,
        "value_bytes": 0,
    }
    assert stats["all_kept"]["index_bytes"] == 0 and stats["all_kept"]["nnz"] == 16
    for name, t in tensors.items():
        assert dec[name].dtype == t.dtype and dec[name].shape == t.shape
        m = np.ones(t.shape, bool) if masks.get(name) is None else masks[name]
        np.testing.assert_array_equal(dmasks[name], m)
        if t.dtype == np.float32:
            assert_exact(t, m, dec[name], dmasks[name])
    assert dec["num_batches_tracked"] == 123456789012
    # float64 goes through float32 values: exact to float32 rounding, dtype restored.
    np.testing.assert_array_equal(dec["f64"], np.where(masks["f64"], tensors["f64"].astype(np.float32), 0.0))


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.85, 0.87, 0.88, 0.9, 0.95, 0.99, 0.999])
def test_index_kind_is_the_smaller_measured_encoding(sparsity: float) -> None:
    rng = np.random.default_rng(7)
    shapes = [(120, 400), (16, 6, 5, 5), (4096, 256), (84, 120), (10, 84)]
    tensors = {f"w{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    masks = {n: random_mask(rng, t.shape, sparsity) for n, t in tensors.items()}
    # Clustered mask: one long run, all gaps 0 — still one byte per kept entry, so coords only
    # wins once fewer than n/8 entries are kept.
    clustered = np.zeros(4096 * 256, dtype=bool)
    start = int(rng.integers(0, clustered.size // 2))
    clustered[start : start + int((1 - sparsity) * clustered.size)] = True
    tensors["clustered"] = rng.standard_normal((4096, 256)).astype(np.float32)
    masks["clustered"] = clustered.reshape(4096, 256)
    arrays = encode(tensors, masks)
    kinds, stats = index_kinds(arrays), tensor_nbytes(arrays)
    total_index = 0
    for name, m in masks.items():
        bitmap = np.packbits(m.reshape(-1))
        coords = coords_encode(np.flatnonzero(m))
        np.testing.assert_array_equal(coords_decode(coords, int(m.sum())), np.flatnonzero(m))
        expected = "coords" if coords.size < bitmap.size else "bitmap"
        assert kinds[name] == expected, (name, coords.size, bitmap.size)
        assert stats[name]["index_bytes"] == min(coords.size, bitmap.size)
        total_index += min(coords.size, bitmap.size)
    assert arrays["index"].size == header_len(arrays) + total_index
    if sparsity <= 0.8:
        assert kinds["w0"] == "bitmap"
    if sparsity >= 0.95:
        assert kinds["w0"] == "coords"
    assert kinds["clustered"] == ("coords" if sparsity > 0.875 else "bitmap")


def test_tie_goes_to_bitmap() -> None:
    # n = 16 → bitmap 2 bytes; 2 kept entries with small gaps → coords 2 bytes: tie.
    t = {"w": np.arange(16, dtype=np.float32)}
    m = np.zeros(16, dtype=bool)
    m[[3, 9]] = True
    assert coords_encode(np.flatnonzero(m)).size == 2
    assert index_kinds(encode(t, {"w": m})) == {"w": "bitmap"}


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_payload_smaller_than_dense_for_lenet5(sparsity: float) -> None:
    rng = np.random.default_rng(3)
    state = {k: v.numpy() for k, v in build_model("lenet5", 10, 1, 28).state_dict().items()}
    masks = {k: random_mask(rng, v.shape, sparsity) if v.ndim > 1 else None for k, v in state.items()}
    dense_bytes = sum(v.nbytes for v in state.values())
    assert dense_bytes == 61706 * 4
    arrays = encode(state, masks)
    nbytes = payload_nbytes(arrays)
    assert nbytes == arrays["index"].nbytes + arrays["values"].nbytes
    assert nbytes < dense_bytes
    prunable = sum(v.size for v in state.values() if v.ndim > 1)
    # kept values + dense biases + at most a bitmap per tensor + a small header
    bound = (1 - sparsity) * 4 * prunable + (dense_bytes - 4 * prunable) + prunable / 8 + 1024
    assert nbytes < bound
    dec, _ = decode(arrays)
    for k, v in state.items():
        np.testing.assert_array_equal(dec[k], v if masks[k] is None else np.where(masks[k], v, 0))


def test_fp16_within_one_step() -> None:
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((64, 300)) * 10.0 ** rng.uniform(-4, 3, (64, 300))).astype(np.float32)
    m = rng.random(x.shape) < 0.2
    arrays = encode({"w": x}, {"w": m}, value_bits=16)
    assert arrays["values"].dtype == np.float16
    dec, dm = decode(arrays)
    assert dec["w"].dtype == np.float32
    np.testing.assert_array_equal(dm["w"], m)
    kept = x[m]
    step = np.spacing(np.abs(kept).astype(np.float16)).astype(np.float64)
    err = np.abs(dec["w"][m].astype(np.float64) - kept)
    assert (err <= step).all()
    assert err.max() > 0  # actually quantised
    assert not dec["w"][~m].any()
    assert arrays["values"].nbytes == 2 * m.sum()


def test_fp16_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="float16 range"):
        encode({"w": np.array([1e6, 1.0], dtype=np.float32)}, {}, value_bits=16)


def test_8bit_within_one_step_per_tensor() -> None:
    rng = np.random.default_rng(5)
    tensors = {
        "a": rng.standard_normal((50, 80)).astype(np.float32),
        "b": (rng.standard_normal(500) * 100 + 7).astype(np.float32),
        "const": np.full(9, 2.5, dtype=np.float32),
    }
    masks = {"a": rng.random((50, 80)) < 0.1, "b": None, "const": None}
    arrays = encode(tensors, masks, value_bits=8)
    assert arrays["values"].dtype == np.uint8
    assert arrays["values"].size == masks["a"].sum() + 500 + 9
    dec, _ = decode(arrays)
    for name, x in tensors.items():
        m = np.ones(x.shape, bool) if masks[name] is None else masks[name]
        kept = x[m].astype(np.float64)
        scale = (kept.max() - kept.min()) / 255
        err = np.abs(dec[name][m].astype(np.float64) - kept)
        assert (err <= scale + 1e-6 * max(1.0, np.abs(kept).max())).all(), name
        assert dec[name].dtype == np.float32
        assert not dec[name][~m].any()
    np.testing.assert_array_equal(dec["const"], tensors["const"])
    assert np.abs(dec["a"][masks["a"]] - tensors["a"][masks["a"]]).max() > 0


def test_8bit_rejects_nan() -> None:
    with pytest.raises(ValueError, match="finite"):
        encode({"w": np.array([np.nan, 1.0], dtype=np.float32)}, {}, value_bits=8)


@pytest.mark.parametrize("bits", [0, 4, 24, 64, "32"])
def test_invalid_value_bits_lists_choices(bits: object) -> None:
    with pytest.raises(ValueError, match="32, 16, 8"):
        encode({"w": np.zeros(3, np.float32)}, {}, value_bits=bits)  # type: ignore[arg-type]  # invalid on purpose


def test_bad_masks_are_clear_errors() -> None:
    t = {"w": np.zeros((2, 3), np.float32), "n": np.array(1, np.int64)}
    with pytest.raises(ValueError, match="shape"):
        encode(t, {"w": np.ones((3, 2), bool)})
    with pytest.raises(ValueError, match="boolean"):
        encode(t, {"w": np.ones((2, 3), np.float32)})
    with pytest.raises(ValueError, match="unknown tensors.*'x'"):
        encode(t, {"x": None})
    with pytest.raises(ValueError, match="'n'.*int64"):
        encode(t, {"n": np.array(True)})


def test_array_record_round_trip() -> None:
    rng = np.random.default_rng(6)
    tensors = {
        "conv.weight": rng.standard_normal((16, 6, 5, 5)).astype(np.float32),
        "conv.bias": rng.standard_normal(16).astype(np.float32),
    }
    masks = {"conv.weight": rng.random((16, 6, 5, 5)) < 0.1}
    for bits in (32, 16, 8):
        arrays = encode(tensors, masks, value_bits=bits)
        record = to_array_record(arrays)
        assert isinstance(record, ArrayRecord) and len(record) == 2
        back = from_array_record(record)
        assert set(back) == set(arrays)
        for k in arrays:
            assert back[k].dtype == arrays[k].dtype
            np.testing.assert_array_equal(back[k], arrays[k])
        d1, m1 = decode(arrays)
        d2, m2 = decode(back)
        for k in tensors:
            np.testing.assert_array_equal(d1[k], d2[k])
            np.testing.assert_array_equal(m1[k], m2[k])


def test_varint_known_bytes_and_large_gaps() -> None:
    assert varint_encode(np.array([0, 1, 127, 128, 300])).tolist() == [0, 1, 127, 128, 1, 172, 2]
    assert varint_encode(np.array([2**21])).size == 4
    assert varint_encode(np.array([2**64 - 1], dtype=np.uint64)).size == 10
    rng = np.random.default_rng(8)
    vals = np.concatenate(
        [
            rng.integers(0, 128, 1000),
            rng.integers(2**21, 2**35, 1000),
            rng.integers(0, 2**63 - 1, 100, dtype=np.int64),
            [2**21, 2**21 - 1, 2**28, 0],
        ]
    ).astype(np.uint64)
    rng.shuffle(vals)
    enc = varint_encode(vals)
    # Pure-Python LEB128 reference for the byte layout.
    ref = bytearray()
    for v in vals.tolist():
        while True:
            b, v = v & 0x7F, v >> 7
            ref.append(b | (0x80 if v else 0))
            if not v:
                break
    assert enc.tobytes() == bytes(ref)
    np.testing.assert_array_equal(varint_decode(enc, vals.size), vals)
    # Coordinates with gaps > 2^21 inside a huge (virtual) tensor.
    pos = np.cumsum(rng.integers(2**21, 2**24, 500)).astype(np.int64)
    np.testing.assert_array_equal(coords_decode(coords_encode(pos), pos.size), pos)


def test_varint_decode_rejects_corrupt_streams() -> None:
    with pytest.raises(ValueError, match="truncated"):
        varint_decode(np.array([0x81, 0x80], dtype=np.uint8))
    with pytest.raises(ValueError, match="expected 3"):
        varint_decode(np.array([1, 2], dtype=np.uint8), 3)


def test_large_gaps_in_a_real_tensor() -> None:
    n = 3 * 2**21 + 5
    x = np.arange(n, dtype=np.float32)
    m = np.zeros(n, dtype=bool)
    m[[0, 2**21 + 1, n - 1]] = True
    arrays = encode({"w": x}, {"w": m})
    assert index_kinds(arrays) == {"w": "coords"}
    assert tensor_nbytes(arrays)["w"]["index_bytes"] == 1 + 4 + 4
    dec, dm = decode(arrays)
    np.testing.assert_array_equal(np.flatnonzero(dm["w"]), [0, 2**21 + 1, n - 1])
    assert dec["w"][n - 1] == np.float32(n - 1)


def test_decode_rejects_foreign_payloads() -> None:
    with pytest.raises(ValueError, match="missing arrays"):
        decode({"values": np.zeros(1, np.float32)})
    arrays = encode({"w": np.ones(4, np.float32)}, {})
    with pytest.raises(ValueError, match="dtype"):
        decode({"index": arrays["index"], "values": arrays["values"].astype(np.float16)})
    with pytest.raises(ValueError, match="cut short"):
        decode({"index": arrays["index"], "values": arrays["values"][:2]})
    with pytest.raises(ValueError, match=r"unexpected arrays \['smuggled'\]"):
        decode({**arrays, "smuggled": np.zeros(3, np.float32)})


def test_shannon_bound() -> None:
    assert shannon_bound_bytes(8, 4) == pytest.approx(1.0)
    assert shannon_bound_bytes(100, 0) == 0.0 and shannon_bound_bytes(100, 100) == 0.0
    p = 0.01
    h = -p * math.log2(p) - (1 - p) * math.log2(1 - p)
    assert shannon_bound_bytes(10_000, 100) == pytest.approx(10_000 * h / 8)
    rng = np.random.default_rng(9)
    m = random_mask(rng, (100_000,), 0.99)
    measured = min(np.packbits(m).size, coords_encode(np.flatnonzero(m)).size)
    assert shannon_bound_bytes(m.size, int(m.sum())) < measured  # a bound, not an estimate
    with pytest.raises(ValueError, match="k <= n"):
        shannon_bound_bytes(10, 11)


def test_value_bits_constant_is_public() -> None:
    assert codec.VALUE_BITS == (32, 16, 8)
