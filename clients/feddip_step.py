"""FedDIP's local training step: dynamic pruning with error feedback (eq. 5) on the incrementally
regularised loss (eq. 8), optionally with FedProx's proximal term (FedDIP+Prox).

Any ClientApp can call :func:`feddip_train`; it knows nothing about Flower.

Per batch:
1. the prunable parameters (those named in ``masks``) are set to w ⊙ m in place, after their dense
   values w were saved;
2. forward and backward run at the masked weights (batch-norm statistics are updated by this masked
   forward pass — there is no second, dense pass);
3. the dense values are restored (in a ``finally``, so an exception never leaves the model masked),
   keeping the gradient computed at w ⊙ m, and ``optimizer.step()`` applies it to the dense w
   (straight-through: pruned positions keep receiving gradient and gain values, which matter only
   where the server ranks dense replies — FedDIP's ``regrowth`` in a re-pruning round; with nested
   masks they are dropped from the sparse reply, see docs/feddip.md). Weight decay and momentum of
   the optimizer therefore act on the dense weights.

The loss is cross-entropy + λ_t Σ_z ‖w_z ⊙ m_z‖₂ (plain L2 norm, not squared, per prunable layer),
both evaluated at the pruned model as in eq. 5, + FedProx's μ/2 Σ ‖w − w_global‖² over all
parameters at the **dense** local weights w (the spec's FedDIP+Prox term). The proximal term is
therefore added after the dense values are restored, with its own backward pass that adds
μ(w − w_global) to the gradient: with the server's (masked) global model as ``global_params`` it
pulls the dense values at pruned positions towards 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["feddip_train"]


def _resolve_masks(
    model: nn.Module, masks: Mapping[str, Tensor], device: torch.device
) -> list[tuple[nn.Parameter, Tensor]]:
    """Pair each masked parameter with its pruned-position indicator (True = pruned) on ``device``."""
    params = dict(model.named_parameters())
    unknown = [n for n in masks if n not in params]
    if unknown:
        raise ValueError(f"masks name tensors that are not trainable parameters of the model: {', '.join(unknown)}")
    pairs = []
    for name, mask in masks.items():
        param = params[name]
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}")
        pruned = ~(mask.detach().to(device=device) != 0)
        pairs.append((param, pruned))
    return pairs


def feddip_train(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    lambda_t: float,
    proximal_mu: float = 0.0,
    global_params: Mapping[str, Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Train ``model`` in place over ``batches`` with FedDIP's masked-forward / dense-update rule.

    ``masks`` maps parameter names (``state_dict`` names) to boolean masks (True = kept; nonzero
    counts as kept for other dtypes). The model is moved to ``device`` and left in train mode with
    **dense** weights; the caller masks it before sending. ``global_params`` (required when
    ``proximal_mu > 0``) must hold every trainable parameter name; extra names (buffers) are ignored.

    Returns ``{"loss": mean total loss, "ce-loss": mean cross-entropy, "num-steps", "num-examples",
    "reg-grad-ratio": [...]}`` (losses 0.0 and counts 0 when ``batches`` is empty).
    ``reg-grad-ratio`` has one entry per masked tensor (in ``masks``' order): the norm of the
    regularisation term's gradient (exactly λ_t: ∇_p λ‖p‖ = λ p/‖p‖) over the mean norm of the rest
    of the batch gradient at that tensor, so one can see how much the penalty steers training
    (zeros when λ_t = 0; measured from the gradient already computed, no extra backward pass).
    """
    lambda_t = float(lambda_t)
    proximal_mu = float(proximal_mu)
    if not lambda_t >= 0:
        raise ValueError(f"lambda_t must be ≥ 0; got {lambda_t!r}")
    if not proximal_mu >= 0:
        raise ValueError(f"proximal_mu must be ≥ 0; got {proximal_mu!r}")
    device = torch.device(device)
    model.to(device)
    model.train()

    masked = _resolve_masks(model, masks, device)
    dense_copies = [param.detach().clone() for param, _ in masked]

    prox_pairs: list[tuple[nn.Parameter, Tensor]] = []
    if proximal_mu > 0:
        if global_params is None:
            raise ValueError("proximal_mu > 0 needs global_params (the round's global model)")
        named = dict(model.named_parameters())
        missing = [n for n in named if n not in global_params]
        if missing:
            raise ValueError(f"global_params lacks parameters: {', '.join(missing)}")
        prox_pairs = [(p, global_params[n].detach().to(device=device, dtype=p.dtype)) for n, p in named.items()]

    other_grad_norm = torch.zeros(len(masked), dtype=torch.float64)
    total_loss = 0.0
    total_ce = 0.0
    steps = 0
    examples = 0
    for inputs, targets in batches:
        inputs = inputs.to(device)
        targets = targets.to(device)
        optimizer.zero_grad(set_to_none=True)
        try:
            with torch.no_grad():
                for (param, pruned), saved in zip(masked, dense_copies):
                    saved.copy_(param)
                    param.masked_fill_(pruned, 0.0)
            logits = model(inputs)
            ce = F.cross_entropy(logits, targets)
            loss = ce
            if lambda_t > 0 and masked:
                # parameters currently hold w ⊙ m, so this is Σ_z ‖w_z ⊙ m_z‖₂
                penalty = torch.stack([torch.linalg.vector_norm(p) for p, _ in masked]).sum()
                loss = loss + lambda_t * penalty
            loss.backward()
            if lambda_t > 0 and masked:
                with torch.no_grad():
                    other_grad_norm += (
                        torch.stack([_norm_without_penalty(param, lambda_t) for param, _ in masked]).double().cpu()
                    )
        finally:
            with torch.no_grad():
                for (param, _), saved in zip(masked, dense_copies):
                    param.copy_(saved)
        if prox_pairs:  # μ/2 ‖w − w_global‖² at the dense weights (restored above)
            prox = 0.5 * proximal_mu * torch.stack([(p - g).pow(2).sum() for p, g in prox_pairs]).sum()
            prox.backward()  # accumulates μ(w − w_global) into the gradient of the masked forward
            loss = loss.detach() + prox.detach()
        optimizer.step()
        steps += 1
        examples += int(targets.shape[0])
        total_loss += float(loss.detach().item())
        total_ce += float(ce.detach().item())

    ratios = [lambda_t / float(n / steps) if steps and n > 0 else 0.0 for n in other_grad_norm]
    return {
        "loss": total_loss / steps if steps else 0.0,
        "ce-loss": total_ce / steps if steps else 0.0,
        "num-steps": steps,
        "num-examples": examples,
        "reg-grad-ratio": ratios,
    }


def _norm_without_penalty(param: nn.Parameter, lambda_t: float) -> Tensor:
    """‖g − λ p/‖p‖‖ for a parameter holding w ⊙ m after the backward pass: the norm of its gradient
    without the penalty's share (the penalty's gradient is λ p/‖p‖, zero when p = 0)."""
    grad = param.grad if param.grad is not None else torch.zeros_like(param)
    norm = torch.linalg.vector_norm(param)
    if norm > 0:
        grad = grad - lambda_t * param / norm
    return torch.linalg.vector_norm(grad)
