"""Tests for fedsparse.models: parameter counts, layer counts, forward shapes, ERK densities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsparse.models import MODEL_NAMES, build_model, count_parameters


def conv(cin: int, cout: int, k: int, bias: bool = True) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def fc(fin: int, fout: int) -> int:
    return fin * fout + fout


def bn(c: int) -> int:
    return 2 * c  # weight + bias (running stats are buffers)


def basic_block(cin: int, cout: int, project: bool) -> int:
    n = conv(cin, cout, 3, False) + bn(cout) + conv(cout, cout, 3, False) + bn(cout)
    if project:
        n += conv(cin, cout, 1, False) + bn(cout)
    return n


def cbr(cin: int, cout: int, k: int) -> int:
    """A convolution without bias followed by BatchNorm (fedsparse/models_star.py)."""
    return conv(cin, cout, k, False) + bn(cout)


def inception_v1(cin: int) -> int:
    """GLnet*'s Inception module (fedsparse/models_star.py): 1×1 32 | 1×1 48 → 3×3 64 | 1×1 8 → 5×5 16 |
    pool → 1×1 16, each convolution with BatchNorm."""
    return cbr(cin, 32, 1) + cbr(cin, 48, 1) + cbr(48, 64, 3) + cbr(cin, 8, 1) + cbr(8, 16, 5) + cbr(cin, 16, 1)


def vgg11_star(cin: int, size: int) -> int:
    """SmartIdx appendix Table 1, VGG11*: 3×3 convs 16, 32, 64, 64, 128, 128 (4 max-pools), FC 128, output."""
    final = size // 16
    return (
        cbr(cin, 16, 3)
        + cbr(16, 32, 3)
        + cbr(32, 64, 3)
        + cbr(64, 64, 3)
        + cbr(64, 128, 3)
        + cbr(128, 128, 3)
        + fc(128 * final * final, 128)
        + fc(128, 10)
    )


def glnet_star(cin: int) -> int:
    """Table 1, GLnet*: 7×7 conv 24, 1×1 conv 65, 3×3 conv 128, three Inception V1, FC 128, output."""
    return cbr(cin, 24, 7) + cbr(24, 65, 1) + cbr(65, 128, 3) + 3 * inception_v1(128) + fc(128, 128) + fc(128, 10)


def resnet18_star(cin: int) -> int:
    """Table 1, ResNet18*: 7×7 conv 32 (BN), identity, identity, conv block 64, identity, conv block
    128, identity, FC 128, output."""
    return (
        conv(cin, 32, 7, False)
        + bn(32)
        + 2 * basic_block(32, 32, False)
        + basic_block(32, 64, True)
        + basic_block(64, 64, False)
        + basic_block(64, 128, True)
        + basic_block(128, 128, False)
        + fc(128, 128)
        + fc(128, 10)
    )


EXPECTED_PARAMS = {
    # (name, classes, channels, size): hand-computed from the layer shapes
    ("lenet5", 10, 1, 28): conv(1, 6, 5) + conv(6, 16, 5) + fc(400, 120) + fc(120, 84) + fc(84, 10),
    ("lenet5", 10, 3, 32): conv(3, 6, 5) + conv(6, 16, 5) + fc(400, 120) + fc(120, 84) + fc(84, 10),
    ("mlp", 10, 1, 28): fc(784, 512) + fc(512, 512) + fc(512, 10),
    ("cnn", 62, 1, 28): conv(1, 32, 5) + conv(32, 64, 5) + fc(64 * 7 * 7, 2048) + fc(2048, 62),
    ("alexnet", 10, 3, 32): conv(3, 64, 3)
    + conv(64, 192, 3)
    + conv(192, 384, 3)
    + conv(384, 256, 3)
    + conv(256, 256, 3)
    + fc(1024, 4096)
    + fc(4096, 4096)
    + fc(4096, 10),
    ("resnet18", 100, 3, 32): conv(3, 64, 3, False)
    + bn(64)
    + 2 * basic_block(64, 64, False)
    + basic_block(64, 128, True)
    + basic_block(128, 128, False)
    + basic_block(128, 256, True)
    + basic_block(256, 256, False)
    + basic_block(256, 512, True)
    + basic_block(512, 512, False)
    + fc(512, 100),
    ("resnet20", 10, 3, 32): conv(3, 16, 3, False)
    + bn(16)
    + basic_block(16, 16, True)
    + 2 * basic_block(16, 16, False)
    + basic_block(16, 32, True)
    + 2 * basic_block(32, 32, False)
    + basic_block(32, 64, True)
    + 2 * basic_block(64, 64, False)
    + fc(64, 10),
    ("vgg", 10, 3, 32): conv(3, 128, 3, False)
    + conv(128, 128, 3, False)
    + conv(128, 256, 3, False)
    + conv(256, 256, 3, False)
    + conv(256, 512, 3, False)
    + conv(512, 512, 3, False)
    + 2 * (bn(128) + bn(256) + bn(512))
    + fc(512 * 4 * 4, 1024)
    + fc(1024, 1024)
    + fc(1024, 10),
    # SmartIdx's reduced CNNs: the appendix gives no parameter counts, so these are the arithmetic
    # of its Table 1 with the widths it leaves open chosen in fedsparse/models_star.py
    ("vgg11-star", 10, 1, 28): vgg11_star(1, 28),
    ("vgg11-star", 10, 3, 32): vgg11_star(3, 32),
    ("glnet-star", 10, 1, 28): glnet_star(1),
    ("glnet-star", 10, 3, 32): glnet_star(3),
    ("resnet18-star", 10, 1, 28): resnet18_star(1),
    ("resnet18-star", 10, 3, 32): resnet18_star(3),
}


def test_reference_figures_by_hand() -> None:
    # Sanity of the hand formulas against the figures quoted in the brief / papers.
    assert EXPECTED_PARAMS[("lenet5", 10, 1, 28)] == 61706
    assert EXPECTED_PARAMS[("mlp", 10, 1, 28)] == 669706
    assert abs(EXPECTED_PARAMS[("resnet18", 100, 3, 32)] - 11.22e6) < 0.01e6
    # VGG11*, 1×28×28: 16·9 + 32·16·9 + 64·32·9 + 64·64·9 + 128·64·9 + 128·128·9 (no conv bias)
    # + 2·(16+32+64+64+128+128) BatchNorm + 128·128+128 + 128·10+10 (four pools leave 1×1)
    assert EXPECTED_PARAMS[("vgg11-star", 10, 1, 28)] == 299_898


# One model instance per configuration for the whole module (building AlexNet/VGG costs ~0.2 s).
_CACHE: dict[tuple[str, int, int, int], torch.nn.Module] = {}


def _model(key: tuple[str, int, int, int]) -> torch.nn.Module:
    if key not in _CACHE:
        torch.manual_seed(0)
        _CACHE[key] = build_model(*key)
    return _CACHE[key]


@pytest.mark.parametrize("key", list(EXPECTED_PARAMS), ids=lambda k: "-".join(map(str, k)))
def test_parameter_count_and_forward(key: tuple[str, int, int, int]) -> None:
    name, classes, channels, size = key
    model = _model(key)
    assert count_parameters(model) == EXPECTED_PARAMS[key]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


def test_every_registered_model_is_tested() -> None:
    assert {k[0] for k in EXPECTED_PARAMS} == set(MODEL_NAMES)


def _weight_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.ndim > 1]


@pytest.mark.parametrize(
    ("key", "total", "shortcuts"),
    [
        (("lenet5", 10, 1, 28), 5, 0),  # FedDIP's Z = 5
        (("alexnet", 10, 3, 32), 8, 0),  # FedDIP's Z = 8
        (("resnet18", 100, 3, 32), 21, 3),  # FedDIP counts 18 prunable: shortcuts stay dense
        (("resnet20", 10, 3, 32), 23, 3),  # FedLUAR's 23 recyclable layers
        (("cnn", 62, 1, 28), 4, 0),  # FedLUAR's "4 layers in total"
        (("vgg11-star", 10, 1, 28), 8, 0),  # Table 1: 6 convolutions, FC, output
        (("glnet-star", 10, 1, 28), 23, 0),  # 3 convolutions, 3 Inception modules of 6, FC, output
        (("resnet18-star", 10, 1, 28), 17, 2),  # stem, 6 blocks of 2, 2 conv-block projections, FC, output
    ],
)
def test_weight_tensor_counts(key: tuple[str, int, int, int], total: int, shortcuts: int) -> None:
    tensors = _weight_tensors(_model(key))
    assert len(tensors) == total
    assert sum("shortcut" in n for n, _ in tensors) == shortcuts


@pytest.mark.parametrize("name", ["vgg11-star", "glnet-star", "resnet18-star"])
def test_smartidx_models_keep_no_running_statistics(name: str) -> None:
    """SmartIdx's CNNs normalise with batch statistics only: their state is the trainable parameters
    (nothing for an uplink compressor to mangle), and evaluation works on a batch."""
    model = build_model(name, 10, 1, 28)
    assert list(model.buffers()) == []
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(4, 1, 28, 28))).all()


def test_count_parameters_ignores_frozen_and_buffers() -> None:
    model = build_model("lenet5", 10, 1, 28)
    model.features[0].weight.requires_grad_(False)
    assert count_parameters(model) == 61706 - 6 * 25
    bn_model = _model(("resnet20", 10, 3, 32))
    buffers = sum(b.numel() for b in bn_model.buffers())
    assert buffers > 0
    assert count_parameters(bn_model) == EXPECTED_PARAMS[("resnet20", 10, 3, 32)]


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'lenet'.*lenet5.*resnet20.*vgg"):
        build_model("lenet", 10, 1, 28)


@pytest.mark.parametrize(("name", "size"), [("lenet5", 8), ("vgg", 4), ("alexnet", 8)])
def test_too_small_image_is_a_clear_error(name: str, size: int) -> None:
    with pytest.raises(ValueError, match=rf"'{name}'.*image_size={size}"):
        build_model(name, 10, 3, size)


def test_non_positive_sizes_rejected() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", 0, 1, 28)


def erk_densities(shapes: list[tuple[int, ...]], density: float) -> np.ndarray:
    """RigL's ERK: density_l ∝ Σdims/Πdims, scaled to the total density; layers that would exceed
    1 are made dense one at a time (largest raw score first) and the rest rescaled."""
    n = np.array([np.prod(s) for s in shapes], dtype=float)
    raw = np.array([sum(s) / np.prod(s) for s in shapes], dtype=float)
    dense = np.zeros(len(shapes), dtype=bool)
    while True:
        eps = (density * n.sum() - n[dense].sum()) / (raw[~dense] * n[~dense]).sum()
        d = np.where(dense, 1.0, eps * raw)
        if not (d[~dense] > 1).any():
            return d
        dense[np.argmax(np.where(dense, -np.inf, raw))] = True


@pytest.mark.parametrize(
    ("key", "reference"),
    [
        (("lenet5", 10, 1, 28), [1.0, 0.525, 0.426, 0.796, 1.0]),
        (("alexnet", 10, 3, 32), [1.0, 1.0, 0.669, 0.557, 0.669, 0.931, 0.372, 1.0]),
    ],
)
def test_erk_densities_match_feddip_reference(key: tuple[str, int, int, int], reference: list[float]) -> None:
    shapes = [tuple(p.shape) for _, p in _weight_tensors(_model(key))]
    d = erk_densities(shapes, 0.5)
    np.testing.assert_allclose(d, reference, atol=0.005)
    n = np.array([np.prod(s) for s in shapes])
    assert abs((d * n).sum() / n.sum() - 0.5) < 1e-9
