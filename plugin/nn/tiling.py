"""Tiled prediction: RGB crops -> class probabilities, and whole images by Gaussian-blended windows.

Inference (sliding_window, and every mode of a model trained on crops) and the validation of crop
training call the same two functions, so the figures that validation logs are those of the
predictions that inference will write.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plugin.nn.precision import FLOAT32, Precision
from plugin.nn.preprocess import PAD_COLOR, normalize, resize_image

log = logging.getLogger(__name__)

# Windows are blended with Gaussian weights of this sigma (a fraction of the window side) so that
# predictions near a window's border, which see less context, count less. nnU-Net's 1/8: with 1/4 a
# window's border still weighs 0.14 of a centre, and with half-window overlap its seam stays visible.
# The floor keeps pixels that only one window's border covers (at the image border) defined.
WINDOW_SIGMA = 1 / 8
WINDOW_WEIGHT_FLOOR = 1e-3

# Test-time augmentation flips by config name -> the (N, C, H, W) dims they reverse.
FLIPS: dict[str, tuple[int, ...]] = {"horizontal": (3,), "vertical": (2,), "both": (2, 3)}

# (top, left) of each window, in the padded image
Positions = list[tuple[int, int]]

# What predicts: a normalised float32 batch (N, 3, h, w) -> softmax probabilities (N, C, h, w), float32,
# on the batch's device. A torch model (TorchNetwork) or an exported ONNX file (inference.onnx_model):
# everything around the forward (resizing, tiling, TTA) is the same code for both.
Network = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TorchNetwork:
    """A torch model as a Network: the forward in `precision`, the softmax in float32."""

    model: nn.Module
    precision: Precision = FLOAT32

    @property
    def name(self) -> str:
        return f"torch, {self.precision.name}"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.precision.logits(self.model, batch), dim=1)


def crop_probabilities(
    network: Network,
    crops: Sequence[np.ndarray],
    input_size: tuple[int, int],
    device: torch.device,
    flips: Sequence[str] = (),
) -> torch.Tensor:
    """Softmax probabilities (N, C, h, w) of same-sized RGB uint8 crops (h, w), on `device`.

    Each crop is resized to input_size (width, height) as in training and the output resized back
    (bilinear, which keeps probabilities in [0, 1] and summing to 1). With `flips` (FLIPS names), the
    mean over the plain pass and each flip, flipped back. The caller picks no_grad or inference_mode.
    """
    probs = network_probabilities(network, network_inputs(crops, input_size).to(device), flips)
    return resize_probabilities(probs, crops[0].shape[:2])


def network_inputs(crops: Sequence[np.ndarray], input_size: tuple[int, int]) -> torch.Tensor:
    """float32 (N, 3, height, width) network inputs of RGB uint8 crops of any sizes, each resized to
    input_size (width, height) and normalised as in training."""
    width, height = input_size
    return torch.stack([normalize(resize_image(crop, width, height)) for crop in crops])


def network_probabilities(network: Network, batch: torch.Tensor, flips: Sequence[str] = ()) -> torch.Tensor:
    """Softmax probabilities (N, C, h, w) of a batch of network inputs, averaged over `flips` (float32)."""
    probs = network(batch)
    # One pass per flip rather than one 4x batch: the caller's batch size bounds the memory.
    for name in flips:
        dims = FLIPS[name]
        probs += network(batch.flip(dims)).flip(dims)
    probs /= 1 + len(flips)
    return probs


def resize_probabilities(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) probabilities resized to size (height, width), bilinear: still in [0, 1] and summing to 1."""
    if tuple(probs.shape[2:]) == tuple(size):
        return probs
    return F.interpolate(probs, size=tuple(size), mode="bilinear", align_corners=False)


def training_window(input_size: tuple[int, int], factor: float) -> tuple[int, int]:
    """The (width, height) in image pixels that a crop-trained model saw as one input_size crop."""
    return max(1, round(input_size[0] / factor)), max(1, round(input_size[1] / factor))


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Legacy window positions along one axis: k * stride, the last one flush with the far border."""
    if length <= window:
        return [0]
    return [min(k * stride, length - window) for k in range(math.ceil((length - window) / stride) + 1)]


def window_weights(height: int, width: int) -> np.ndarray:
    """float32 (h, w) Gaussian weights peaking at the window's centre, floored above zero."""
    def axis(n: int) -> np.ndarray:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        return np.exp(-0.5 * (x / max(n * WINDOW_SIGMA, 1e-6)) ** 2)

    weights = np.outer(axis(height), axis(width))
    return np.maximum(weights / weights.max(), WINDOW_WEIGHT_FLOOR).astype(np.float32)


def pad_to(image: np.ndarray, height: int, width: int, value: object = PAD_COLOR) -> np.ndarray:
    """`image` grown at the bottom and right to at least (height, width), filled with `value`
    (training pads its crops the same way, so the network knows what padding looks like)."""
    pad_bottom, pad_right = max(0, height - image.shape[0]), max(0, width - image.shape[1])
    if not pad_bottom and not pad_right:
        return image
    return cv2.copyMakeBorder(image, 0, pad_bottom, 0, pad_right, cv2.BORDER_CONSTANT, value=value)


def predict_tiled(
    predict: Callable[[list[np.ndarray]], torch.Tensor],
    image: np.ndarray,
    window: tuple[int, int],
    min_overlap: tuple[int, int],
    batch_size: int,
    num_classes: int,
    device: torch.device,
) -> tuple[torch.Tensor, Positions]:
    """Probabilities (C, H, W) of an RGB image from (width, height) windows overlapping by at least
    min_overlap (x, y), predicted `batch_size` at a time by `predict` (tiles -> (N, C, h, w)) and
    blended with Gaussian weights, so that no seams show; also the windows' (top, left).

    An image smaller than a window is padded to it first. The accumulators stay on `device` when
    they fit in a quarter of its free memory, else on the CPU.
    """
    win_w, win_h = window
    height, width = image.shape[:2]
    padded = pad_to(image, win_h, win_w)
    pad_h, pad_w = padded.shape[:2]
    tops = window_starts(pad_h, win_h, win_h - min_overlap[1])
    lefts = window_starts(pad_w, win_w, win_w - min_overlap[0])

    acc_device = _accumulator_device(device, pad_h * pad_w * (num_classes + 1) * 4)
    acc = torch.zeros((num_classes, pad_h, pad_w), dtype=torch.float32, device=acc_device)
    weight_sum = torch.zeros((pad_h, pad_w), dtype=torch.float32, device=acc_device)
    weights = torch.from_numpy(window_weights(win_h, win_w)).to(acc_device)
    positions = [(top, left) for top in tops for left in lefts]
    for start in range(0, len(positions), batch_size):
        batch = positions[start : start + batch_size]
        probs = predict([padded[top : top + win_h, left : left + win_w] for top, left in batch]).to(acc_device)
        for (top, left), tile_probs in zip(batch, probs):
            acc[:, top : top + win_h, left : left + win_w] += tile_probs * weights
            weight_sum[top : top + win_h, left : left + win_w] += weights
    acc /= weight_sum
    return acc[:, :height, :width], positions


def _accumulator_device(device: torch.device, nbytes: int) -> torch.device:
    if device.type != "cuda":
        return device
    free, _total = torch.cuda.mem_get_info(device)
    if nbytes <= free // 4:
        return device
    log.info(
        f"the sliding-window accumulators ({nbytes / 2**20:.0f} MiB) go to the CPU: the GPU has "
        f"{free / 2**20:.0f} MiB free",
    )
    return torch.device("cpu")
