"""A UNet decoder over an ImageNet encoder (plugin.nn.encoders), laid out as segmentation_models_pytorch's Unet.

The decoder climbs from the encoder's stride-32 map to full resolution in five blocks: each doubles
the size (nearest), concatenates the encoder's feature map of that stride where there is one, and
applies two 3x3 conv-BN-ReLU. A 1x1 conv, `last_conv`, gives the class logits; it is the one layer
whose shape depends on the number of classes, as in the legacy network, so the code that swaps or
checks the class-dependent layer treats both networks alike.

Like UNetV2 it is a plain nn.Module with no device placement, so the caller can move it, convert its
BatchNorms to SyncBatchNorm, and compile or export it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plugin.nn.encoders import create_encoder
from plugin.nn.model import check_input_size

DECODER_CHANNELS: tuple[int, ...] = (256, 128, 64, 32, 16)


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    # No conv bias: the BN's shift takes its place.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DecoderBlock(nn.Module):
    """x2 nearest upsampling, concatenation with the skip (if any), two 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels + skip_channels, out_channels)
        self.conv2 = _conv_bn_relu(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UNetDecoder(nn.Module):
    """Encoder features at strides 2..32 (channels `encoder_channels`) -> a map at stride 1."""

    def __init__(self, encoder_channels: tuple[int, ...]) -> None:
        super().__init__()
        deep = (encoder_channels[-1], *DECODER_CHANNELS[:-1])
        # The stride-16..2 features, then none: nothing of the encoder is at stride 1.
        skips = (*encoder_channels[-2::-1], 0)
        self.blocks = nn.ModuleList(DecoderBlock(d, s, o) for d, s, o in zip(deep, skips, DECODER_CHANNELS))
        self.out_channels = DECODER_CHANNELS[-1]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        skips: list[torch.Tensor | None] = [*features[-2::-1], None]
        for block, skip in zip(self.blocks, skips):
            x = block(x, skip)
        return x


class UNet(nn.Module):
    """Input (B, 3, H, W) ImageNet-normalised RGB, H and W multiples of 32 -> logits (B, num_classes, H, W)."""

    # Five stride-2 steps in the encoder, five x2 upsamplings that must land on the skips' sizes.
    size_divisor = 32

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.encoder = encoder
        self.decoder = UNetDecoder(encoder.channels)
        self.last_conv = nn.Conv2d(self.decoder.out_channels, num_classes, kernel_size=1)
        # segmentation_models_pytorch's initialisation of the decoder and the head, so that training
        # starts as there; the encoder keeps its own (or its ImageNet weights).
        for module in self.decoder.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.last_conv.weight)
        nn.init.zeros_(self.last_conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.size_divisor)
        return self.last_conv(self.decoder(self.encoder(x)))


def create_unet(encoder_name: str, num_classes: int) -> UNet:
    """A freshly initialised UNet over the named encoder (plugin.nn.encoders.ENCODER_NAMES), on the CPU,
    in training mode."""
    return UNet(create_encoder(encoder_name), num_classes)
