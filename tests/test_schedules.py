"""Tests for fedsparse.schedules: FedDIP eq. 11 and eq. 9, learning-rate decay."""

from __future__ import annotations

import pytest

from fedsparse.schedules import cubic_sparsity, exponential_lr, incremental_lambda, milestone_lr


def test_cubic_sparsity_endpoints_and_shape() -> None:
    assert cubic_sparsity(0, 1000, 0.5, 0.9) == 0.5
    assert cubic_sparsity(1000, 1000, 0.5, 0.9) == 0.9
    assert cubic_sparsity(5000, 1000, 0.5, 0.9) == 0.9  # clipped
    assert cubic_sparsity(-3, 1000, 0.5, 0.9) == 0.5  # clipped
    assert cubic_sparsity(500, 1000, 0.5, 0.9) == pytest.approx(0.9 - 0.4 * 0.125)
    assert cubic_sparsity(250, 1000, 0.0, 0.8) == pytest.approx(0.8 - 0.8 * 0.75**3)
    # exact s_p at the end even where float arithmetic would not land on it
    for T in (1, 3, 7, 999):
        assert cubic_sparsity(T, T, 0.05, 0.8) == 0.8
    values = [cubic_sparsity(t, 100, 0.05, 0.8) for t in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    gaps = [b - a for a, b in zip(values, values[1:])]
    assert gaps[0] > gaps[-1]  # fast early, slow late (cubic)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1, 0, 0.5, 0.9), "total_rounds"),
        ((1, 10, -0.1, 0.9), "s0"),
        ((1, 10, 0.5, 1.0), "sp"),
        ((1, 10, 0.95, 0.9), "must not exceed"),
    ],
)
def test_cubic_sparsity_rejects_bad_values(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cubic_sparsity(*args)


def test_incremental_lambda_matches_eq9() -> None:
    T, Q, lam = 1000, 10, 1e-3
    assert [incremental_lambda(t, T, lam, Q) for t in (0, 1, 99)] == [0.0, 0.0, 0.0]
    assert incremental_lambda(100, T, lam, Q) == pytest.approx(lam / Q)
    assert incremental_lambda(199, T, lam, Q) == pytest.approx(lam / Q)
    assert incremental_lambda(200, T, lam, Q) == pytest.approx(2 * lam / Q)
    assert incremental_lambda(900, T, lam, Q) == pytest.approx(9 * lam / Q)
    assert incremental_lambda(1000, T, lam, Q) == pytest.approx(9 * lam / Q)
    assert incremental_lambda(5000, T, lam, Q) == pytest.approx(9 * lam / Q)
    # brute-force check of the interval definition, T not a multiple of Q
    T, Q = 23, 4
    for t in range(T + 1):
        i = next(i for i in range(1, Q + 1) if (i - 1) * T / Q <= t < i * T / Q) if t < T else Q
        assert incremental_lambda(t, T, 2.0, Q) == pytest.approx(2.0 * (i - 1) / Q)
    assert incremental_lambda(7, 10, 1.0, 1) == 0.0  # Q = 1: never regularised


@pytest.mark.parametrize(
    ("args", "match"),
    [((1, 10, 1e-3, 0), "steps"), ((1, 0, 1e-3, 2), "total_rounds"), ((1, 10, -1.0, 2), "lambda_max")],
)
def test_incremental_lambda_rejects_bad_values(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        incremental_lambda(*args)


def test_learning_rate_schedules() -> None:
    assert exponential_lr(0.01, 0.998, 1) == 0.01
    assert exponential_lr(0.01, 0.998, 11) == pytest.approx(0.01 * 0.998**10)
    assert [milestone_lr(0.2, t, [100, 150]) for t in (1, 100, 101, 150, 151, 200)] == pytest.approx(
        [0.2, 0.2, 0.02, 0.02, 0.002, 0.002]
    )
    with pytest.raises(ValueError, match="round"):
        exponential_lr(0.1, 0.9, 0)
    with pytest.raises(ValueError, match="decay"):
        exponential_lr(0.1, 0.0, 1)
    with pytest.raises(ValueError, match="milestones"):
        milestone_lr(0.1, 5, [0, 10])
