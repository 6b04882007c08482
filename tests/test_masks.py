"""Tests for fedsparse.masks: prunable layers, ERK, global magnitude pruning, top-k, sparsity."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedsparse.masks import (
    apply_masks,
    erk_counts,
    erk_densities,
    erk_masks,
    global_magnitude_masks,
    magnitude_erk_masks,
    num_pruned,
    per_layer_sparsity,
    prunable_names,
    sparsity,
    topk_mask,
)

LENET_SHAPES = {
    "conv1.weight": (6, 1, 5, 5),
    "conv2.weight": (16, 6, 5, 5),
    "fc1.weight": (120, 400),
    "fc2.weight": (84, 120),
    "fc3.weight": (10, 84),
}
LENET_TOTAL = sum(math.prod(s) for s in LENET_SHAPES.values())


# ---------------------------------------------------------------- prunable_names


class _TinyResBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.shortcut = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.proj = nn.Conv2d(8, 8, 1)  # 1x1 conv without a shortcut name: excluded by kernel shape
        self.fc = nn.Linear(8, 4)


def test_prunable_names_keeps_conv_and_linear_weights_only() -> None:
    state = _TinyResBlock().state_dict()
    assert prunable_names(state) == ["conv1.weight", "conv2.weight", "fc.weight"]
    assert prunable_names(state, exclude_shortcuts=False) == [
        "conv1.weight",
        "conv2.weight",
        "shortcut.0.weight",
        "proj.weight",
        "fc.weight",
    ]


def test_prunable_names_paper_layer_counts() -> None:
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):  # shapes only, no memory or init time
        resnet18 = torchvision.models.resnet18(num_classes=100).state_dict()
        alexnet = torchvision.models.alexnet(num_classes=10).state_dict()
    assert len(prunable_names(resnet18)) == 18
    assert not any("downsample" in n for n in prunable_names(resnet18))
    assert len(prunable_names(resnet18, exclude_shortcuts=False)) == 21
    assert len(prunable_names(alexnet)) == 8
    lenet = {n: torch.zeros(s) for n, s in LENET_SHAPES.items()}
    lenet.update({n.replace("weight", "bias"): torch.zeros(s[0]) for n, s in LENET_SHAPES.items()})
    assert prunable_names(lenet) == list(LENET_SHAPES)


# ---------------------------------------------------------------- ERK


def test_erk_densities_lenet_reference() -> None:
    d = erk_densities(LENET_SHAPES, 0.5)
    assert [d[n] for n in LENET_SHAPES] == pytest.approx([1.0, 0.525, 0.426, 0.796, 1.0], abs=0.005)


def test_erk_densities_alexnet_reference() -> None:
    # CIFAR AlexNet with 3x3 convs (64, 192, 384, 256, 256) and fc 1024 -> 4096 -> 4096 -> 10
    shapes = [
        (64, 3, 3, 3),
        (192, 64, 3, 3),
        (384, 192, 3, 3),
        (256, 384, 3, 3),
        (256, 256, 3, 3),
        (4096, 1024),
        (4096, 4096),
        (10, 4096),
    ]
    d = erk_densities({f"l{i}": s for i, s in enumerate(shapes)}, 0.5)
    assert list(d.values()) == pytest.approx([1, 1, 0.669, 0.557, 0.669, 0.931, 0.372, 1], abs=0.005)


@pytest.mark.parametrize("density", [0.02, 0.1, 0.5, 0.9, 1.0])
def test_erk_densities_hit_target_and_stay_in_range(density: float) -> None:
    d = erk_densities(LENET_SHAPES, density)
    kept = sum(d[n] * math.prod(s) for n, s in LENET_SHAPES.items())
    assert kept == pytest.approx(density * LENET_TOTAL, rel=1e-9)
    assert all(0.0 <= v <= 1.0 for v in d.values())
    # ERK ordering: a higher raw score never gets a lower density
    raw = {n: sum(s) / math.prod(s) for n, s in LENET_SHAPES.items()}
    by_raw = sorted(LENET_SHAPES, key=lambda n: raw[n])
    assert [d[n] for n in by_raw] == sorted(d[n] for n in by_raw)


def test_erk_densities_rejects_bad_density() -> None:
    with pytest.raises(ValueError, match="density"):
        erk_densities(LENET_SHAPES, 1.5)
    with pytest.raises(ValueError, match="density"):
        erk_densities(LENET_SHAPES, -0.1)


def test_erk_masks_counts_rounding_and_determinism() -> None:
    for s in (0.5, 0.9, 0.95, 0.333):
        masks = erk_masks(LENET_SHAPES, s, torch.Generator().manual_seed(1))
        d = erk_densities(LENET_SHAPES, 1 - s)
        total_kept = sum(int(m.sum()) for m in masks.values())
        assert total_kept == LENET_TOTAL - num_pruned(LENET_TOTAL, s)
        for n, shape in LENET_SHAPES.items():
            assert masks[n].dtype == torch.bool and tuple(masks[n].shape) == shape
            ideal = d[n] * math.prod(shape)
            assert math.floor(ideal) <= int(masks[n].sum()) <= math.ceil(ideal)
    a = erk_masks(LENET_SHAPES, 0.9, torch.Generator().manual_seed(7))
    b = erk_masks(LENET_SHAPES, 0.9, torch.Generator().manual_seed(7))
    c = erk_masks(LENET_SHAPES, 0.9, torch.Generator().manual_seed(8))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_erk_masks_positions_uniform_within_layer() -> None:
    shapes = {"a": (4, 5), "b": (30, 40)}
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(20)
    draws = 2000
    for _ in range(draws):
        counts += erk_masks(shapes, 0.8, gen)["a"].reshape(-1).float()
    k = int(erk_masks(shapes, 0.8, gen)["a"].sum())
    expected = draws * k / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # hypergeometric draws are less variable than multinomial; 43.8 = chi2(19) at p=0.001
    assert chi2 < 43.8


# ---------------------------------------------------------------- global magnitude pruning


def test_global_magnitude_is_global_not_per_layer() -> None:
    tensors = {"small": torch.full((10, 10), 0.01), "big": torch.randn(10, 10) + 5.0}
    masks = global_magnitude_masks(tensors, 0.5)
    assert int(masks["small"].sum()) == 0 and bool(masks["big"].all())


def test_global_magnitude_keeps_largest_with_exact_count_on_ties() -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(7, 3, generator=gen), "b": torch.randn(5, 11, generator=gen)}
    flat = torch.cat([t.reshape(-1) for t in tensors.values()]).abs()
    for s in (0.0, 0.1, 0.37, 0.5, 0.99, 1.0):
        masks = global_magnitude_masks(tensors, s)
        kept = torch.cat([m.reshape(-1) for m in masks.values()])
        assert int(kept.sum()) == flat.numel() - num_pruned(flat.numel(), s)
        if 0 < kept.sum() < flat.numel():
            assert flat[kept].min() >= flat[~kept].max()
    ties = {"a": torch.ones(4, 4), "b": -torch.ones(3, 3)}
    m = global_magnitude_masks(ties, 0.6)
    assert sum(int(v.sum()) for v in m.values()) == 25 - 15
    # all 25 magnitudes tie: the 10 kept are the earliest positions, i.e. the first 10 of "a"
    assert int(m["a"].sum()) == 10 and int(m["b"].sum()) == 0
    assert m["a"].reshape(-1)[:10].all()


def test_global_magnitude_nested_masks_are_subsets_even_with_zero_weights() -> None:
    gen = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(20, 10, generator=gen), "b": torch.randn(8, 8, 3, 3, generator=gen)}
    tensors["a"][:5] = 0.0  # exact zeros inside the kept set tie with masked-out positions
    old = {n: torch.rand(t.shape, generator=gen) < 0.5 for n, t in tensors.items()}
    current = sparsity(old)
    for s in (current, 0.6, 0.9):
        new = global_magnitude_masks(tensors, s, current_masks=old)
        total = sum(t.numel() for t in tensors.values())
        assert sum(int(v.sum()) for v in new.values()) == total - num_pruned(total, s)
        for n in tensors:
            assert not bool((new[n] & ~old[n]).any()), "new mask must be a subset of the old one"
    # ranking is by |w ⊙ m|: a huge weight outside the old mask must not come back
    n_out = (~old["a"]).nonzero()[0]
    tensors["a"][tuple(n_out)] = 1e6
    new = global_magnitude_masks(tensors, 0.7, current_masks=old)
    assert not bool(new["a"][tuple(n_out)])
    # lower sparsity than the current one: old mask kept whole, extras by dense magnitude
    lower = global_magnitude_masks(tensors, 0.3, current_masks=old)
    assert all(bool((old[n] <= lower[n]).all()) for n in tensors)
    assert bool(lower["a"][tuple(n_out)])


def test_global_magnitude_rejects_bad_input() -> None:
    t = {"a": torch.randn(3, 3)}
    with pytest.raises(ValueError, match="sparsity"):
        global_magnitude_masks(t, 1.2)
    with pytest.raises(ValueError, match="NaN"):
        global_magnitude_masks({"a": torch.tensor([[float("nan"), 1.0]])}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        global_magnitude_masks(t, 0.5, current_masks={"a": torch.ones(2, 2, dtype=torch.bool)})


# ---------------------------------------------------------------- top-k


def test_topk_mask_exact_global_and_ties() -> None:
    scores = {"a": torch.tensor([[1.0, 5.0], [3.0, 3.0]]), "b": torch.tensor([3.0, 0.0, 9.0])}
    m = topk_mask(scores, 3)
    assert m["a"].tolist() == [[False, True], [True, False]] and m["b"].tolist() == [False, False, True]
    m = topk_mask(scores, 4)
    assert m["a"].tolist() == [[False, True], [True, True]] and m["b"].tolist() == [False, False, True]
    assert sum(int(v.sum()) for v in topk_mask(scores, 0).values()) == 0
    assert sum(int(v.sum()) for v in topk_mask(scores, 7).values()) == 7
    with pytest.raises(ValueError, match="k must be"):
        topk_mask(scores, 8)
    with pytest.raises(ValueError, match="k must be"):
        topk_mask(scores, -1)


# ---------------------------------------------------------------- apply and measure


def test_apply_masks_and_sparsity() -> None:
    tensors = {
        "w": torch.tensor([[1.0, -2.0], [float("inf"), 4.0]]),
        "bias": torch.tensor([0.0, 1.0]),
    }
    masks = {"w": torch.tensor([[True, False], [False, True]])}
    out = apply_masks(tensors, masks)
    assert out["w"].tolist() == [[1.0, 0.0], [0.0, 4.0]]
    assert out["bias"] is not tensors["bias"] and torch.equal(out["bias"], tensors["bias"])
    assert tensors["w"][0, 1] == -2.0  # input untouched
    assert sparsity(out, ["w"]) == 0.5
    assert sparsity(out) == pytest.approx(3 / 6)
    assert sparsity(masks) == 0.5
    assert per_layer_sparsity(out) == {"w": 0.5, "bias": 0.5}
    with pytest.raises(ValueError, match="not present"):
        apply_masks(tensors, {"nope": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        apply_masks(tensors, {"w": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="unknown"):
        sparsity(out, ["nope"])


def test_magnitude_erk_keeps_the_largest_weights_within_each_layers_erk_budget() -> None:
    gen = torch.Generator().manual_seed(5)
    tensors = {n: torch.randn(s, generator=gen) for n, s in LENET_SHAPES.items()}
    masks = magnitude_erk_masks(tensors, 0.5)
    counts = erk_counts(LENET_SHAPES, 0.5)
    random = erk_masks(LENET_SHAPES, 0.5, torch.Generator().manual_seed(0))
    for name, t in tensors.items():
        kept = masks[name]
        assert int(kept.sum()) == counts[name] == int(random[name].sum())  # the same budgets as random ERK
        if 0 < counts[name] < t.numel():  # inside a layer: every kept |w| ≥ every pruned |w|
            assert t[kept].abs().min() >= t[~kept].abs().max()
    # a layer's budget is spent inside that layer even when another layer holds all the large values
    scaled = {**tensors, "fc1.weight": tensors["fc1.weight"] * 1000}
    again = magnitude_erk_masks(scaled, 0.5)
    assert all(int(again[n].sum()) == counts[n] for n in tensors)
