"""Benchmark of fedsparse.codec: index sizes against the entropy bound on every model, Golomb–Rice
against coordinate-list speed on a ResNet-18-sized tensor, payload sizes on LeNet-5.

Run: ``.venv/bin/python experiments/bench_codec.py``. Prints

1. per model of :mod:`fedsparse.models` (built for the dataset its configs use; a model that
   does not build for it is skipped with a note) and density k in {0.001, 0.01, 0.05, 0.1, 0.3}
   (the weights with ndim > 1 masked at random with exactly round(k·n) kept entries per tensor,
   biases and BN tensors dense): the index bytes of a bitmap, a varint coordinate list and a
   Golomb–Rice code for every masked tensor, the index the codec chose (the smallest per tensor,
   header cost counted), the Shannon bound Σ n·H(k_t)/8 over the masked tensors, and the
   ratio chosen / bound; beside them the same ratio for the choice of the codec before golomb
   (bitmap or coords) and how many payload bytes golomb saves (header included);
2. encode / decode time of an 11M-entry float32 tensor at k = 0.1 (ResNet-18 size) with the index
   forced to coords and to golomb, and with the codec's own choice, as medians of interleaved
   repeats, and their ratios; the index functions alone beside them;
3. measured payload bytes for LeNet-5 at sparsity 0.5 / 0.9 against dense float32, for 32-, 16-
   and 8-bit values, with the index kinds chosen and the Shannon bound of the indices beside them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from fedsparse.codec import (
    coords_decode,
    coords_encode,
    decode,
    encode,
    golomb_choose,
    golomb_decode,
    golomb_encode,
    index_kinds,
    payload_nbytes,
    shannon_bound_bytes,
    tensor_nbytes,
    to_array_record,
)
from fedsparse.data.info import dataset_info
from fedsparse.models import MODEL_NAMES, build_model

DENSITIES = (0.001, 0.01, 0.05, 0.1, 0.3)
# The dataset each model is run on in experiments/configs (vgg has no config: CIFAR-10).
MODEL_DATASET = {
    "lenet5": "fashion-mnist",
    "mlp": "mnist",
    "cnn": "fashion-mnist",
    "alexnet": "cifar10",
    "resnet18": "cifar100",
    "resnet20": "cifar10",
    "vgg": "cifar10",
}
BEFORE = ("bitmap", "coords")  # the index kinds of the codec before golomb


def random_mask(rng: np.random.Generator, shape: tuple[int, ...], sparsity: float) -> np.ndarray:
    n = int(np.prod(shape))
    flat = np.zeros(n, dtype=bool)
    flat[rng.choice(n, size=int(round((1 - sparsity) * n)), replace=False)] = True
    return flat.reshape(shape)


def model_state(name: str) -> tuple[str, dict[str, np.ndarray]] | None:
    dataset = MODEL_DATASET.get(name, "cifar10")
    info = dataset_info(dataset)
    try:
        model = build_model(name, info.num_classes, info.in_channels, info.image_size)
    except ValueError as err:
        print(f"  {name}: skipped, does not build for {dataset}: {err}")
        return None
    return dataset, {k: v.numpy() for k, v in model.state_dict().items()}


def bench_models(models: tuple[str, ...] = MODEL_NAMES) -> None:
    print(
        "Index bytes per model (weights with ndim > 1 masked at random; B = bytes; bound = "
        "Σ n·H(k)/8 over the masked tensors;\n'before' = the smaller of bitmap and coords per "
        "tensor, the codec before golomb; 'saved' = payload bytes golomb saves, header included)"
    )
    head = (
        f"{'model':>9} {'dataset':>13} {'masked':>10} {'k':>5} {'bitmap B':>10} "
        f"{'coords B':>10} {'golomb B':>10} {'chosen B':>10} {'bound B':>10} "
        f"{'chosen/bound':>12} {'before/bound':>12} {'saved B':>9}  kinds"
    )
    print(head)
    print("-" * len(head))
    worst = 0.0
    for name in models:
        built = model_state(name)
        if built is None:
            continue
        dataset, state = built
        masked = sum(v.size for v in state.values() if v.ndim > 1)
        for k in DENSITIES:
            rng = np.random.default_rng([MODEL_NAMES.index(name), int(k * 1000)])
            masks = {n: random_mask(rng, v.shape, 1 - k) if v.ndim > 1 else None for n, v in state.items()}
            bitmap = coords = golomb = 0
            bound = 0.0
            for m in masks.values():
                if m is None:
                    continue
                pos = np.flatnonzero(m)
                bitmap += (m.size + 7) // 8
                coords += coords_encode(pos).size
                golomb += golomb_choose(pos, m.size)[1]
                bound += shannon_bound_bytes(m.size, pos.size)
            arrays = encode(state, masks)
            before = encode(state, masks, allowed_kinds=BEFORE)
            stats, old_stats = tensor_nbytes(arrays), tensor_nbytes(before)
            chosen = sum(stats[n]["index_bytes"] for n in masks if masks[n] is not None)
            old = sum(old_stats[n]["index_bytes"] for n in masks if masks[n] is not None)
            kinds = Counter(kd for n, kd in index_kinds(arrays).items() if masks[n] is not None)
            saved = payload_nbytes(before) - payload_nbytes(arrays)
            worst = max(worst, chosen / bound)
            print(
                f"{name:>9} {dataset:>13} {masked:>10,} {k:>5} {bitmap:>10,} {coords:>10,} "
                f"{golomb:>10,} {chosen:>10,} {bound:>10,.0f} {chosen / bound:>12.3f} "
                f"{old / bound:>12.3f} {saved:>9,}  " + ",".join(f"{kd}:{c}" for kd, c in sorted(kinds.items()))
            )
            if k == 0.1 and name in ("lenet5", "resnet18"):  # spot-check the round trip
                _, dm = decode(arrays)
                assert all(np.array_equal(dm[n], m) for n, m in masks.items() if m is not None)
    print(f"worst chosen/bound: {worst:.3f}")


def _median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per function, the repeats interleaved (a loaded machine slows all alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_speed(n: int = 11_000_000, density: float = 0.1, repeats: int = 7) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(np.float32)
    m = rng.random(n) < density
    pos = np.flatnonzero(m)
    variants = {"coords": ("coords",), "golomb": ("golomb",), "chosen": None, "before": BEFORE}
    payloads = {
        v: (encode({"w": x}, {"w": m}) if a is None else encode({"w": x}, {"w": m}, allowed_kinds=a))
        for v, a in variants.items()
    }
    for arrays in payloads.values():
        dec, dm = decode(arrays)
        assert np.array_equal(dm["w"], m) and np.array_equal(dec["w"][m], x[m])
    enc_t = _median_times(
        {
            v: (lambda a=a: encode({"w": x}, {"w": m}) if a is None else encode({"w": x}, {"w": m}, allowed_kinds=a))
            for v, a in variants.items()
        },
        repeats,
    )
    dec_t = _median_times({v: (lambda p=p: decode(p)) for v, p in payloads.items()}, repeats)
    b, _ = golomb_choose(pos, n)
    c_idx, g_idx = coords_encode(pos), golomb_encode(pos, b)
    idx_t = _median_times(
        {
            "coords_encode": lambda: coords_encode(pos),
            "golomb_encode": lambda: golomb_encode(pos, b),
            "coords_decode": lambda: coords_decode(c_idx, pos.size),
            "golomb_decode": lambda: golomb_decode(g_idx, pos.size, b, n),
        },
        repeats,
    )
    print(
        f"\nSpeed: one float32 tensor of n={n:,} at k={density} ({pos.size:,} kept), medians of "
        f"{repeats} interleaved repeats; payload = index + header + float32 values"
    )
    print(
        f"{'index':>8} {'kind':>7} {'index B':>10} {'payload B':>11} {'encode ms':>10} "
        f"{'decode ms':>10} {'enc ×coords':>11} {'dec ×coords':>11}"
    )
    for v, arrays in payloads.items():
        st = tensor_nbytes(arrays)["w"]
        label = {"chosen": "chooser", "before": "before"}.get(v, v)
        print(
            f"{label:>8} {st['kind']:>7} {st['index_bytes']:>10,} {payload_nbytes(arrays):>11,} "
            f"{enc_t[v] * 1e3:>10.1f} {dec_t[v] * 1e3:>10.1f} "
            f"{enc_t[v] / enc_t['coords']:>11.2f} {dec_t[v] / dec_t['coords']:>11.2f}"
        )
    print(
        f"(bitmap would be {(n + 7) // 8:,} B; 'before' = the codec's choice without golomb, "
        f"'chooser' = with it; golomb b = {b})"
    )
    print(
        f"index functions alone: coords_encode {idx_t['coords_encode'] * 1e3:.1f} ms, "
        f"golomb_encode {idx_t['golomb_encode'] * 1e3:.1f} ms "
        f"(×{idx_t['golomb_encode'] / idx_t['coords_encode']:.2f}); coords_decode "
        f"{idx_t['coords_decode'] * 1e3:.1f} ms, golomb_decode "
        f"{idx_t['golomb_decode'] * 1e3:.1f} ms "
        f"(×{idx_t['golomb_decode'] / idx_t['coords_decode']:.2f})"
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="*", default=list(MODEL_NAMES), help="models for the index table (default: all)"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats (default 7)")
    args = parser.parse_args()
    bench_models(tuple(args.models))
    bench_speed(repeats=args.repeats)
    bench_lenet5()
