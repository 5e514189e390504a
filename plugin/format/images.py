"""Image files as the Supervisely SDK sees them: decoded by OpenCV, EXIF orientation applied, within limits.

Training, inference, `masks` and `evaluate` all go through here, so that an image has one size, one
pixel layout and one set of limits everywhere (the SDK's `sly.image.read` is
`cv2.imdecode(..., IMREAD_COLOR)`). Before a pixel is decoded, the header must name an accepted format
(by content, whatever the file's extension) and declare at most max_image_pixels() pixels.
read_reduced is the same decoding for a caller that will shrink the image: a large JPEG is then
decoded at a fraction of its size, which skips most of the work. Every reader takes a file's path or,
for an image sent to the model server, its bytes (errors then name UPLOAD).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from plugin.errors import LimitExceeded, TaskError

# 2**28 pixels is a 16384 x 16384 image, 0.75 GiB as RGB uint8: far above the inputs a UNet is trained
# on here (at most 4096 a side). It caps bitmaps and annotation sizes too. A 60000 x 60000 PNG bomb of a
# few hundred bytes would otherwise make OpenCV allocate 10 GiB.
DEFAULT_MAX_IMAGE_PIXELS = 2**28
# OpenCV refuses more than this itself (CV_IO_MAX_IMAGE_PIXELS) and more than 2**20 pixels a side
# (CV_IO_MAX_IMAGE_WIDTH / HEIGHT); a higher limit of ours could never be decoded.
OPENCV_MAX_IMAGE_PIXELS = 2**30
MAX_IMAGE_SIDE = 2**20
# Our check replaces Pillow's (a warning from 89M pixels, an error from twice that): it applies to every
# image read here, the only place that opens images with Pillow, names the size and follows
# set_max_image_pixels, whereas Pillow's would refuse images under a raised limit.
Image.MAX_IMAGE_PIXELS = None

# Pillow's format name -> the name in messages: what OpenCV decodes and the SDK accepts (it also takes
# AVIF and HEIC; OpenCV reads no HEIC, and AVIF orientation boxes are not EXIF, so both are refused).
# MPO is a multi-picture JPEG; OpenCV decodes its first picture.
ACCEPTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WebP", "TIFF": "TIFF", "BMP": "BMP"}
ACCEPTED_NAMES = ", ".join(dict.fromkeys(ACCEPTED_FORMATS.values()))

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ORIENTATION_TAG = 0x0112
# EXIF orientations 5..8 are a transpose or a 90-degree turn, so the decoded image has the
# header's width and height exchanged; 1..4 only flip or turn by 180 degrees.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_TIFF_WIDTH, _TIFF_LENGTH = 256, 257
# Orientation sits in the first IFD, at the start of an eXIf chunk; the rest is not read.
_MAX_EXIF_BYTES = 1 << 20

# A reduced JPEG decode stays at least twice the target size (as Pillow's reducing_gap for draft()):
# the caller's INTER_AREA resize then averages 2x2 or more decoded pixels, which evens out the
# difference between libjpeg's scaled IDCT (and its chroma upsampling) and a box filter. Measured on
# natural-looking content against a full decode and the same resize (tests/test_reduced_decode.py):
# at most 0.92 grey levels mean difference with a gap of 2; with a gap of 1, 1.4 (333x515 at 1/4 to
# 64x41), 1.6 (1023x1023 at 1/8 to 128x128) and 2.1 (1024x1024 at 1/2 to 512x512).
REDUCING_GAP = 2
_DECODE_FLAGS = {
    1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8,
}

_max_pixels = DEFAULT_MAX_IMAGE_PIXELS
# What errors about an image given as bytes name: the model server's request field.
UPLOAD = "image"


def set_max_image_pixels(pixels: int) -> None:
    """The most pixels (width x height) an image, a bitmap or an annotation's size may have, in this process."""
    global _max_pixels
    if isinstance(pixels, bool) or not isinstance(pixels, int) or not 1 <= pixels <= OPENCV_MAX_IMAGE_PIXELS:
        raise TaskError(
            f"{pixels!r} is not a pixel count from 1 to {OPENCV_MAX_IMAGE_PIXELS} (OpenCV's own limit)",
            where="max_image_pixels",
        )
    _max_pixels = pixels


