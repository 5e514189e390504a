"""Inference modes: an RGB image -> class probabilities over the pixels the mode covers.

Every mode returns a `Prediction`: probabilities (C, H, W) float32 at the image's size, summing to 1
at each covered pixel, and which pixels are covered (roi and bboxes predict only inside their boxes).
Regions that overlap are merged by probability (weighted averages), never by drawing order.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from plugin.errors import TaskError
from plugin.format.geometry import Rectangle, bounding_box
from plugin.format.project import Label
from plugin.inference.predictor import REGION_BATCH, Predictor
from plugin.nn.tiling import predict_tiled

log = logging.getLogger(__name__)

# The sliding window of a model without a crop record (legacy, or trained on resized images).
LEGACY_WINDOW = (128, 128)


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


# A side of a box: "10px" or "10%" of the box's length (negative allowed).
_SIDE = re.compile(r"(-?[0-9]+)(%|px)")


def parse_side(value: str, length: int, where: str) -> int:
    """Pixels of a side string: "Npx" is N, "N%" is int(length * N / 100) (truncated, as legacy); negatives kept."""
    match = _SIDE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise TaskError(f"{value!r} is not a side like '10px' or '10%'", where=where)
    number = int(match.group(1))
    if match.group(2) == "px":
        return number
    # Truncates toward zero like legacy int(length * N / 100), in integers: no float overflow or rounding.
    product = length * number
    return product // 100 if product >= 0 else -(-product // 100)


def full_image(predictor: Predictor, image: np.ndarray) -> Prediction:
    """The whole image at the training scale (Predictor.region): resized to the input size and the
    probabilities resized back, or tiled with the training window for a crop-trained model."""
    return full_images(predictor, [image])[0]


def full_images(
    predictor: Predictor,
    images: Sequence[np.ndarray | None],
    windows_per_forward: int = REGION_BATCH,
    inputs: Sequence[torch.Tensor] | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> list[Prediction]:
    """full_image of several images: one forward for all of them with a resize-trained model (`inputs`:
    their Predictor.network_input_of, made beforehand, with the images' (height, width) `sizes`), or
    each tiled `windows_per_forward` windows at a time with a crop-trained one (Predictor.regions)."""
    sizes = [image.shape[:2] for image in images] if sizes is None else sizes
    predictions = []
    for probs, (height, width) in zip(predictor.regions(images, windows_per_forward, inputs, sizes), sizes):
        predictions.append(Prediction(probs.cpu().numpy(), None, [Rectangle(0, 0, width - 1, height - 1)]))
    return predictions


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
        probs[:, top : bottom + 1, left : right + 1] += predictor.region(crop).cpu().numpy()
        counts[top : bottom + 1, left : right + 1] += 1
        kept_boxes.append(Rectangle(left, top, right, bottom))
        kept.append(i)
    covered = counts > 0
    np.divide(probs, counts, out=probs, where=covered)
    return Prediction(probs, covered, kept_boxes), kept


def window_plan(
    predictor: Predictor, window: tuple[int | None, int | None], min_overlap: tuple[int | None, int | None]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """sliding_window's (width, height) and min_overlap (x, y) in image pixels, from the config's mode.

    A window side left out (None) is that of the training window (the model's input at the scale
    training presented images at: the crop factor, or the median input / image side of resize
    training), else, for a checkpoint that does not record it, the legacy 128. An overlap axis left
    out is half the window. A window that shows the model the image at another scale than training
    did gets a warning naming both.
    """
    trained = predictor.window
    default = LEGACY_WINDOW if trained is None else trained
    size = (window[0] or default[0], window[1] or default[1])
    overlap = tuple(side // 2 if lap is None else lap for side, lap in zip(size, min_overlap))
    for axis, side, lap in (("x", size[0], overlap[0]), ("y", size[1], overlap[1])):
        if lap >= side:
            raise TaskError(
                f"{lap} must be less than the window's side ({side}), or the stride (window - min_overlap) "
                "would be below 1",
                where=f"mode.min_overlap.{axis}",
            )
    if trained is not None and size != trained:
        (in_w, in_h), (x, y) = predictor.input_size, predictor.training_scale
        trained_at = f"{x:.3g}" if x == y else f"{x:.3g}x{y:.3g}"
        log.warning(
            f"mode.window {size[0]}x{size[1]} is resized to the model's {in_w}x{in_h} input, which shows it the "
            f"image at scale {in_w / size[0]:.3g}x{in_h / size[1]:.3g}, but it was trained at scale "
            f"{trained_at}; leave mode.window out to use the training window {trained[0]}x{trained[1]}",
            extra={"window": list(size), "training_window": list(trained)},
        )
    return size, overlap


def sliding_window(
    predictor: Predictor,
    image: np.ndarray,
    window: tuple[int, int],
    min_overlap: tuple[int, int],
    batch_size: int,
) -> Prediction:
    """Tile the image with (width, height) windows overlapping by at least min_overlap (x, y), predict
    the tiles in batches and blend them with Gaussian weights, so that no seams show.

    An image smaller than a window is padded to the window's size first (nn.tiling.predict_tiled).
    """
    win_w, win_h = window
    height, width = image.shape[:2]
    probs, positions = predict_tiled(
        predictor.probabilities, image, window, min_overlap, batch_size, predictor.num_classes, predictor.device
    )
    boxes = [
        Rectangle(left, top, min(left + win_w, width) - 1, min(top + win_h, height) - 1)
        for top, left in positions
        if top < height and left < width
    ]
    return Prediction(probs.cpu().numpy(), None, boxes)
