"""Image classifiers for the imaging tasks, all Opacus-ready when ``norm`` is ``group``.

Networks (``task.model``):
- ``cnn``: a compact VGG-style CNN (four conv stages, global average pooling).
- ``resnet18``: torchvision's ResNet-18 (no pretrained weights: the project runs offline), with
  a one-channel stem. For small images (<= 64 px) the stem is the CIFAR/MedMNIST-style 3x3
  stride-1 conv without max pooling, so a 28x28 film is not reduced to 1x1 after two layers.
- ``densenet121``: MONAI's DenseNet-121 (2D, 1 channel), 7M parameters.
- ``densenet_small``: a MONAI DenseNet with three short dense blocks (about 0.2M parameters),
  small enough to train on a CPU.

Normalisation (``task.norm``): ``group`` (GroupNorm with ``task.norm_groups`` groups, or the
largest divisor of a layer's channels below it; works with Opacus and small batches),
``batch`` (BatchNorm; what FedBN keeps local), ``instance`` (affine InstanceNorm).

Why "Opacus-ready" needs more than GroupNorm: Opacus's hooks break on in-place ReLU and on
in-place residual adds (``out += identity``), so every activation here has ``inplace=False``
and the ResNet block adds with ``out = out + identity``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from monai.networks.nets import DenseNet, DenseNet121
from omegaconf import DictConfig
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, ResNet

MODELS = ("cnn", "resnet18", "densenet121", "densenet_small")
NORMS = ("group", "batch", "instance")
# Default GroupNorm groups; every channel count used below is a multiple of this.
GROUPS = 8


def norm_layer(norm: str, channels: int, groups: int = GROUPS) -> nn.Module:
    """A 2D normalisation layer over ``channels`` channels (``groups``: GroupNorm only)."""
    if norm == "group":
        return nn.GroupNorm(_groups(channels, groups), channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"task.norm must be one of {', '.join(NORMS)}, got '{norm}'")


def _groups(channels: int, groups: int) -> int:
    # the largest group count <= groups that divides the channels (1 = LayerNorm-like,
    # channels = InstanceNorm-like)
    return next(g for g in range(min(groups, channels), 0, -1) if channels % g == 0)


class CompactCNN(nn.Module):
    """Four conv stages (conv-norm-ReLU x2, then 2x2 max pooling) and a linear head.

    Global average pooling makes it independent of the image size (28 to 256 px).
    """

    def __init__(
        self, in_channels: int, num_classes: int, norm: str = "group",
        widths: tuple[int, ...] = (16, 32, 64, 128), dropout: float = 0.0,
        groups: int = GROUPS,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            for _ in range(2):
                layers += [
                    nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                    norm_layer(norm, width, groups),
                    nn.ReLU(inplace=False),
                ]
                channels = width
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (batch, num_classes)."""
        features = self.pool(self.features(x)).flatten(1)
        return self.head(self.dropout(features))


class AddBasicBlock(BasicBlock):
    """torchvision's ResNet BasicBlock with an out-of-place residual add and ReLU.

    ``out += identity`` (torchvision) modifies a tensor that Opacus's backward hooks still
    need; ``out = out + identity`` computes the same function without that.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        """conv-norm-ReLU-conv-norm, plus the (downsampled) input, then ReLU."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu(out)


def resnet18(
    in_channels: int, num_classes: int, norm: str, image_size: int, groups: int = GROUPS
) -> nn.Module:
    """ResNet-18 (random init) with a one-channel stem; small-image stem up to 64 px."""
    model = ResNet(AddBasicBlock, [2, 2, 2, 2], num_classes=num_classes,
                   norm_layer=_norm_factory(norm, groups))
    if image_size <= 64:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.relu = nn.ReLU(inplace=False)
    return model


def _norm_factory(norm: str, groups: int) -> Callable[[int], nn.Module]:
    def make(channels: int) -> nn.Module:
        return norm_layer(norm, channels, groups)

    norm_layer(norm, groups, groups)  # fail early on an unknown norm
    return make


def _monai_norm(norm: str, groups: int) -> str | tuple[str, dict[str, Any]]:
    if norm == "group":
        return ("group", {"num_groups": groups})
    if norm == "batch":
        return "batch"
    if norm == "instance":
        return ("instance", {"affine": True})
    raise ValueError(f"task.norm must be one of {', '.join(NORMS)}, got '{norm}'")


# MONAI's default activation is ReLU(inplace=True), which Opacus cannot hook.
_ACT = ("relu", {"inplace": False})


def densenet121(
    in_channels: int, num_classes: int, norm: str, groups: int = GROUPS
) -> nn.Module:
    """MONAI DenseNet-121 (2D). Channel counts are multiples of 32: ``groups`` must divide 32."""
    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_classes,
                       norm=_monai_norm(norm, groups), act=_ACT)


def densenet_small(
    in_channels: int, num_classes: int, norm: str, groups: int = GROUPS
) -> nn.Module:
    """A small MONAI DenseNet: 32 initial features, growth 16, blocks of 4/4/4 layers.

    Channel counts (32 + 16k, halved at each transition: 48, 56, 120) are multiples of 8,
    so ``groups`` must divide 8.
    """
    return DenseNet(spatial_dims=2, in_channels=in_channels, out_channels=num_classes,
                    init_features=32, growth_rate=16, block_config=(4, 4, 4), bn_size=4,
                    norm=_monai_norm(norm, groups), act=_ACT)


def build_image_model(cfg: DictConfig, info: dict[str, Any]) -> nn.Module:
    """The network ``cfg.task.model`` for images described by ``info``.

    ``info`` comes from the sites: ``in_channels``, ``image_size``, ``num_classes``.
    """
    name, norm = cfg.task.model, cfg.task.get("norm", "group")
    groups = cfg.task.get("norm_groups", GROUPS)
    in_channels = int(info.get("in_channels", 1))
    num_classes = int(info.get("num_classes", 2))
    image_size = int(info["image_size"])
    if name == "cnn":
        widths = tuple(int(w) for w in cfg.task.get("cnn_widths", (16, 32, 64, 128)))
        return CompactCNN(in_channels, num_classes, norm, widths,
                          cfg.task.get("dropout", 0.0), groups)
    if name == "resnet18":
        return resnet18(in_channels, num_classes, norm, image_size, groups)
    if name == "densenet121":
        return densenet121(in_channels, num_classes, norm, groups)
    if name == "densenet_small":
        return densenet_small(in_channels, num_classes, norm, groups)
    raise ValueError(f"task.model must be one of {', '.join(MODELS)}, got '{name}'")
