"""Resize and normalise: the one preprocessing path that training and inference share."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from plugin.format.images import read_reduced

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# Padding added to crops and windows: the mean colour, which normalises to about zero (uint8 RGB).
PAD_COLOR = tuple(round(float(c) * 255) for c in IMAGENET_MEAN)


def resize_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize an RGB image the same way in training and inference: area when shrinking, bilinear when growing."""
    if image.shape[:2] == (height, width):
        return image
    shrinking = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def read_resized(path: Path | bytes, width: int, height: int) -> np.ndarray:
    """The image file as RGB uint8 (height, width, 3), as resize_image(read_image(path), width, height)
    gives it within about a grey level, a large JPEG decoded at reduced size (read_reduced). Training
    samples and the input of a resize-trained model's whole-image prediction come from here, so both
    see the same pixels."""
    reduced = read_reduced(path, (width, height))
    if reduced.factor == 1:
        return resize_image(reduced.pixels, width, height)
    # When a side is not a multiple of the factor, the last decoded column or row stands for fewer
    # pixels: scaling by the decoded size would shift the content by a growing fraction of a target
    # pixel towards the far edge (on textured images, 1 to 2 grey levels mean difference from the full
    # decode and the same resize, against 0.3 to 0.75 without the shift). Scaling by the full-resolution size
    # gives every output pixel the part of the image it covers in a full decode; an output one pixel
    # too wide or high by rounding only holds what lies past the image, and is cut off. Always a
    # shrink by 2x or more (REDUCING_GAP), so INTER_AREA as resize_image takes.
    full_w, full_h = reduced.size
    scale_x, scale_y = width * reduced.factor / full_w, height * reduced.factor / full_h
    return cv2.resize(reduced.pixels, None, fx=scale_x, fy=scale_y, interpolation=cv2.INTER_AREA)[:height, :width]


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of a class mask; INTER_NEAREST_EXACT is the legacy (skimage order=0) rule."""
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)


def normalize(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float32 (3, H, W) with ImageNet mean and std."""
    scaled = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))
