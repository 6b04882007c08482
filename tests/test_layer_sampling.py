"""Tests for fedsparse.layer_sampling: FedLUAR's scores and weighted sampling without replacement."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch

from fedsparse.layer_sampling import layer_scores, recycling_probabilities, sample_recycled_layers

SCORES = {"conv0": 0.5, "conv1": 0.1, "conv2": 0.02, "conv3": 1.0, "fc": 0.25}
# chi-square critical values at p = 0.001 (no scipy in the environment)
CHI2_CRIT_001 = {4: 18.467, 9: 27.877}


def _chi2(observed: dict, expected_prob: dict, n: int) -> float:
    return sum((observed.get(k, 0) - n * p) ** 2 / (n * p) for k, p in expected_prob.items())


def _exact_subset_probs(scores: dict[str, float], k: int) -> dict[tuple[str, ...], float]:
    """P(selected set) for successive sampling without replacement, by enumerating orderings."""
    p = recycling_probabilities(scores)
    names = list(scores)
    out: dict[tuple[str, ...], float] = {}
    for order in itertools.permutations(names, k):
        prob, left = 1.0, 1.0
        for name in order:
            prob *= p[name] / left
            left -= p[name]
        key = tuple(n for n in names if n in order)
        out[key] = out.get(key, 0.0) + prob
    return out


def test_layer_scores_ratio_of_norms() -> None:
    weights = {"a": torch.full((2, 2), 3.0), "b": torch.zeros(3, 3), "bias": torch.ones(2)}
    update = {"a": torch.full((2, 2), 0.5), "b": torch.ones(3, 3)}
    s = layer_scores(update, weights, eps=1e-12)
    assert list(s) == ["a", "b"]
    assert s["a"] == pytest.approx(1.0 / 6.0)
    assert s["b"] == pytest.approx(3.0 / 1e-12)
    with pytest.raises(ValueError, match="lack"):
        layer_scores({"c": torch.ones(1)}, weights)


def test_probabilities_inverse_to_scores() -> None:
    p = recycling_probabilities(SCORES)
    inv = {n: 1 / s for n, s in SCORES.items()}
    assert p == pytest.approx({n: v / sum(inv.values()) for n, v in inv.items()})
    assert sum(p.values()) == pytest.approx(1.0)


def test_single_draw_frequencies_match_inverse_score_distribution() -> None:
    rng = np.random.default_rng(12345)
    n = 20_000
    counts = Counter(sample_recycled_layers(SCORES, 1, rng)[0] for _ in range(n))
    assert _chi2(counts, recycling_probabilities(SCORES), n) < CHI2_CRIT_001[4]
    # the test has power: the same draws are far from p ∝ score
    wrong = {k: v / sum(SCORES.values()) for k, v in SCORES.items()}
    assert _chi2(counts, wrong, n) > 100 * CHI2_CRIT_001[4]


def test_pair_draws_match_exact_without_replacement_probabilities() -> None:
    rng = np.random.default_rng(2024)
    n = 20_000
    exact = _exact_subset_probs(SCORES, 2)
    assert len(exact) == 10 and sum(exact.values()) == pytest.approx(1.0)
    draws = [tuple(sample_recycled_layers(SCORES, 2, rng)) for _ in range(n)]
    assert all(len(set(d)) == 2 for d in draws)  # without replacement
    assert _chi2(Counter(draws), exact, n) < CHI2_CRIT_001[9]
    # inclusion probability per layer (differs from 2·p_l for without-replacement sampling)
    inclusion = {name: sum(p for s, p in exact.items() if name in s) for name in SCORES}
    for name, prob in inclusion.items():
        freq = sum(name in d for d in draws) / n
        assert abs(freq - prob) < 4.5 * math.sqrt(prob * (1 - prob) / n)
    assert abs(inclusion["conv2"] - 2 * recycling_probabilities(SCORES)["conv2"]) > 0.05


def test_order_determinism_and_edge_cases() -> None:
    a = [sample_recycled_layers(SCORES, 3, np.random.default_rng(9)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    names = list(SCORES)
    assert [names.index(x) for x in a[0]] == sorted(names.index(x) for x in a[0])
    seqs = {tuple(sample_recycled_layers(SCORES, 2, np.random.default_rng(s))) for s in range(30)}
    assert len(seqs) > 1
    assert sample_recycled_layers(SCORES, 0, np.random.default_rng(0)) == []
    assert sample_recycled_layers(SCORES, 5, np.random.default_rng(0)) == names
    # a zero score does not crash and makes that layer (almost) certain to be drawn
    zero = {"a": 0.0, "b": 1.0, "c": 2.0}
    picks = [sample_recycled_layers(zero, 1, np.random.default_rng(s)) for s in range(50)]
    assert all(p == ["a"] for p in picks)
    with pytest.raises(ValueError, match="num_layers"):
        sample_recycled_layers(SCORES, 6, np.random.default_rng(0))
    with pytest.raises(ValueError, match="num_layers"):
        sample_recycled_layers(SCORES, -1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="scores"):
        sample_recycled_layers({"a": -1.0, "b": 1.0}, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="non-zero"):
        sample_recycled_layers({"a": math.inf, "b": 1.0}, 2, np.random.default_rng(0))
