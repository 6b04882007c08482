"""Pruning masks over model tensors: which weights are prunable, ERK initial masks, global magnitude
pruning, top-k selection, and sparsity measurement.

Everything here is pure torch on dicts ``name -> Tensor`` (keyed by ``model.state_dict()`` names), so
the FedDIP strategy, the partial-update broadcast and the Top-k baselines share one implementation.
Masks are boolean tensors of the same shape as the tensor they mask (``True`` = kept).

Counting convention, used everywhere in this module: at sparsity ``s`` over ``n`` elements exactly
``n - round_half_up(s * n)`` elements are kept. Ties in magnitude are broken by position in the
concatenation of the tensors in the mapping's order (earlier wins), so results are deterministic and
counts are exact even when many values are equal (e.g. zeros).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

__all__ = [
    "prunable_names",
    "is_shortcut",
    "erk_densities",
    "erk_counts",
    "erk_masks",
    "magnitude_erk_masks",
    "global_magnitude_masks",
    "topk_mask",
    "apply_masks",
    "sparsity",
    "per_layer_sparsity",
    "num_pruned",
]

_SHORTCUT_NAME_PARTS = ("shortcut", "downsample")


# --------------------------------------------------------------------------------------------------
# validation helpers


def _check_fraction(value: float, what: str, *, upper_inclusive: bool = True) -> float:
    value = float(value)
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok or math.isnan(value):
        bound = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"{what} must lie in {bound}; got {value!r}")
    return value


def num_pruned(numel: int, sparsity_: float) -> int:
    """Number of elements pruned at ``sparsity_`` over ``numel`` elements: round half up of s·n.

    Python's ``round`` rounds half to even; half-up is easier to state and to reproduce elsewhere.
    """
    sparsity_ = _check_fraction(sparsity_, "sparsity")
    return min(numel, int(math.floor(sparsity_ * numel + 0.5)))


def _top_indices(flat: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries of a 1-D tensor, exactly ``k`` of them.

    Ties at the threshold go to the lowest positions. O(n) via ``kthvalue`` rather than a full sort.
    Returned indices are sorted ascending.
    """
    n = flat.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    if k >= n:
        return torch.arange(n)
    # k-th largest == (n - k + 1)-th smallest
    threshold = torch.kthvalue(flat, n - k + 1).values
    above = torch.nonzero(flat > threshold).flatten()
    need = k - above.numel()
    at = torch.nonzero(flat == threshold).flatten()[:need]
    return torch.sort(torch.cat([above, at])).values


def _pool(tensors: Mapping[str, Tensor], names: Iterable[str]) -> Tensor:
    """Flattened concatenation (float32, or float64 if any input is float64) of the named tensors."""
    parts = [tensors[n].detach().reshape(-1) for n in names]
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    flat = torch.cat([p.to(device="cpu", dtype=dtype) for p in parts]) if parts else torch.empty(0)
    if torch.isnan(flat).any():
        bad = [n for n in names if torch.isnan(tensors[n].detach().float()).any()]
        raise ValueError(f"cannot rank values containing NaN (tensors: {', '.join(bad)})")
    return flat


