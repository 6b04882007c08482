"""Benchmark of fedsparse.codec: speed on a ResNet-18-sized tensor, sizes on LeNet-5.

Run: ``.venv/bin/python experiments/bench_codec.py``. Prints (1) encode/decode time for an
11M-element float32 tensor at 90 % sparsity and (2) measured payload bytes for LeNet-5 at sparsity
0.5 / 0.9 (weights with ndim > 1 masked at random, biases dense) against dense float32, for 32-, 16-
and 8-bit values, with the index kinds chosen and the Shannon bound of the indices beside them.
"""

from __future__ import annotations

import time

import numpy as np

from fedsparse.codec import (
    decode,
    encode,
    index_kinds,
    payload_nbytes,
    shannon_bound_bytes,
    tensor_nbytes,
    to_array_record,
)
from fedsparse.models import build_model


def random_mask(rng: np.random.Generator, shape: tuple[int, ...], sparsity: float) -> np.ndarray:
    n = int(np.prod(shape))
    flat = np.zeros(n, dtype=bool)
    flat[rng.choice(n, size=int(round((1 - sparsity) * n)), replace=False)] = True
    return flat.reshape(shape)


def bench_speed(n: int = 11_000_000, sparsity: float = 0.9, repeats: int = 3) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(np.float32)
    m = rng.random(n) >= sparsity
    best_enc = best_dec = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        arrays = encode({"w": x}, {"w": m})
        t1 = time.perf_counter()
        dec, dm = decode(arrays)
        t2 = time.perf_counter()
        best_enc, best_dec = min(best_enc, t1 - t0), min(best_dec, t2 - t1)
    assert np.array_equal(dm["w"], m) and np.array_equal(dec["w"][m], x[m])
    st = tensor_nbytes(arrays)["w"]
    print(
        f"speed: n={n:,} sparsity={sparsity}: encode {best_enc * 1e3:.0f} ms, "
        f"decode {best_dec * 1e3:.0f} ms, total {(best_enc + best_dec) * 1e3:.0f} ms "
        f"(best of {repeats}); kind={st['kind']}, index {st['index_bytes']:,} B "
        f"(bitmap would be {(n + 7) // 8:,} B), payload {payload_nbytes(arrays):,} B "
        f"vs dense {4 * n:,} B"
    )


def bench_lenet5() -> None:
    rng = np.random.default_rng(1)
    state = {k: v.numpy() for k, v in build_model("lenet5", 10, 1, 28).state_dict().items()}
    dense = sum(v.nbytes for v in state.values())
    dense_wire = sum(len(a.data) for a in to_array_record(state).values())
    print(
        f"\nLeNet-5 (61,706 params): dense float32 = {dense:,} B payload "
        f"({dense_wire:,} B as {len(state)} serialised npy Arrays)"
    )
    print(
        f"{'sparsity':>8} {'bits':>4} {'payload B':>10} {'ratio':>6} {'header B':>8} "
        f"{'index B':>8} {'shannon B':>9} {'values B':>9} {'npy B':>7}  kinds (ndim>1)"
    )
    for sparsity in (0.5, 0.9):
        masks = {k: random_mask(rng, v.shape, sparsity) if v.ndim > 1 else None for k, v in state.items()}
        bound = sum(shannon_bound_bytes(m.size, int(m.sum())) for m in masks.values() if m is not None)
        for bits in (32, 16, 8):
            arrays = encode(state, masks, value_bits=bits)
            stats = tensor_nbytes(arrays)
            index_b = sum(s["index_bytes"] for s in stats.values())
            header_b = arrays["index"].nbytes - index_b
            npy_b = sum(len(a.data) for a in to_array_record(arrays).values())
            kinds = [v for k, v in index_kinds(arrays).items() if masks[k] is not None]
            nbytes = payload_nbytes(arrays)
            print(
                f"{sparsity:>8} {bits:>4} {nbytes:>10,} {nbytes / dense:>6.3f} {header_b:>8,} "
                f"{index_b:>8,} {bound:>9,.0f} {arrays['values'].nbytes:>9,} {npy_b:>7,}  "
                f"{','.join(kinds)}"
            )
            dec, _ = decode(arrays)
            if bits == 32:
                for k, v in state.items():
                    expect = v if masks[k] is None else np.where(masks[k], v, 0)
                    assert np.array_equal(dec[k], expect), k


if __name__ == "__main__":
    bench_speed()
    bench_lenet5()
