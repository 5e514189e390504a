"""Inference modes: an RGB image -> class probabilities over the pixels the mode covers.

Every mode returns a `Prediction`: probabilities (C, H, W) float32 at the image's size, summing to 1
at each covered pixel, and which pixels are covered (roi and bboxes predict only inside their boxes).
Regions that overlap are merged by probability (weighted averages), never by drawing order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from plugin.config import parse_side
from plugin.format.geometry import Rectangle, bounding_box
from plugin.format.project import Label
from plugin.inference.predictor import Predictor

log = logging.getLogger(__name__)

# Windows are blended with Gaussian weights of this sigma (a fraction of the window side) so that
# predictions near a window's border, which see less context, count less. nnU-Net's 1/8: with 1/4 a
# window's border still weighs 0.14 of a centre, and with half-window overlap its seam stays visible.
# The floor keeps pixels that only one window's border covers (at the image border) defined.
WINDOW_SIGMA = 1 / 8
WINDOW_WEIGHT_FLOOR = 1e-3


@dataclass
class Prediction:
    probs: np.ndarray  # float32 (C, H, W); meaningful where `covered`
    covered: np.ndarray | None  # bool (H, W); None = every pixel
    boxes: list[Rectangle]  # the regions predicted (saved as objects when the config asks)
    box_sources: list[str] = field(default_factory=list)  # bboxes: the class of the object behind each box

    def class_map(self) -> np.ndarray:
        """uint8 (H, W) argmax class; 255 where nothing was predicted."""
        labels = self.probs.argmax(axis=0).astype(np.uint8)
        if self.covered is not None:
            labels[~self.covered] = 255
        return labels


def full_image(predictor: Predictor, image: np.ndarray) -> Prediction:
    """The whole image resized to the model's input size, probabilities resized back (bilinear)."""
    probs = predictor.probabilities([image])[0].cpu().numpy()
    height, width = image.shape[:2]
    return Prediction(probs, None, [Rectangle(0, 0, width - 1, height - 1)])


def roi(predictor: Predictor, image: np.ndarray, bounds: dict[str, str]) -> Prediction:
    """Predict inside the box left by cutting `bounds` ("10px" / "10%" per side) off the image."""
    height, width = image.shape[:2]
    box = Rectangle(
        left=parse_side(bounds["left"], width, "mode.bounds.left"),
        top=parse_side(bounds["top"], height, "mode.bounds.top"),
        right=width - 1 - parse_side(bounds["right"], width, "mode.bounds.right"),
        bottom=height - 1 - parse_side(bounds["bottom"], height, "mode.bounds.bottom"),
    )
    return _merge_boxes(predictor, image, [box])[0]


def bboxes(
    predictor: Predictor, image: np.ndarray, labels: Sequence[Label], padding: dict[str, str]
) -> Prediction:
    """Predict inside each label's bounding box grown by `padding` (relative to the box's own size)."""
    boxes = []
    for label in labels:
        box = bounding_box(label.geometry)
        box_w, box_h = box.right - box.left + 1, box.bottom - box.top + 1
        boxes.append(Rectangle(
            left=box.left - parse_side(padding["left"], box_w, "mode.padding.left"),
            top=box.top - parse_side(padding["top"], box_h, "mode.padding.top"),
            right=box.right + parse_side(padding["right"], box_w, "mode.padding.right"),
            bottom=box.bottom + parse_side(padding["bottom"], box_h, "mode.padding.bottom"),
        ))
    prediction, kept = _merge_boxes(predictor, image, boxes)
    prediction.box_sources = [labels[i].class_title for i in kept]
    return prediction


def _merge_boxes(
    predictor: Predictor, image: np.ndarray, boxes: Sequence[Rectangle]
) -> tuple[Prediction, list[int]]:
    """Predict each box (cropped to the image) and average the probabilities where boxes overlap;
    also returns the indices of the boxes kept (a box wholly outside the image is skipped)."""
    height, width = image.shape[:2]
    probs = np.zeros((predictor.num_classes, height, width), np.float32)
    counts = np.zeros((height, width), np.float32)
    kept_boxes, kept = [], []
    for i, box in enumerate(boxes):
        left, top = max(box.left, 0), max(box.top, 0)
        right, bottom = min(box.right, width - 1), min(box.bottom, height - 1)
        if left > right or top > bottom:
            log.warning(f"a box {box} lies outside the {width}x{height} image and is skipped")
            continue
        crop = image[top : bottom + 1, left : right + 1]
        probs[:, top : bottom + 1, left : right + 1] += predictor.probabilities([crop])[0].cpu().numpy()
        counts[top : bottom + 1, left : right + 1] += 1
        kept_boxes.append(Rectangle(left, top, right, bottom))
        kept.append(i)
    covered = counts > 0
    np.divide(probs, counts, out=probs, where=covered)
    return Prediction(probs, covered, kept_boxes), kept


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


def sliding_window(
    predictor: Predictor,
    image: np.ndarray,
    window: tuple[int, int],
    min_overlap: tuple[int, int],
    batch_size: int,
) -> Prediction:
    """Tile the image with (width, height) windows overlapping by at least min_overlap (x, y), predict
    the tiles in batches and blend them with Gaussian weights, so that no seams show.

    An image smaller than a window is padded (mirrored) to the window's size first. The accumulators
    stay on the model's device when they fit in a quarter of its free memory, else on the CPU.
    """
    win_w, win_h = window
    height, width = image.shape[:2]
    padded = _pad_to(image, win_h, win_w)
    pad_h, pad_w = padded.shape[:2]
    tops = window_starts(pad_h, win_h, win_h - min_overlap[1])
    lefts = window_starts(pad_w, win_w, win_w - min_overlap[0])

    device = _accumulator_device(predictor, pad_h * pad_w * (predictor.num_classes + 1) * 4)
    acc = torch.zeros((predictor.num_classes, pad_h, pad_w), dtype=torch.float32, device=device)
    weight_sum = torch.zeros((pad_h, pad_w), dtype=torch.float32, device=device)
    weights = torch.from_numpy(window_weights(win_h, win_w)).to(device)
    positions = [(top, left) for top in tops for left in lefts]
    for batch in _batches(positions, batch_size):
        tiles = [padded[top : top + win_h, left : left + win_w] for top, left in batch]
        probs = predictor.probabilities(tiles).to(device)
        for (top, left), tile_probs in zip(batch, probs):
            acc[:, top : top + win_h, left : left + win_w] += tile_probs * weights
            weight_sum[top : top + win_h, left : left + win_w] += weights
    acc /= weight_sum
    boxes = [
        Rectangle(left, top, min(left + win_w, width) - 1, min(top + win_h, height) - 1)
        for top, left in positions
        if top < height and left < width
    ]
    return Prediction(acc[:, :height, :width].cpu().numpy(), None, boxes)


def _pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    pad_bottom, pad_right = max(0, height - image.shape[0]), max(0, width - image.shape[1])
    if not pad_bottom and not pad_right:
        return image
    return cv2.copyMakeBorder(image, 0, pad_bottom, 0, pad_right, cv2.BORDER_REFLECT_101)


def _accumulator_device(predictor: Predictor, nbytes: int) -> torch.device:
    if predictor.device.type != "cuda":
        return predictor.device
    free, _total = torch.cuda.mem_get_info(predictor.device)
    if nbytes <= free // 4:
        return predictor.device
    log.info(
        f"the sliding-window accumulators ({nbytes / 2**20:.0f} MiB) go to the CPU: the GPU has "
        f"{free / 2**20:.0f} MiB free",
    )
    return torch.device("cpu")


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
