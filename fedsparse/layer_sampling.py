"""FedLUAR's layer selection (Algorithms 1–2 of the paper): score each layer by how much the round's
aggregated update moves it, ‖Δ_l‖ / (‖x_l‖ + ε), and draw the δ layers whose previous update the
server recycles next round with probability p_l ∝ 1/s_l, without replacement.

Pure torch / numpy; the strategy wrapper owns the state (stale scores, previous updates).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

__all__ = ["layer_scores", "recycling_probabilities", "sample_recycled_layers"]


def layer_scores(update: Mapping[str, Tensor], weights: Mapping[str, Tensor], eps: float = 1e-12) -> dict[str, float]:
    """s_l = ‖Δ_l‖₂ / (‖x_l‖₂ + ε) for every name in ``update`` (Frobenius norms, in float64).

    ``weights`` are the round's starting weights x_t; it may hold more names than ``update``.
    """
    if eps < 0 or math.isnan(eps):
        raise ValueError(f"eps must be ≥ 0; got {eps!r}")
    missing = [n for n in update if n not in weights]
    if missing:
        raise ValueError(f"weights lack the layers being scored: {', '.join(missing)}")
    scores: dict[str, float] = {}
    for name, delta in update.items():
        x = weights[name]
        if tuple(x.shape) != tuple(delta.shape):
            raise ValueError(f"update for {name!r} has shape {tuple(delta.shape)}, weights have {tuple(x.shape)}")
        d_norm = torch.linalg.vector_norm(delta.detach().to(torch.float64)).item()
        x_norm = torch.linalg.vector_norm(x.detach().to(torch.float64)).item()
        scores[name] = d_norm / (x_norm + eps)
    return scores


def recycling_probabilities(scores: Mapping[str, float], eps: float = 1e-12) -> dict[str, float]:
    """p_l = (1/max(s_l, ε)) / Σ_i (1/max(s_i, ε)) (paper eq. 2, zero scores guarded by ε).

    A score of +inf gives probability 0 (such a layer is never recycled). Negative or NaN scores
    raise ValueError.
    """
    if not scores:
        raise ValueError("no layer scores given")
    bad = {n: s for n, s in scores.items() if math.isnan(float(s)) or float(s) < 0}
    if bad:
        raise ValueError(f"layer scores must be ≥ 0 and not NaN; got {bad}")
    inv = np.array([1.0 / max(float(s), eps) for s in scores.values()], dtype=np.float64)
    total = inv.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"cannot normalise inverse scores of {dict(scores)}")
    return dict(zip(scores, (inv / total).tolist()))


def sample_recycled_layers(
    scores: Mapping[str, float], num_layers: int, rng: np.random.Generator, eps: float = 1e-12
) -> list[str]:
    """Draw ``num_layers`` layer names without replacement, p_l ∝ 1/s_l; return them in ``scores`` order.

    Successive sampling: each draw picks among the layers not yet drawn with probabilities
    renormalised over them (the scheme ``numpy.random.Generator.choice(replace=False, p=...)``
    implements), one ``rng.random()`` per draw, so a seeded generator reproduces the selection.
    """
    names = list(scores)
    if isinstance(num_layers, bool) or int(num_layers) != num_layers or not 0 <= num_layers <= len(names):
        raise ValueError(
            f"num_layers must be an integer in [0, {len(names)}] (the number of scored layers); got {num_layers!r}"
        )
    if num_layers == 0:
        return []
    weights = np.array(list(recycling_probabilities(scores, eps).values()), dtype=np.float64)
    if np.count_nonzero(weights) < num_layers:
        raise ValueError(
            f"only {np.count_nonzero(weights)} layers have a non-zero recycling probability "
            f"(finite score); cannot draw {num_layers}"
        )
    chosen: list[int] = []
    remaining = weights.copy()
    for _ in range(int(num_layers)):
        cdf = np.cumsum(remaining)
        u = rng.random() * cdf[-1]
        idx = int(np.searchsorted(cdf, u, side="right"))
        idx = min(idx, len(names) - 1)
        while remaining[idx] == 0:  # float edge at the top of the cdf: step back to a live layer
            idx -= 1
        chosen.append(idx)
        remaining[idx] = 0.0
    return [names[i] for i in sorted(chosen)]
