"""Per-round schedules: FedDIP's sparsity ramp (eq. 11) and incremental regularisation (eq. 9), and
per-round learning-rate decay (FedDIP's ×0.998 per round, FedLUAR's step decay at milestones).

Rounds are integers. The sparsity and λ schedules follow the paper's t ∈ [0, T]; the learning-rate
schedules count rounds from 1 (round 1 uses the initial rate), like Flower's ``server_round``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["cubic_sparsity", "incremental_lambda", "exponential_lr", "milestone_lr"]


def _check_rounds(total_rounds: int) -> int:
    if isinstance(total_rounds, bool) or int(total_rounds) != total_rounds or total_rounds < 1:
        raise ValueError(f"total_rounds must be an integer ≥ 1; got {total_rounds!r}")
    return int(total_rounds)


def _check_round(t: int) -> int:
    if isinstance(t, bool) or int(t) != t:
        raise ValueError(f"round must be an integer; got {t!r}")
    return int(t)


def _check_sparsity(value: float, what: str) -> float:
    value = float(value)
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must lie in [0, 1); got {value!r}")
    return value


def cubic_sparsity(t: int, total_rounds: int, s0: float, sp: float) -> float:
    """Sparsity at round t: s_t = s_p + (s_0 − s_p)(1 − t/T)^3 (FedDIP eq. 11).

    t is clipped to [0, T]; s_0 at t ≤ 0 and exactly s_p at t ≥ T. Requires 0 ≤ s_0 ≤ s_p < 1.
    """
    T = _check_rounds(total_rounds)
    t = min(max(_check_round(t), 0), T)
    s0 = _check_sparsity(s0, "initial sparsity s0")
    sp = _check_sparsity(sp, "target sparsity sp")
    if s0 > sp:
        raise ValueError(f"initial sparsity s0={s0!r} must not exceed target sparsity sp={sp!r}")
    if t == T:
        return sp
    return sp + (s0 - sp) * (1.0 - t / T) ** 3


def incremental_lambda(t: int, total_rounds: int, lambda_max: float, steps: int) -> float:
    """Regularisation weight at round t: FedDIP eq. 9 with Q = ``steps``.

    λ_t = λ_max·(i − 1)/Q for (i − 1)T/Q ≤ t < iT/Q, i = 1..Q, i.e. i − 1 = ⌊t·Q/T⌋ computed in
    integers (exact also when T is not a multiple of Q: the interval boundaries are the real numbers
    iT/Q). Zero for the first T/Q rounds, then steps of λ_max/Q. For t ≥ (Q − 1)T/Q — including
    t = T and any t > T — λ stays at λ_max·(Q − 1)/Q (the paper's last case; λ_max itself is never
    reached). t < 0 is treated as 0.
    """
    T = _check_rounds(total_rounds)
    t = max(_check_round(t), 0)
    lambda_max = float(lambda_max)
    if math.isnan(lambda_max) or lambda_max < 0 or math.isinf(lambda_max):
        raise ValueError(f"lambda_max must be a finite number ≥ 0; got {lambda_max!r}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps (Q) must be an integer ≥ 1; got {steps!r}")
    Q = int(steps)
    step_index = min((t * Q) // T, Q - 1)
    return lambda_max * step_index / Q


def _check_lr(lr0: float) -> float:
    lr0 = float(lr0)
    if math.isnan(lr0) or math.isinf(lr0) or lr0 <= 0:
        raise ValueError(f"initial learning rate must be a finite number > 0; got {lr0!r}")
    return lr0


def _check_lr_round(server_round: int) -> int:
    server_round = _check_round(server_round)
    if server_round < 1:
        raise ValueError(f"round must be ≥ 1 (rounds count from 1); got {server_round!r}")
    return server_round


def exponential_lr(lr0: float, decay: float, server_round: int) -> float:
    """lr_t = lr0 · decay^(t − 1) for rounds t = 1, 2, … (FedDIP's code: decay = 0.998)."""
    lr0 = _check_lr(lr0)
    decay = float(decay)
    if math.isnan(decay) or math.isinf(decay) or decay <= 0:
        raise ValueError(f"decay must be a finite number > 0; got {decay!r}")
    return lr0 * decay ** (_check_lr_round(server_round) - 1)


def milestone_lr(lr0: float, server_round: int, milestones: Iterable[int], gamma: float = 0.1) -> float:
    """Step decay: lr0 · gamma^(number of milestones m with t > m), rounds t = 1, 2, ….

    "Decay at 100, 150" therefore means rounds 1–100 use lr0, 101–150 use lr0·γ, 151+ use lr0·γ² —
    the same as ``torch.optim.lr_scheduler.MultiStepLR`` stepped once per round with the 0-based
    round index t − 1.
    """
    lr0 = _check_lr(lr0)
    t = _check_lr_round(server_round)
    gamma = float(gamma)
    if math.isnan(gamma) or math.isinf(gamma) or gamma <= 0:
        raise ValueError(f"gamma must be a finite number > 0; got {gamma!r}")
    marks = list(milestones)
    for m in marks:
        if isinstance(m, bool) or int(m) != m or m < 1:
            raise ValueError(f"milestones must be integers ≥ 1; got {m!r} in {marks!r}")
    passed = sum(1 for m in marks if t > int(m))
    return lr0 * gamma**passed
