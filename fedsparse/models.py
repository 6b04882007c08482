"""Model registry: the networks the three papers train, built by name.

The experiments name a model in their run configuration (``model = "lenet5"``); this module turns
that name plus the dataset's shape into a ``torch.nn.Module``. The architectures follow the papers
(and, where a paper is vague, the authors' public setups), so that per-layer counts the methods
depend on come out right:

- FedDIP prunes every tensor with ``ndim > 1`` except ResNet shortcut convolutions: LeNet-5 has 5
  such tensors, AlexNet 8, ResNet-18 18 (+3 shortcut 1×1 convolutions, named
  ``*.shortcut.0.weight``).
- FedLUAR recycles every tensor with ``ndim > 1``: ResNet-20 has 23, the FEMNIST CNN 4.
- Deep partial updating uses an MLP 2×512 (MNIST) and a VGG-style CIFAR net.
- SmartIdx (Wu et al. 2022, appendix Table 1) uses reduced CNNs: ``vgg11-star`` (VGG11*),
  ``glnet-star`` (GLnet*, a small GoogLeNet) and ``resnet18-star`` (ResNet18*), for 1×28×28 and
  3×32×32 inputs (:mod:`fedsparse.models_star`).

All convolution/linear weights keep PyTorch's parameter names (``state_dict`` keys), which is what
travels in Flower ``ArrayRecord``s.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

MODEL_NAMES: tuple[str, ...] = (
    "lenet5",
    "mlp",
    "cnn",
    "alexnet",
    "resnet18",
    "resnet20",
    "vgg",
    "vgg11-star",
    "glnet-star",
    "resnet18-star",
)


def _pool_size(size: int, times: int) -> int:
    """Spatial size after ``times`` 2×2 max-pools (floor division, as ``nn.MaxPool2d(2)``)."""
    for _ in range(times):
        size //= 2
    return size


def _too_small(name: str, image_size: int, minimum: int) -> ValueError:
    return ValueError(f"model '{name}' cannot take image_size={image_size}: it needs image_size >= {minimum}")


class LeNet5(nn.Module):
    """Classic LeNet-5 (ReLU, max-pooling): conv6@5×5 → pool → conv16@5×5 → pool → 120 → 84 → C.

    For inputs smaller than 32×32 (MNIST / Fashion-MNIST 28×28) the first convolution pads by 2, so
    the feature map is 5×5×16 = 400 features as in the original 32×32 design; for 32×32 and larger
    (CIFAR) it does not pad. 1×28×28, 10 classes: 61,706 parameters (FedDIP Table III: ~62K), and
    exactly 5 weight tensors with ndim > 1 (FedDIP's Z = 5).
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        pad = 2 if image_size < 32 else 0
        size = image_size + 2 * pad - 4  # conv1, 5×5 valid
        size = size // 2 - 4  # pool, conv2
        size //= 2  # pool
        if size < 1:
            raise _too_small("lenet5", image_size, 12)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=pad),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * size * size, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class MLP(nn.Module):
    """Deep partial updating's MNIST MLP "2×512FC-10": flatten → 512 → 512 → C, ReLU.

    784 inputs, 10 classes: 669,706 parameters (the paper's "around 2.67 MB" of float32 weights).
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        in_features = in_channels * image_size * image_size
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FemnistCNN(nn.Module):
    """FedLUAR's FEMNIST "CNN" with "4 layers in total" (paper Table 4; δ = 2 is "half of them").

    The paper gives no further detail; we use the standard LEAF FEMNIST CNN, which has exactly four
    weight layers: conv 32@5×5 (same padding) → ReLU → max-pool 2 → conv 64@5×5 (same padding) →
    ReLU → max-pool 2 → fc 2048 → ReLU → fc C. For 1×28×28 and 62 classes that is 6,603,710
    parameters, most of them in the first fully-connected layer (consistent with the paper's remark
    that on FEMNIST the largest layer is the one recycled most).
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        size = _pool_size(image_size, 2)
        if size < 1:
            raise _too_small("cnn", image_size, 4)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * size * size, 2048),
            nn.ReLU(inplace=True),
            nn.Linear(2048, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class AlexNet(nn.Module):
    """FedDIP's CIFAR AlexNet: 5 convolutions + 3 fully-connected layers (8 prunable layers).

    conv 64@3×3 stride 2 → pool → conv 192@3×3 → pool → conv 384@3×3 → conv 256@3×3 → conv 256@3×3
    → pool → adaptive average pool to 2×2 → dropout → fc 4096 → dropout → fc 4096 → fc C (ReLU
    after each hidden layer). These widths are the ones for which RigL's ERK allocation at
    s_0 = 0.5 gives the layer densities the FedDIP spec quotes, [1, 1, .669, .557, .669, .931, .372,
    1]; 3×32×32 with 10 classes: 23,272,266 parameters.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        if _pool_size((image_size + 1) // 2, 3) < 1:
            raise _too_small("alexnet", image_size, 15)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 192, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(256 * 2 * 2, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 conv-BN layers and an identity or 1×1 conv-BN shortcut.

    The shortcut convolution is named ``shortcut.0`` so that callers can tell it apart from the
    block's own convolutions (FedDIP keeps shortcuts dense).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, projection: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if projection:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stem conv-BN-ReLU (no max-pool), stages of BasicBlocks, global
    average pooling, linear classifier.

    ``always_project`` gives every stage's first block a 1×1 conv shortcut even when the shape does
    not change (FedLUAR's ResNet-20 count of 23 layers needs it); otherwise a projection is used
    only where stride or width changes (He et al.'s option B).
    """

    def __init__(
        self,
        widths: tuple[int, ...],
        blocks: tuple[int, ...],
        num_classes: int,
        in_channels: int,
        always_project: bool,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages: list[nn.Module] = []
        for i, (planes, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers: list[nn.Module] = []
            for j in range(n):
                s = stride if j == 0 else 1
                project = (j == 0 and always_project) or s != 1 or in_planes != planes
                layers.append(BasicBlock(in_planes, planes, s, project))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        # Named layer1..layerN like torchvision / the FedDIP code.
        for i, stage in enumerate(stages, start=1):
            self.add_module(f"layer{i}", stage)
        self._num_stages = len(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        for i in range(1, self._num_stages + 1):
            out = getattr(self, f"layer{i}")(out)
        return self.linear(torch.flatten(self.avgpool(out), 1))


def _resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """FedDIP's CIFAR ResNet-18: widths 64-128-256-512, [2, 2, 2, 2] BasicBlocks, 1×1 conv
    shortcuts where the shape changes (3 of them). 21 tensors with ndim > 1; FedDIP counts 18
    prunable layers because the shortcuts stay dense. 100 classes: 11,220,132 parameters."""
    if _pool_size(image_size, 3) < 1:
        raise _too_small("resnet18", image_size, 8)
    return CifarResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels, False)


def _resnet20(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """He et al.'s CIFAR ResNet-20 (16/32/64 channels, 3 stages × 3 BasicBlocks, BN) with a 1×1
    conv shortcut in every stage's first block, stage 1 included, so that there are 23 tensors with
    ndim > 1 as FedLUAR's spec counts (stem, 18 block convs, 3 shortcuts, classifier)."""
    if _pool_size(image_size, 2) < 1:
        raise _too_small("resnet20", image_size, 4)
    return CifarResNet((16, 32, 64), (3, 3, 3), num_classes, in_channels, True)


class VGG(nn.Module):
    """Deep partial updating's CIFAR VGGNet "2×128C3-MP2-2×256C3-MP2-2×512C3-MP2-2×1024FC-10".

    3×3 convolutions (padding 1, no bias) each followed by BatchNorm and ReLU — the binarised-VGG
    lineage the paper cites (Courbariaux et al., Rastegari et al.) uses BatchNorm; fully-connected
    layers with bias and ReLU, no dropout; a linear output layer (the paper's "10SVM" trained with
    cross-entropy). The weight tensors alone are 14,022,016 floats = 56.09 MB, the paper's figure;
    3×32×32, 10 classes: 14,027,658 parameters in all.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        size = _pool_size(image_size, 3)
        if size < 1:
            raise _too_small("vgg", image_size, 8)
        layers: list[nn.Module] = []
        c_in = in_channels
        for width in (128, 256, 512):
            for _ in range(2):
                layers += [
                    nn.Conv2d(c_in, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                c_in = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(512 * size * size, 1024),
            nn.ReLU(inplace=True),
            nn.Linear(1024, 1024),
            nn.ReLU(inplace=True),
            nn.Linear(1024, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


_BUILDERS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "lenet5": LeNet5,
    "mlp": MLP,
    "cnn": FemnistCNN,
    "alexnet": AlexNet,
    "resnet18": _resnet18,
    "resnet20": _resnet20,
    "vgg": VGG,
}


def _star(name: str) -> Callable[[int, int, int], nn.Module]:
    """The builder of a SmartIdx model, imported on first use (they live in their own module, which
    builds on :class:`BasicBlock` here)."""

    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        from fedsparse import models_star

        return models_star.BUILDERS[name](num_classes, in_channels, image_size)

    return build


for _name in ("vgg11-star", "glnet-star", "resnet18-star"):
    _BUILDERS[_name] = _star(_name)
assert tuple(_BUILDERS) == MODEL_NAMES


def build_model(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Build model ``name`` for square ``in_channels``×``image_size``×``image_size`` inputs.

    Raises ``ValueError`` for an unknown name (listing the choices), for non-positive sizes, and
    when the architecture's down-sampling would leave no spatial extent for ``image_size``.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(MODEL_NAMES)}")
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model '{name}': {arg} must be a positive integer, got {value!r}")
    return _BUILDERS[name](num_classes, in_channels, image_size)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter elements (buffers such as BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
