"""Image files as the Supervisely SDK sees them: decoded by OpenCV, EXIF orientation applied.

Training, inference and the annotation size checks all go through here, so that an image has one
size and one pixel layout everywhere (the SDK's `sly.image.read` is `cv2.imdecode(..., IMREAD_COLOR)`).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from plugin.errors import TaskError

_ORIENTATION_TAG = 0x0112
# EXIF orientations 5..8 are a transpose or a 90-degree turn, so the decoded image has the
# header's width and height exchanged; 1..4 only flip or turn by 180 degrees.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3), decoded by OpenCV as the SDK does (grey and alpha images become 3 channels)."""
    try:
        # np.fromfile + imdecode rather than imread: the error then tells a missing file from a bad one.
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise TaskError(f"the image cannot be read: {exc.strerror or exc}", where=path) from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None:
        raise TaskError("the image cannot be decoded (corrupt or unsupported format)", where=path)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image_size(path: Path) -> tuple[int, int]:
    """(height, width) of read_image(path), from the header and the EXIF orientation tag.

    JPEG, WebP and TIFF keep both in the header, so no pixel is decoded. Pillow decodes a PNG that
    has no eXIf chunk before its pixels, because OpenCV applies one placed after them too.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(_ORIENTATION_TAG)
    except Exception as exc:  # PIL raises many types for broken files
        raise TaskError(f"the image cannot be read: {exc}", where=path) from exc
    if orientation in _SWAPPING_ORIENTATIONS:
        return width, height
    return height, width