def _unpool(selected: Tensor, tensors: Mapping[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    """Split a flat boolean selection back into per-tensor masks of the original shapes (CPU)."""
    out: dict[str, Tensor] = {}
    offset = 0
    for n in names:
        shape = tensors[n].shape
        size = tensors[n].numel()
        out[n] = selected[offset : offset + size].reshape(shape).clone()
        offset += size
    return out


# --------------------------------------------------------------------------------------------------
# which tensors are prunable


def is_shortcut(name: str, shape: tuple[int, ...] | torch.Size) -> bool:
    """Whether a weight is a ResNet shortcut (projection) convolution.

    A 4-D weight with a 1×1 kernel, or any tensor whose name contains ``shortcut`` or
    ``downsample`` (the CIFAR-ResNet and torchvision spellings). Caveat: the 1×1 rule also matches
    point-wise convolutions of architectures such as MobileNet; pass ``exclude_shortcuts=False`` to
    :func:`prunable_names` for those.
    """
    lowered = name.lower()
    if any(part in lowered for part in _SHORTCUT_NAME_PARTS):
        return True
    return len(shape) == 4 and tuple(shape[2:]) == (1, 1)


def prunable_names(state: Mapping[str, Tensor], exclude_shortcuts: bool = True) -> list[str]:
    """Names of the conv / linear weights (ndim > 1) in ``state``, in ``state``'s order.

    Biases, normalisation parameters and buffers (ndim ≤ 1) are never prunable. With
    ``exclude_shortcuts`` (default) ResNet shortcut convolutions stay dense (see :func:`is_shortcut`),
    matching FedDIP's count of pruning layers: LeNet-5 → 5, AlexNet → 8, ResNet-18 → 18.
    """
    names = []
    for name, tensor in state.items():
        if tensor.ndim <= 1:
            continue
        if exclude_shortcuts and is_shortcut(name, tuple(tensor.shape)):
            continue
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------------
# ERK initial masks


def erk_densities(shapes: Mapping[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Per-layer densities of RigL's Erdős–Rényi–Kernel distribution with overall density ``density``.

    Layer l gets density ε·(Σ dims_l)/(Π dims_l), with ε chosen so that the parameter-weighted mean
    density equals ``density``. Layers whose density would exceed 1 are made dense and ε is
    recomputed for the rest, until no layer exceeds 1. (Making every exceeding layer dense at once
    gives the same fixed point as RigL's one-at-a-time loop: densifying layers only raises ε.)
    """
    density = _check_fraction(density, "density")
    if not shapes:
        raise ValueError("erk_densities needs at least one layer shape; got none")
    numel: dict[str, int] = {}
    raw: dict[str, float] = {}
    for name, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        if len(shape) == 0 or any(d <= 0 for d in shape):
            raise ValueError(f"layer {name!r} has shape {shape}; ERK needs positive dimensions")
        numel[name] = math.prod(shape)
        raw[name] = sum(shape) / numel[name]
    total = sum(numel.values())
    if density == 1.0:
        return {name: 1.0 for name in shapes}

    dense: set[str] = set()
    while True:
        budget = density * total - sum(numel[n] for n in dense)
        sparse = [n for n in shapes if n not in dense]
        divisor = sum(raw[n] * numel[n] for n in sparse)
        eps = budget / divisor if divisor > 0 else 0.0
        exceeding = {n for n in sparse if eps * raw[n] > 1.0}
        if not exceeding:
            break
        dense |= exceeding
        if len(dense) == len(shapes):  # cannot happen for density < 1, kept as a guard
            break
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def _largest_remainder_counts(ideal: dict[str, float], caps: dict[str, int], target: int) -> dict[str, int]:
    """Integer counts, each floor or ceil of ``ideal``, within [0, cap], summing to ``target``."""
    counts = {n: min(caps[n], max(0, math.floor(v + 1e-9))) for n, v in ideal.items()}
    remainder = {n: ideal[n] - counts[n] for n in ideal}
    diff = target - sum(counts.values())
    order = list(ideal)
    if diff > 0:
        # add to the largest fractional parts first (stable: earlier layers win ties)
        for n in sorted(order, key=lambda n: -remainder[n]):
            if diff == 0:
                break
            if counts[n] < caps[n]:
                counts[n] += 1
                diff -= 1
    elif diff < 0:
        # take from the smallest fractional parts, dense (full) layers last so they stay dense
        for n in sorted(order, key=lambda n: (counts[n] == caps[n], remainder[n])):
            if diff == 0:
                break
            if counts[n] > 0:
                counts[n] -= 1
                diff += 1
    if diff != 0:  # pragma: no cover - target is always reachable for target in [0, Σ caps]
        raise RuntimeError(f"could not distribute {target} kept positions over {caps}")
    return counts


def erk_counts(shapes: Mapping[str, tuple[int, ...]], sparsity: float) -> dict[str, int]:
    """Kept positions per layer of an ERK mask at overall ``sparsity`` (the layers' budgets).

    Layer l keeps either ⌊d_l·n_l⌋ or ⌈d_l·n_l⌉ positions (d_l from :func:`erk_densities`), chosen by
    the largest-remainder method so that the total kept count is exactly
    N − round_half_up(sparsity·N), the same count :func:`global_magnitude_masks` keeps. Dense layers
    (d_l = 1) stay fully dense.
    """
    sparsity = _check_fraction(sparsity, "sparsity")
    densities = erk_densities(shapes, 1.0 - sparsity)
    numel = {n: math.prod(int(d) for d in s) for n, s in shapes.items()}
    total = sum(numel.values())
    target = total - num_pruned(total, sparsity)
    ideal = {n: densities[n] * numel[n] for n in shapes}
    for n in shapes:
        if densities[n] == 1.0:
            ideal[n] = float(numel[n])
    return _largest_remainder_counts(ideal, numel, target)


def erk_masks(shapes: Mapping[str, tuple[int, ...]], sparsity: float, generator: torch.Generator) -> dict[str, Tensor]:
    """Random ERK masks at overall ``sparsity``: per layer a uniformly random set of kept positions.

    Each layer keeps its :func:`erk_counts` budget. Positions are drawn with ``torch.randperm`` from
    ``generator``, layer by layer in ``shapes``' order, so a seeded generator reproduces the masks.
    """
    counts = erk_counts(shapes, sparsity)
    masks: dict[str, Tensor] = {}
    for name, shape in shapes.items():
        numel = math.prod(int(d) for d in shape)
        flat = torch.zeros(numel, dtype=torch.bool)
        if counts[name] == numel:
            flat[:] = True
        elif counts[name] > 0:
            flat[torch.randperm(numel, generator=generator)[: counts[name]]] = True
        masks[name] = flat.reshape(tuple(int(d) for d in shape))
    return masks


def magnitude_erk_masks(tensors: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """ERK budgets, filled by magnitude: layer l keeps its :func:`erk_counts` budget of largest |w|.

    The per-layer *sizes* are those of :func:`erk_masks` (so the layer-wise densities do not depend on
    the weights); *which* positions are kept is decided by the weights, not by a random draw. Ties
    in magnitude go to the earliest positions.
    """
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    counts = erk_counts(shapes, sparsity)
    masks: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        flat = _pool(tensors, [name]).abs()
        selected = torch.zeros(flat.numel(), dtype=torch.bool)
        selected[_top_indices(flat, counts[name])] = True
        masks[name] = selected.reshape(tensor.shape)
    return masks


# --------------------------------------------------------------------------------------------------
# magnitude pruning and top-k


def global_magnitude_masks(
    tensors: Mapping[str, Tensor],
    sparsity: float,
    current_masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Global magnitude pruning: keep the N − round_half_up(sparsity·N) largest |w| over all tensors.

    All tensors are pooled (one threshold for the whole model, not per layer). Ties are broken by
    position (see module docstring), so the kept count is exact.

    With ``current_masks`` (nested masks, FedDIP's default without regrowth) the masked weights
    w ⊙ m are ranked with positions inside the old mask strictly ahead of positions outside it:
    when the requested sparsity is ≥ the current one the new mask is a subset of the old mask (even
    when kept weights are exactly zero); when it is lower, the whole old mask is kept and the
    remaining slots go to the outside positions with the largest dense |w| (old ⊆ new). Either way
    consecutive masks are nested.
    """
    sparsity = _check_fraction(sparsity, "sparsity")
    names = list(tensors)
    if not names:
        return {}
    if current_masks is not None:
        missing = [n for n in names if n not in current_masks]
        if missing:
            raise ValueError(f"current_masks lacks masks for: {', '.join(missing)}")
        for n in names:
            if tuple(current_masks[n].shape) != tuple(tensors[n].shape):
                raise ValueError(
                    f"mask for {n!r} has shape {tuple(current_masks[n].shape)}, tensor has {tuple(tensors[n].shape)}"
                )
    magnitude = _pool(tensors, names).abs()
    total = magnitude.numel()
    keep = total - num_pruned(total, sparsity)
    selected = torch.zeros(total, dtype=torch.bool)
    if current_masks is None:
        selected[_top_indices(magnitude, keep)] = True
    else:
        old = torch.cat([current_masks[n].detach().reshape(-1).to("cpu").bool() for n in names])
        inside = torch.nonzero(old).flatten()
        outside = torch.nonzero(~old).flatten()
        if keep <= inside.numel():
            selected[inside[_top_indices(magnitude[inside], keep)]] = True
        else:
            selected[inside] = True
            extra = keep - inside.numel()
            selected[outside[_top_indices(magnitude[outside], extra)]] = True
    return _unpool(selected, tensors, names)


def topk_mask(scores: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """Global top-k over all score tensors pooled: exactly ``k`` positions selected.

    Ties at the threshold go to the earliest positions (mapping order, then flattened order).
    """
    names = list(scores)
    total = sum(scores[n].numel() for n in names)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= total:
        raise ValueError(f"k must be an integer in [0, {total}] (the pooled number of scores); got {k!r}")
    flat = _pool(scores, names)
    selected = torch.zeros(total, dtype=torch.bool)
    selected[_top_indices(flat, k)] = True
    return _unpool(selected, scores, names)


# --------------------------------------------------------------------------------------------------
# applying and measuring


def apply_masks(tensors: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Return new tensors: w ⊙ m for names in ``masks``, an unchanged copy for the others.

    Pruned positions become exact (+0.0) zeros even if w held inf/NaN there. Every name in ``masks``
    must exist in ``tensors`` with the same shape.
    """
    unknown = [n for n in masks if n not in tensors]
    if unknown:
        raise ValueError(f"masks name tensors that are not present: {', '.join(unknown)}")
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if name not in masks:
            out[name] = tensor.detach().clone()
            continue
        mask = masks[name]
        if tuple(mask.shape) != tuple(tensor.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, tensor has {tuple(tensor.shape)}")
        keep = mask.to(device=tensor.device).bool()
        out[name] = torch.where(keep, tensor.detach(), torch.zeros((), dtype=tensor.dtype, device=tensor.device))
    return out


def _selected(tensors: Mapping[str, Tensor], names: Iterable[str] | None) -> list[str]:
    chosen = list(tensors) if names is None else list(names)
    missing = [n for n in chosen if n not in tensors]
    if missing:
        raise ValueError(f"unknown tensor names: {', '.join(missing)}")
    return chosen


def per_layer_sparsity(tensors_or_masks: Mapping[str, Tensor], names: Iterable[str] | None = None) -> dict[str, float]:
    """Fraction of exact zeros (``False`` for masks) per named tensor (all tensors if ``names`` is None)."""
    out = {}
    for n in _selected(tensors_or_masks, names):
        t = tensors_or_masks[n]
        out[n] = float((t == 0).sum().item()) / t.numel() if t.numel() else 0.0
    return out


def sparsity(tensors_or_masks: Mapping[str, Tensor], names: Iterable[str] | None = None) -> float:
    """Fraction of exact zeros (``False`` for masks) over all named tensors pooled."""
    chosen = _selected(tensors_or_masks, names)
    total = sum(tensors_or_masks[n].numel() for n in chosen)
    if total == 0:
        raise ValueError("sparsity of zero elements is undefined; pass at least one non-empty tensor")
    zeros = sum(int((tensors_or_masks[n] == 0).sum().item()) for n in chosen)
    return zeros / total
