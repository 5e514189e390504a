"""The legacy UNet v2 network in plain torch: a VGG16-BN encoder and a nearest-upsampling decoder.

Parameter names and shapes match the legacy `unet.py` exactly, so a legacy `model.pt` (after
stripping DataParallel's `module.` prefix) loads strictly and legacy tools read our checkpoints.
The encoder is built here rather than taken from torchvision, keeping its layer indices as module
names (`encoder_blocks.2.14.weight`), which is what lets the legacy and the ImageNet VGG16-BN
weights load by name.

The model is a plain nn.Module with no device placement or parallel wrapper inside, so the caller
can move it, convert its BatchNorms to SyncBatchNorm and wrap it in DistributedDataParallel.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from plugin.errors import TaskError

# torchvision's "D" configuration: channel counts of the 3x3 convs, "M" = 2x2 max-pool.
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)
# Index of the last layer (a ReLU) of each encoder block in vgg16_bn().features; VGG's final
# max-pool (43) is not part of the network.
ENCODER_CUTS: tuple[int, ...] = (5, 12, 22, 32, 42)
ENCODER_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
# Input height and width must be multiples of this: four 2x2 pools, then four x2 upsamplings that
# must land exactly on the skip connections' sizes.
SIZE_DIVISOR = 16
# Built and saved by the legacy model but never used in forward; kept so state dicts load strictly.
UNUSED_PREFIX = "blocks.0."


def _vgg16_bn_layers() -> list[tuple[int, nn.Module]]:
    """(index in vgg16_bn().features, layer) up to and including the ReLU at index 42."""
    layers: list[tuple[int, nn.Module]] = []
    in_ch = 3
    for item in _VGG16_CFG:
        if item == "M":
            layers.append((len(layers), nn.MaxPool2d(kernel_size=2, stride=2)))
            continue
        out_ch = int(item)
        layers.append((len(layers), nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)))
        layers.append((len(layers), nn.BatchNorm2d(out_ch)))
        layers.append((len(layers), nn.ReLU(inplace=True)))
        in_ch = out_ch
    assert layers[-1][0] == ENCODER_CUTS[-1]
    return layers


def _encoder_blocks() -> nn.ModuleList:
    layers = _vgg16_bn_layers()
    blocks = []
    start = 0
    for cut in ENCODER_CUTS:
        blocks.append(nn.Sequential(OrderedDict((str(i), layer) for i, layer in layers[start : cut + 1])))
        start = cut + 1
    return nn.ModuleList(blocks)


class ConvBNAct(nn.Module):
    """3x3 conv (padding 1, bias) -> BN -> ReLU, held in `.seq` as the legacy names require."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class Block(nn.Module):
    """Three ConvBNAct: in -> out, out -> out, out -> out."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.seq1 = ConvBNAct(in_channels, out_channels)
        self.seq2 = ConvBNAct(out_channels, out_channels)
        self.seq3 = ConvBNAct(out_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq3(self.seq2(self.seq1(x)))


class Bottleneck(nn.Module):
    """Two dilated 3x3 convs; the output is cat([input, result]), doubling the channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=2, dilation=2)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn(self.conv(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        return torch.cat([x, y], dim=1)


class Up(nn.Module):
    """Nearest x2 upsampling, a 1x1 conv deep -> skip channels, then cat([skip, upsampled])."""

    def __init__(self, deep_channels: int, skip_channels: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = nn.Conv2d(deep_channels, skip_channels, kernel_size=1)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([skip, self.conv(self.up(deep))], dim=1)


class UNetV2(nn.Module):
    """Input (B, 3, H, W) normalised RGB, H and W multiples of 16 -> logits (B, num_classes, H, W)."""

    size_divisor = SIZE_DIVISOR

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.encoder_blocks = _encoder_blocks()
        self.bottle = Bottleneck(ENCODER_CHANNELS[-1])
        deep = [1024, 512, 256, 128]
        skip = [512, 256, 128, 64]
        self.ups = nn.ModuleList(Up(d, s) for d, s in zip(deep, skip))
        self.blocks = nn.ModuleList([Block(1024, 1024)] + [Block(2 * s, s) for s in skip])
        self.last_conv = nn.Conv2d(skip[-1], num_classes, kernel_size=1)
        self._init_encoder()

    def _init_encoder(self) -> None:
        # torchvision's VGG init, which the legacy encoder got from vgg16_bn(pretrained=False);
        # the decoder keeps PyTorch's defaults as it did there.
        for module in self.encoder_blocks.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.size_divisor)
        skips = []
        for block in self.encoder_blocks:
            x = block(x)
            skips.append(x)
        x = self.bottle(skips.pop())
        # blocks.0 is skipped on purpose: the legacy forward never used it.
        for up, block in zip(self.ups, list(self.blocks)[1:]):
            x = block(up(x, skips.pop()))
        return self.last_conv(x)


def check_input_size(x: torch.Tensor, divisor: int) -> None:
    """TaskError unless x is (B, 3, H, W) with H and W multiples of `divisor`, the network's size_divisor."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise TaskError(f"the model takes a (batch, 3, height, width) image tensor, got shape {tuple(x.shape)}",
                        where="model input")
    height, width = x.shape[-2:]
    if height % divisor or width % divisor:
        raise TaskError(
            f"the model input is {height}x{width} (HxW); height and width must be multiples of "
            f"{divisor} so that the decoder meets the encoder's skip connections",
            where="input_size",
        )