def max_image_pixels() -> int:
    return _max_pixels


def check_image_pixels(width: int, height: int, what: str, where: object) -> None:
    """TaskError naming `what` (e.g. "the image"), its size and the limit when width x height is over
    max_image_pixels() or a side over OpenCV's limit; called before anything of that size is allocated."""
    if width * height > _max_pixels:
        limit = (
            f"the limit of {_max_pixels} pixels (max_image_pixels in task_config.json; --max-image-pixels "
            "for `sly-unet masks` and `evaluate`)"
        )
    elif max(width, height) > MAX_IMAGE_SIDE:
        limit = f"OpenCV's limit of {MAX_IMAGE_SIDE} pixels a side"
    else:
        return
    raise LimitExceeded(
        f"{what} is {width}x{height} (width x height) = {width * height} pixels, over {limit}", where=where
    )


def check_png_chunks(file: BinaryIO, what: str, where: object) -> None:
    """TaskError naming `what` when a chunk of the PNG declares more bytes than the file holds."""
    for _ in _png_chunks(file, what, where):
        pass


def read_image(path: Path | bytes) -> np.ndarray:
    """RGB uint8 (H, W, 3), decoded by OpenCV as the SDK does (grey, 16-bit, palette, alpha and CMYK images
    become 3 channels of 8 bits); the file is read once, and its header checked before decoding."""
    return read_reduced(path, None).pixels


@dataclass(frozen=True)
class Reduced:
    """An image decoded at 1/factor of its size (factor 1: in full)."""

    pixels: np.ndarray  # RGB uint8 (ceil(height / factor), ceil(width / factor), 3)
    factor: int  # 1, 2, 4 or 8
    size: tuple[int, int]  # (width, height) at full resolution, as read_image decodes it


def read_reduced(path: Path | bytes, shrink_to: tuple[int, int] | None) -> Reduced:
    """read_image for a caller that will shrink the image to `shrink_to` (width, height): a JPEG that
    shrinks by 4x or more on both sides is decoded at 1/2, 1/4 or 1/8 by libjpeg's scaled IDCT (see
    reduction_factor), which skips most of the decoding work; other images, or None, decode in full."""
    if isinstance(path, bytes):
        data, path = path, UPLOAD
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise TaskError(f"the image cannot be read: {exc.strerror or exc}", where=path) from None
    # The header checked is that of the very bytes decoded below.
    file = io.BytesIO(data)
    with _open(file, path) as img:
        width, height = _checked_size(img, path)
        if img.format == "PNG":
            check_png_chunks(file, "the image", path)
        factor = 1
        if shrink_to is not None and ACCEPTED_FORMATS[img.format] == "JPEG":
            # OpenCV turns reduced decodes by the EXIF orientation too: compare the target with the turned size.
            if _orientation(img, file, path) in _SWAPPING_ORIENTATIONS:
                width, height = height, width
            factor = reduction_factor((width, height), shrink_to)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), _DECODE_FLAGS[factor])
    if image is None:
        raise TaskError("the image cannot be decoded (corrupt or truncated)", where=path)
    if factor == 1:
        # The decoded size itself: no orientation was read for a full decode.
        width, height = image.shape[1], image.shape[0]
    return Reduced(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), factor, (width, height))


