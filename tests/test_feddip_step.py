"""Tests for clients.feddip_step: masked forward / dense update (eq. 5), penalty (eq. 8), FedProx."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clients.feddip_step import feddip_train

PRUNABLE = ("0.weight", "4.weight")


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _batches(n: int = 3, size: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 6, 6, generator=gen), torch.randint(0, 3, (size,), generator=gen)) for _ in range(n)]


def _masks(model: nn.Module, keep: float = 0.5, seed: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    return {n: torch.rand(sd[n].shape, generator=gen) < keep for n in PRUNABLE}


def _zeroed(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    return other


def test_forward_at_masked_weights_update_applied_to_dense_weights() -> None:
    model = _model()
    masks = _masks(model)
    ((x, y),) = _batches(1)
    reference = _zeroed(model, masks)  # the pruned model, explicitly zeroed
    before = copy.deepcopy(model.state_dict())

    seen = []
    model.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
    lr = 0.1
    stats = feddip_train(model, masks, [(x, y)], torch.optim.SGD(model.parameters(), lr=lr), lambda_t=0.0)

    ref_out = reference(x)
    assert torch.equal(seen[0], ref_out.detach())  # the forward pass saw w ⊙ m
    loss = F.cross_entropy(ref_out, y)
    assert stats["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert stats["num-steps"] == 1 and stats["num-examples"] == x.shape[0]
    loss.backward()
    ref_grads = dict(reference.named_parameters())
    after = model.state_dict()
    for name in PRUNABLE:
        pruned = ~masks[name]
        expected = before[name] - lr * ref_grads[name].grad  # gradient at w ⊙ m applied to dense w
        torch.testing.assert_close(after[name], expected)
        # pruned positions kept their dense values (not zeroed) and received gradient
        moved = (after[name] != before[name]) & pruned
        assert bool(moved.any())
        assert bool((after[name][pruned] != 0).all())
    # batch-norm running statistics come from the masked forward pass
    torch.testing.assert_close(after["1.running_mean"], reference.state_dict()["1.running_mean"])
    torch.testing.assert_close(after["1.running_var"], reference.state_dict()["1.running_var"])


def test_all_ones_masks_without_penalty_equal_plain_sgd_bitwise() -> None:
    ours, plain = _model(), _model()
    masks = {n: torch.ones_like(t, dtype=torch.bool) for n, t in ours.state_dict().items() if n in PRUNABLE}
    batches = _batches(4)
    opt = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    feddip_train(ours, masks, batches, opt, lambda_t=0.0)

    plain.train()
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
        opt.step()
    a, b = ours.state_dict(), plain.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_penalty_adds_lambda_times_sum_of_masked_layer_norms() -> None:
    lam, lr = 0.3, 0.1
    base, reg = _model(), _model()
    masks = _masks(base)
    batches = _batches(1)
    penalty = sum(torch.linalg.vector_norm(base.state_dict()[n] * masks[n]).item() for n in PRUNABLE)
    start = copy.deepcopy(base.state_dict())
    s0 = feddip_train(base, masks, batches, torch.optim.SGD(base.parameters(), lr=lr), lambda_t=0.0)
    s1 = feddip_train(reg, masks, batches, torch.optim.SGD(reg.parameters(), lr=lr), lambda_t=lam)
    assert s1["loss"] - s0["loss"] == pytest.approx(lam * penalty, rel=1e-5)
    assert s1["ce-loss"] == pytest.approx(s0["ce-loss"], rel=1e-6)
    # the penalty's gradient is λ·(w⊙m)/‖w⊙m‖ (plain norm, not squared), zero at pruned positions
    for n in PRUNABLE:
        wm = start[n] * masks[n]
        expected_shift = -lr * lam * wm / torch.linalg.vector_norm(wm)
        torch.testing.assert_close(reg.state_dict()[n] - base.state_dict()[n], expected_shift, atol=1e-6, rtol=1e-4)


def test_proximal_term_zero_at_global_and_pulls_otherwise() -> None:
    mu, lr = 0.7, 0.1
    batches = _batches(1)
    plain, prox = _model(), _model()
    masks = _masks(plain)
    # the server sends the masked global model; the client starts from it, so w = w_global
    with torch.no_grad():
        for m in (plain, prox):
            for name, p in m.named_parameters():
                if name in masks:
                    p.mul_(masks[name])
    global_params = copy.deepcopy(prox.state_dict())
    feddip_train(plain, masks, batches, torch.optim.SGD(plain.parameters(), lr=lr), lambda_t=0.0)
    feddip_train(
        prox,
        masks,
        batches,
        torch.optim.SGD(prox.parameters(), lr=lr),
        lambda_t=0.0,
        proximal_mu=mu,
        global_params=global_params,
    )
    a, b = plain.state_dict(), prox.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_proximal_term_is_taken_at_the_dense_weights() -> None:
    """FedDIP+Prox's μ/2‖w − w_global‖² uses the dense local w (spec), not w ⊙ m: its gradient adds
    μ(w − w_global) everywhere, also at pruned positions, where w ⊙ m would give −μ·w_global."""
    mu, lr = 0.7, 0.1
    batches = _batches(1)
    start_model = _model()  # dense: nonzero values at pruned positions, as after error feedback
    masks = _masks(start_model)
    start = copy.deepcopy(start_model.state_dict())
    global_params = {n: t + 0.5 for n, t in start.items()}
    plain, prox = copy.deepcopy(start_model), copy.deepcopy(start_model)
    s_plain = feddip_train(plain, masks, batches, torch.optim.SGD(plain.parameters(), lr=lr), lambda_t=0.0)
    s_prox = feddip_train(
        prox,
        masks,
        batches,
        torch.optim.SGD(prox.parameters(), lr=lr),
        lambda_t=0.0,
        proximal_mu=mu,
        global_params=global_params,
    )
    penalty = 0.0
    for name, _ in prox.named_parameters():
        expected = -lr * mu * (start[name] - global_params[name])  # dense w, also for prunable layers
        torch.testing.assert_close(prox.state_dict()[name] - plain.state_dict()[name], expected, atol=1e-6, rtol=1e-4)
        penalty += float((start[name] - global_params[name]).pow(2).sum())
    for name in PRUNABLE:  # the masked variant would differ exactly at the pruned positions
        masked_w = start[name] * masks[name]
        assert not torch.allclose(start[name][~masks[name]], masked_w[~masks[name]])
    # the reported loss includes μ/2‖w − w_global‖² at the dense w; cross-entropy is unchanged
    assert s_prox["loss"] - s_plain["loss"] == pytest.approx(0.5 * mu * penalty, rel=1e-5)
    assert s_prox["ce-loss"] == pytest.approx(s_plain["ce-loss"], rel=1e-6)


def test_weights_restored_dense_after_exception() -> None:
    model = _model()
    masks = _masks(model)
    before = copy.deepcopy(model.state_dict())
    x, _ = _batches(1)[0]
    bad_labels = torch.full((x.shape[0],), 99)  # out of range: cross-entropy raises after forward
    with pytest.raises((IndexError, RuntimeError)):
        feddip_train(model, masks, [(x, bad_labels)], torch.optim.SGD(model.parameters(), lr=0.1), 0.1)
    for n in PRUNABLE:
        assert torch.equal(model.state_dict()[n], before[n])
        assert bool((model.state_dict()[n][~masks[n]] != 0).any())


def test_bad_arguments() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="not trainable parameters"):
        feddip_train(model, {"1.running_mean": torch.ones(4, dtype=torch.bool)}, [], opt, 0.0)
    with pytest.raises(ValueError, match="shape"):
        feddip_train(model, {"0.weight": torch.ones(3, dtype=torch.bool)}, [], opt, 0.0)
    with pytest.raises(ValueError, match="global_params"):
        feddip_train(model, {}, [], opt, 0.0, proximal_mu=0.1)
    assert feddip_train(model, {}, [], opt, 0.0)["num-steps"] == 0


def test_reg_grad_ratio_is_lambda_over_the_rest_of_the_gradient() -> None:
    """The reported ratio is λ / ‖∇CE‖ per masked layer, ∇CE taken at w ⊙ m (one step, no momentum)."""
    model = _model()
    masks = _masks(model)
    ((x, y),) = _batches(1)
    reference = _zeroed(model, masks)
    F.cross_entropy(reference(x), y).backward()
    params = dict(reference.named_parameters())
    expected = [0.01 / float(torch.linalg.vector_norm(params[n].grad)) for n in PRUNABLE]

    stats = feddip_train(model, masks, [(x, y)], torch.optim.SGD(model.parameters(), lr=0.1), lambda_t=0.01)
    assert stats["reg-grad-ratio"] == pytest.approx(expected, rel=1e-4)
    # without the penalty there is nothing to report
    again = feddip_train(_model(), masks, [(x, y)], torch.optim.SGD(_model().parameters(), lr=0.1), lambda_t=0.0)
    assert again["reg-grad-ratio"] == [0.0, 0.0]
