"""Tests for fedsparse.codec: exact round trips, index choice by measured size, quantisation."""

from __future__ import annotations

import json
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
    golomb_choose,
    golomb_decode,
    golomb_encode,
    golomb_nbytes,
    index_kinds,
    parse_header,
    payload_nbytes,
    rice_parameter,
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


def rice_b(n: int, k: int) -> int:
    """The issue's formula, written out independently of the codec."""
    return max(0, round(math.log2(math.log(2) * n / k))) if k else 0


def golomb_len_arith(positions: np.ndarray, b: int) -> int:
    """⌈Σ(q_i + 1 + b) / 8⌉ with q_i = g_i // 2^b, in Python integers."""
    gaps = np.diff(np.concatenate([[-1], positions])).astype(np.int64) - 1
    return (sum(int(g) // 2**b + 1 + b for g in gaps) + 7) // 8


def expected_index(m: np.ndarray) -> tuple[str, int, int | None]:
    """(kind, index bytes, b) the chooser must pick for mask m: the fewest payload bytes of bitmap,
    coords and golomb (golomb's b: the formula's or a neighbour where shorter; its bytes: the
    index plus the entry "b," in the header's rice list), ties bitmap → coords → golomb."""
    pos = np.flatnonzero(m)
    n, k = m.size, pos.size
    if k == n:
        return "dense", 0, None
    b0 = rice_b(n, k)
    golomb = [(golomb_len_arith(pos, b), b) for b in (b0, b0 - 1, b0 + 1) if 0 <= b <= max(1, n.bit_length())]
    g_len, g_b = min(golomb, key=lambda t: t[0])  # min keeps the first of equal lengths
    cands = [
        ("bitmap", (n + 7) // 8, None, 0),
        ("coords", coords_encode(pos).size, None, 0),
        ("golomb", g_len, g_b, len(f"{g_b},")),
    ]
    kind, length, b, _ = min(cands, key=lambda c: c[1] + c[3])
    return kind, length, b


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.85, 0.87, 0.88, 0.9, 0.95, 0.99, 0.999])
def test_index_kind_is_the_smallest_measured_encoding(sparsity: float) -> None:
    rng = np.random.default_rng(7)
    shapes = [(120, 400), (16, 6, 5, 5), (4096, 256), (84, 120), (10, 84)]
    tensors = {f"w{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    masks = {n: random_mask(rng, t.shape, sparsity) for n, t in tensors.items()}
    # Clustered mask: one long run, all gaps 0 — one byte per kept entry as coords, one bit as
    # golomb (b = 0), and nothing for the zeros after the run (unlike the bitmap).
    clustered = np.zeros(4096 * 256, dtype=bool)
    start = int(rng.integers(0, clustered.size // 2))
    clustered[start : start + int((1 - sparsity) * clustered.size)] = True
    tensors["clustered"] = rng.standard_normal((4096, 256)).astype(np.float32)
    masks["clustered"] = clustered.reshape(4096, 256)
    arrays = encode(tensors, masks)
    header, _ = parse_header(arrays["index"])
    kinds, stats = index_kinds(arrays), tensor_nbytes(arrays)
    total_index = 0
    rice = []
    for name, m in masks.items():
        kind, length, b = expected_index(m)
        assert (kinds[name], stats[name]["index_bytes"]) == (kind, length), name
        if b is not None:
            rice.append(b)
        total_index += length
        coords = coords_encode(np.flatnonzero(m))
        np.testing.assert_array_equal(coords_decode(coords, int(m.sum())), np.flatnonzero(m))
    assert header["rice"] == rice
    assert arrays["index"].size == header_len(arrays) + total_index
    # i.i.d. masks at these densities: golomb everywhere (bitmap ties it at k = 1/2)
    assert kinds["w0"] == ("bitmap" if sparsity == 0.5 else "golomb")
    assert kinds["w2"] == ("bitmap" if sparsity == 0.5 else "golomb")
    # a run far from i.i.d.: b stays near the k/n formula (± 1), so at k = 0.001 (b ≈ 9, ≥ 9 bits
    # per entry) the one-byte varints win
    assert kinds["clustered"] == ("coords" if sparsity == 0.999 else "golomb")
    # and never larger than the bitmap / coords choice of the codec before golomb
    before = encode(tensors, masks, allowed_kinds=("bitmap", "coords"))
    assert payload_nbytes(arrays) <= payload_nbytes(before)
    dec, dm = decode(arrays)
    for name, t in tensors.items():
        assert_exact(t, masks[name], dec[name], dm[name])


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


# ----------------------------------------------------------------------------------- golomb


def golomb_reference_bytes(positions: list[int], b: int) -> bytes:
    """Pure-Python encoder of the documented layout: the k remainders g mod 2^b in b bits each,
    MSB first, then the k quotients g >> b in unary (q zeros, a one), packed MSB first and
    zero-padded to a byte."""
    gaps = [p - prev - 1 for prev, p in zip([-1, *positions[:-1]], positions)]
    bits = "".join(format(g % 2**b, f"0{b}b") for g in gaps) if b else ""
    bits += "".join("0" * (g >> b) + "1" for g in gaps)
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))


def test_rice_parameter_formula() -> None:
    assert rice_parameter(1000, 1) == 9  # log2(693.1) = 9.44
    assert rice_parameter(10, 1) == 3  # log2(6.93) = 2.79
    assert rice_parameter(2, 1) == 0 and rice_parameter(5, 5) == 0 and rice_parameter(100, 0) == 0
    for n, k in [(61706, 62), (61706, 6171), (11_000_000, 1_100_000), (48000, 14400)]:
        assert rice_parameter(n, k) == rice_b(n, k)


@pytest.mark.parametrize("n", [1, 2, 9, 150, 4096, 61706])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.01, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_golomb_round_trip_and_layout(n: int, density: float) -> None:
    rng = np.random.default_rng(n + int(density * 1000))
    k = round(density * n)
    pos = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    b0 = rice_parameter(n, k)
    for b in sorted({0, 1, b0, b0 + 1, max(1, n.bit_length())}):
        data = golomb_encode(pos, b)
        assert data.dtype == np.uint8
        assert data.size == golomb_len_arith(pos, b) == golomb_nbytes(pos, b)
        if n <= 4096:
            assert data.tobytes() == golomb_reference_bytes(pos.tolist(), b)
        np.testing.assert_array_equal(golomb_decode(data, k, b, n), pos)
        np.testing.assert_array_equal(golomb_decode(data, k, b), pos)
    if k:
        b, nbytes = golomb_choose(pos, n)
        assert nbytes == min(golomb_len_arith(pos, c) for c in (b0 - 1, b0, b0 + 1) if 0 <= c <= max(1, n.bit_length()))
        assert nbytes == golomb_len_arith(pos, b) and abs(b - b0) <= 1


def test_golomb_large_parameter_and_gaps() -> None:
    # a wide remainder (b > 32) and quotients that are long runs of zeros
    pos = np.array([0, 5, 2**40, 2**40 + 1, 3 * 2**40 + 12345], dtype=np.int64)
    for b in (20, 33, 41):  # (smaller b: 2^(40 - b) zero bits per quotient, too many to build)
        data = golomb_encode(pos, b)
        assert data.size == golomb_len_arith(pos, b)
        np.testing.assert_array_equal(golomb_decode(data, pos.size, b, 4 * 2**40), pos)


def edge_masks(shape: tuple[int, ...], rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = math.prod(shape)
    flat: dict[str, np.ndarray] = {}
    for name, idx in [
        ("first", [0]),
        ("last", [n - 1]),
        ("first_and_last", [0, n - 1]),
        ("middle", [n // 2]),
        ("empty", []),
    ]:
        f = np.zeros(n, dtype=bool)
        f[idx] = True
        flat[name] = f
    flat["all_but_one"] = np.ones(n, dtype=bool)
    flat["all_but_one"][n // 2] = False
    flat["all"] = np.ones(n, dtype=bool)
    for d in (0.01, 0.1, 0.3, 0.7):
        flat[f"random_{d}"] = random_mask(rng, (n,), 1 - d).reshape(-1)
        flat[f"random_{d}"][[0, n - 1]] = True
    return {k: v.reshape(shape) for k, v in flat.items()}


@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (2, 3), (6, 1, 5, 5), (120, 400), (3, 4, 5)])
def test_golomb_coded_tensors_round_trip_exactly(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(math.prod(shape))
    masks = edge_masks(shape, rng)
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name in masks}
    for t in tensors.values():
        t.reshape(-1)[: min(3, t.size)] = [np.nan, -0.0, 1e-45][: min(3, t.size)]
    for allowed in (("golomb",), codec.INDEX_KINDS):
        arrays = encode(tensors, masks, allowed_kinds=allowed)
        kinds = index_kinds(arrays)
        dec, dm = decode(arrays)
        for name, m in masks.items():
            assert_exact(tensors[name], m, dec[name], dm[name])
            if allowed == ("golomb",):
                assert kinds[name] == ("dense" if m.all() else "golomb"), name
        if allowed == ("golomb",):
            assert tensor_nbytes(arrays)["empty"]["index_bytes"] == 0
    finite = {name: np.nan_to_num(t) for name, t in tensors.items()}
    for bits in (16, 8):
        arrays = encode(finite, masks, bits, allowed_kinds=("golomb",))
        _, dm = decode(arrays)
        for name, m in masks.items():
            np.testing.assert_array_equal(dm[name], m)


@pytest.mark.parametrize("density", [0.003, 0.02, 0.1, 0.25, 0.4])
def test_golomb_index_length_is_the_formats_arithmetic(density: float) -> None:
    rng = np.random.default_rng(int(density * 1000))
    shapes = [(120, 400), (16, 6, 5, 5), (84, 120), (512, 1000)]
    tensors = {f"w{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    masks = {n: rng.random(t.shape) < density for n, t in tensors.items()}
    arrays = encode(tensors, masks, allowed_kinds=("golomb",))
    header, index = parse_header(arrays["index"])
    assert len(header["rice"]) == len(masks)
    start = 0
    for i, (name, m) in enumerate(masks.items()):
        pos = np.flatnonzero(m)
        b = header["rice"][i]
        assert header["kinds"][i] == "golomb" and isinstance(b, int)
        length = golomb_len_arith(pos, b)  # ⌈Σ(q_i + 1 + b) / 8⌉
        assert header["ilen"][i] == tensor_nbytes(arrays)[name]["index_bytes"] == length
        chunk = index[start : start + length]
        start += length
        np.testing.assert_array_equal(golomb_decode(chunk, pos.size, b, m.size), pos)
    assert start == index.size


def test_golomb_never_makes_a_payload_larger() -> None:
    rng = np.random.default_rng(12)
    used = 0
    for n in (8, 16, 50, 200, 1000, 5000, 61706):
        for density in (0.0, 0.001, 0.01, 0.05, 0.1, 0.3, 0.45, 0.6, 0.95):
            for count in (1, 3):
                tensors = {f"t{i}": rng.standard_normal(n).astype(np.float32) for i in range(count)}
                tensors["bias"] = rng.standard_normal(4).astype(np.float32)
                masks = {f"t{i}": rng.random(n) < density for i in range(count)}
                new = encode(tensors, masks)
                before = encode(tensors, masks, allowed_kinds=("bitmap", "coords"))
                if "golomb" in index_kinds(new).values():
                    used += 1
                    assert payload_nbytes(new) < payload_nbytes(before)
                    assert "rice" in parse_header(new["index"])[0]
                else:  # the payload of the codec before golomb, byte for byte
                    assert "rice" not in parse_header(new["index"])[0]
                    for key in before:
                        assert new[key].tobytes() == before[key].tobytes()
                dec, dm = decode(new)
                for name, m in masks.items():
                    np.testing.assert_array_equal(dm[name], m)
                    np.testing.assert_array_equal(dec[name], np.where(m, tensors[name], 0))
    assert used >= 10


def test_golomb_is_not_used_where_its_header_entry_costs_more() -> None:
    # n = 16, kept {3, 9}: golomb (b = 2) is 7 bits = 1 byte against the bitmap's 2, but with
    # the header's rice list (key, brackets, entry) it costs more than the byte it saves: bitmap,
    # as before.
    t = {"w": np.arange(16, dtype=np.float32)}
    m = np.zeros(16, dtype=bool)
    m[[3, 9]] = True
    assert golomb_choose(np.flatnonzero(m), 16) == (2, 1)
    forced = encode(t, {"w": m}, allowed_kinds=("golomb",))
    assert tensor_nbytes(forced)["w"]["index_bytes"] == 1
    chosen = encode(t, {"w": m})
    assert index_kinds(chosen) == {"w": "bitmap"}
    assert "rice" not in parse_header(chosen["index"])[0]
    assert payload_nbytes(chosen) < payload_nbytes(forced)
    # with a large tensor beside it the list is paid for, yet the small tensor's entry ("2,")
    # would cost as much as it saves: bitmap (the tie keeps the bitmap)
    rng = np.random.default_rng(13)
    t["big"] = rng.standard_normal(10_000).astype(np.float32)
    big = rng.random(10_000) < 0.05
    both = encode(t, {"w": m, "big": big})
    assert index_kinds(both) == {"w": "bitmap", "big": "golomb"}
    assert parse_header(both["index"])[0]["rice"] == [golomb_choose(np.flatnonzero(big), 10_000)[0]]


def test_allowed_kinds_is_checked() -> None:
    t = {"w": np.zeros(4, np.float32)}
    for bad in ((), ("huffman",), ("bitmap", "dense")):
        with pytest.raises(ValueError, match="allowed_kinds"):
            encode(t, {"w": np.ones(4, bool)}, allowed_kinds=bad)


# A payload written by the codec before the golomb kind (version 1, bitmap / coords / dense / raw).
V1_INDEX_HEX = (
    "e00000007b22636f646563223a226665647370617273652d737061727365222c2276657273696f6e223a312c"
    "2276616c75655f62697473223a33322c226e616d6573223a5b2277222c2262222c226e222c2263225d2c2273"
    "6861706573223a5b5b352c385d2c5b325d2c5b5d2c5b3330305d5d2c22647479706573223a5b223c6634222c"
    "223c6634222c223c6938222c223c6634225d2c226b696e6473223a5b22636f6f726473222c2264656e736522"
    "2c22726177222c226269746d6170225d2c226e6e7a223a5b342c322c312c34335d2c22696c656e223a5b342c"
    "302c382c33385d7d00020d150700000000000000810204081020408102040810204081020408102040810204"
    "0810204081020408102040810200"
)


def test_version_1_payloads_still_decode() -> None:
    w = np.arange(1, 41, dtype=np.float32).reshape(5, 8)
    b = np.array([0.5, -1.5], np.float32)
    c = np.linspace(-1, 1, 300, dtype=np.float32)
    mw = np.zeros((5, 8), bool)
    mw.flat[[0, 3, 17, 39]] = True
    mc = np.zeros(300, bool)
    mc[::7] = True
    old = {"index": np.frombuffer(bytes.fromhex(V1_INDEX_HEX), np.uint8), "values": np.concatenate([w[mw], b, c[mc]])}
    assert index_kinds(old) == {"w": "coords", "b": "dense", "n": "raw", "c": "bitmap"}
    dec, dm = decode(old)
    np.testing.assert_array_equal(dec["w"], np.where(mw, w, 0))
    np.testing.assert_array_equal(dm["c"], mc)
    np.testing.assert_array_equal(dec["c"], np.where(mc, c, 0))
    np.testing.assert_array_equal(dec["b"], b)
    assert dec["n"] == 7 and dec["n"].dtype == np.int64
    # the same tensors without golomb give these bytes again; golomb makes nothing larger here
    tensors = {"w": w, "b": b, "n": np.array(7, np.int64), "c": c}
    again = encode(tensors, {"w": mw, "c": mc}, allowed_kinds=("bitmap", "coords"))
    assert again["index"].tobytes() == old["index"].tobytes()
    assert payload_nbytes(encode(tensors, {"w": mw, "c": mc})) <= payload_nbytes(old)


def _with_header(
    arrays: dict[str, np.ndarray], index: np.ndarray | None = None, values: np.ndarray | None = None, **changes: object
) -> dict[str, np.ndarray]:
    """The payload with its header's entries replaced (None removes one), and optionally its
    index bytes (after the header) or values replaced."""
    header, rest = parse_header(arrays["index"])
    header.update(changes)
    for key, value in changes.items():
        if value is None:
            del header[key]
    head = json.dumps(header).encode()
    body = (rest if index is None else index).tobytes()
    blob = np.frombuffer(len(head).to_bytes(4, "little") + head + body, np.uint8)
    return {"index": blob, "values": arrays["values"] if values is None else values}


def test_corrupt_or_truncated_golomb_index_is_a_clear_error() -> None:
    rng = np.random.default_rng(14)
    x = rng.standard_normal(5000).astype(np.float32)
    m = rng.random(5000) < 0.05
    arrays = encode({"w": x}, {"w": m})
    header, index = parse_header(arrays["index"])
    assert header["kinds"] == ["golomb"]
    b, ilen, k = header["rice"][0], header["ilen"][0], header["nnz"][0]
    decode(_with_header(arrays))  # the rebuilt payload itself is fine

    def bad(match: str, index: np.ndarray | None = None, values: np.ndarray | None = None, **changes: object) -> None:
        with pytest.raises(ValueError, match=match):
            decode(_with_header(arrays, index, values, **changes))

    bad("truncated golomb index", index[:-3], ilen=[ilen - 3])
    bad("truncated golomb index", index[:2], ilen=[2])
    bad("cut short", index[:-3])  # header still says ilen
    more, fewer = np.append(arrays["values"], np.float32(1)), arrays["values"][:-1]
    bad("truncated golomb index", values=more, nnz=[k + 1])  # the stream holds k codewords
    bad("after the last codeword", np.append(index, np.uint8(0)), ilen=[ilen + 1])
    bad("after the last codeword", np.append(index[:-1], np.uint8(0xFF)))  # stray set bits
    bad("after the last codeword", values=fewer, nnz=[k - 1])
    bad("'rice' list", rice=None)
    bad("'rice' list", rice=[b, b])
    bad("'rice' list", rice=b)
    bad("'rice' list", rice=[b], kinds=["coords"])
    for wrong in (-1, 64, "3", True, 2.5, None):
        bad("Golomb–Rice parameter", rice=[wrong])
    bad("too large", rice=[40])
    bad("out of range", shapes=[[4000]])  # positions run past the smaller tensor
    with pytest.raises(ValueError, match="0 positions"):
        golomb_decode(np.zeros(1, np.uint8), 0, 3)
    with pytest.raises(ValueError, match="truncated"):
        golomb_decode(np.zeros(0, np.uint8), 2, 3)


@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.3])
def test_index_within_1_15_of_the_entropy_bound(density: float) -> None:
    n = 61_706  # LeNet-5's parameter count, as one tensor
    x = np.ones(n, dtype=np.float32)
    for seed in range(5):
        rng = np.random.default_rng([seed, int(density * 1000)])
        m = random_mask(rng, (n,), 1 - density)
        arrays = encode({"w": x}, {"w": m})
        index_bytes = tensor_nbytes(arrays)["w"]["index_bytes"]
        bound = shannon_bound_bytes(n, int(m.sum()))
        assert index_kinds(arrays) == {"w": "golomb"}
        assert index_bytes <= 1.15 * bound, (seed, index_bytes, bound)
    # the LeNet-5 model itself (weights with ndim > 1 masked, as FedDIP does), summed over tensors
    rng = np.random.default_rng(int(density * 1000))
    state = {k: v.numpy() for k, v in build_model("lenet5", 10, 1, 28).state_dict().items()}
    masks = {k: random_mask(rng, v.shape, 1 - density) if v.ndim > 1 else None for k, v in state.items()}
    stats = tensor_nbytes(encode(state, masks))
    index_bytes = sum(stats[k]["index_bytes"] for k in masks if masks[k] is not None)
    bound = sum(shannon_bound_bytes(m.size, int(m.sum())) for m in masks.values() if m is not None)
    assert index_bytes <= 1.15 * bound, (index_bytes, bound)


def test_index_kinds_environment_restricts_every_default_encode(monkeypatch: pytest.MonkeyPatch) -> None:
    """FEDSPARSE_INDEX_KINDS is the benchmark switch that writes the pre-golomb payloads in whole runs."""
    rng = np.random.default_rng(11)
    tensors = {"w": rng.normal(size=(64, 100)).astype(np.float32)}
    masks = {"w": rng.random((64, 100)) < 0.05}
    assert parse_header(encode(tensors, masks)["index"])[0]["kinds"] == ["golomb"]
    monkeypatch.setenv(codec.INDEX_KINDS_ENV, "bitmap, coords")
    restricted = encode(tensors, masks)
    assert parse_header(restricted["index"])[0]["kinds"] == ["coords"]
    explicit = encode(tensors, masks, allowed_kinds=("bitmap", "coords"))
    np.testing.assert_array_equal(restricted["index"], explicit["index"])
    # an explicit choice still wins over the environment
    assert parse_header(encode(tensors, masks, allowed_kinds=("golomb",))["index"])[0]["kinds"] == ["golomb"]
    monkeypatch.setenv(codec.INDEX_KINDS_ENV, "bitmap,huffman")
    with pytest.raises(ValueError, match=r"FEDSPARSE_INDEX_KINDS='bitmap,huffman'.*huffman.*allowed"):
        encode(tensors, masks)


def test_a_bad_index_kinds_switch_stops_a_run_before_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every client's encoder reads FEDSPARSE_INDEX_KINDS in Ray's actors: a typo must stop the run in
    the driver, as a configuration error, not fail each client's reply."""
    from fedsparse.config import ConfigError, resolve_config
    from fedsparse.simulation import preflight

    monkeypatch.setenv(codec.INDEX_KINDS_ENV, "bitmap,huffman")
    with pytest.raises(
        ConfigError, match=r"FEDSPARSE_INDEX_KINDS='bitmap,huffman': unknown index kind\(s\) \['huffman'\]"
    ):
        preflight(resolve_config({}))