def reduction_factor(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The largest of 1, 2, 4, 8 that keeps an image of `size` (width, height), decoded at 1/factor
    (sides rounded up, as libjpeg does), at least REDUCING_GAP times `target` on both sides."""
    (width, height), (target_w, target_h) = size, target
    for factor in (8, 4, 2):
        if -(-width // factor) >= REDUCING_GAP * target_w and -(-height // factor) >= REDUCING_GAP * target_h:
            return factor
    return 1


def read_image_size(path: Path | bytes) -> tuple[int, int]:
    """(height, width) of read_image(path), from the header and the EXIF orientation tag; no pixel is decoded."""
    if isinstance(path, bytes):
        data, path = path, UPLOAD
    try:
        with (io.BytesIO(data) if path == UPLOAD else open(path, "rb")) as file, _open(file, path) as img:
            width, height = _checked_size(img, path)
            orientation = _orientation(img, file, path)
    except TaskError:
        raise
    except OSError as exc:
        raise TaskError(f"the image cannot be read: {exc.strerror or exc}", where=path) from None
    except Exception as exc:  # Pillow raises many types for broken metadata
        raise TaskError(f"the image cannot be read: {exc}", where=path) from None
    if orientation in _SWAPPING_ORIENTATIONS:
        return width, height
    return height, width


def _orientation(img: Image.Image, file: BinaryIO, where: Path) -> int | None:
    """The EXIF orientation tag of an opened image, None without one."""
    try:
        # Pillow decodes a whole PNG to look for an eXIf chunk after the pixels (OpenCV applies one
        # there too); the chunk headers tell the same without decoding.
        return _png_orientation(file, where) if img.format == "PNG" else img.getexif().get(_ORIENTATION_TAG)
    except TaskError:
        raise
    except Exception as exc:  # Pillow raises many types for broken metadata, OSError among them
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise TaskError(f"the image cannot be read: {detail}", where=where) from None


def _open(file: BinaryIO, where: Path) -> Image.Image:
    """The image opened lazily: only its header is read."""
    try:
        return Image.open(file)
    except Exception as exc:  # Pillow raises many types for broken files
        # "cannot identify image file <_io.BytesIO ...>" says no more than the message below.
        detail = "" if isinstance(exc, UnidentifiedImageError) else f" ({exc})"
        raise TaskError(
            f"the image cannot be read: it is not an image in an accepted format ({ACCEPTED_NAMES}), "
            f"or it is corrupt, so it cannot be decoded{detail}",
            where=where,
        ) from None


def _checked_size(img: Image.Image, where: Path) -> tuple[int, int]:
    """(width, height) as stored, before orientation; TaskError unless the format is accepted and the
    size within the limits."""
    if img.format not in ACCEPTED_FORMATS:
        raise TaskError(f"the image is a {img.format} file; the accepted formats are {ACCEPTED_NAMES}", where=where)
    # Pillow already swaps a TIFF's size for its orientation; the tags hold it as stored.
    width, height = (img.tag_v2[_TIFF_WIDTH], img.tag_v2[_TIFF_LENGTH]) if img.format == "TIFF" else img.size
    check_image_pixels(width, height, "the image", where)
    return width, height


def _png_chunks(file: BinaryIO, what: str, where: object) -> Iterator[tuple[bytes, int]]:
    """(type, length) of each chunk up to IEND, the file at the chunk's data; lengths checked first, since
    OpenCV 5 allocates what a chunk declares: a 200-byte file whose IDAT claims 3 GB takes 3 GB."""
    end = file.seek(0, io.SEEK_END)
    position = file.seek(len(PNG_SIGNATURE))
    while position + 8 <= end:
        length, kind = struct.unpack(">I4s", file.read(8))
        if length + 12 > end - position:  # length, type, data, CRC
            raise TaskError(
                f"{what} is corrupt or truncated: its {kind.decode('latin-1')!r} chunk declares {length} bytes, "
                f"and {max(end - position - 12, 0)} follow",
                where=where,
            )
        if kind == b"IEND":
            return
        yield kind, length
        position = file.seek(position + 12 + length)


def _png_orientation(file: BinaryIO, where: Path) -> int | None:
    """The orientation in the first eXIf chunk of a PNG, wherever it lies, read chunk header by chunk header."""
    exif = None
    for kind, length in _png_chunks(file, "the image", where):
        if kind == b"eXIf" and exif is None:
            exif = file.read(min(length, _MAX_EXIF_BYTES))
    if exif is None:
        return None
    parsed = Image.Exif()
    parsed.load(b"Exif\x00\x00" + exif)
    return parsed.get(_ORIENTATION_TAG)
