"""Where a training crop lies: uniform over the image, or centred on a foreground pixel (nnU-Net's
oversampling), padded where the image is smaller than the crop."""

from __future__ import annotations

import numpy as np

from plugin.format.classes import NEUTRAL_INDEX

# Foreground pixels kept per class and image for oversampling (a random subset; nnU-Net keeps 10,000).
FOREGROUND_SAMPLES = 10_000


def foreground_pixels(mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Per class other than background and neutral that the mask holds: (n, 2) int32 (row, col) of up
    to FOREGROUND_SAMPLES of its pixels (a random subset, as nnU-Net keeps, to bound memory)."""
    classes = [c for c in np.unique(mask) if c not in (0, NEUTRAL_INDEX)]
    found = []
    for c in classes:
        rows, cols = np.nonzero(mask == c)
        keep = rng.choice(len(rows), FOREGROUND_SAMPLES, replace=False) if len(rows) > FOREGROUND_SAMPLES else slice(None)
        found.append(np.stack([rows[keep], cols[keep]], axis=1).astype(np.int32))
    return tuple(found)


def crop_origin(length: int, crop: int, centre: int | None, rng: np.random.Generator) -> int:
    """Start of a crop along one axis: uniform over the positions that keep as much image as
    possible (negative when the image is shorter than the crop: padding before it), or the position
    that centres `centre`, moved into that range."""
    low, high = min(0, length - crop), max(0, length - crop)
    if centre is None:
        return int(rng.integers(low, high + 1))
    return int(np.clip(centre - crop // 2, low, high))


def cut(array: np.ndarray, top: int, left: int, height: int, width: int, fill: object) -> np.ndarray:
    """array[top : top + height, left : left + width], with `fill` where the window leaves the array."""
    out = np.empty((height, width, *array.shape[2:]), array.dtype)
    out[...] = fill
    rows, cols = array.shape[:2]
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + height, rows), min(left + width, cols)
    if y0 < y1 and x0 < x1:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = array[y0:y1, x0:x1]
    return out
