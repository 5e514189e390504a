"""Reduced JPEG decoding: read_resized decodes a JPEG that it will shrink 4x or more at 1/2, 1/4 or
1/8 (read_reduced, libjpeg's scaled IDCT), then resizes it to the exact target geometry; the result
must match the full decode resized by resize_image.

The tolerance, per 8-bit channel of the resized image: a mean absolute difference under
MEAN_TOLERANCE (1 grey level) and a 99.9th percentile under P999_TOLERANCE (16). The content is
natural-looking (synthetic.natural_image: a 1/f amplitude spectrum with a pixel std of 40, as
photographs have, plus hard-edged shapes in saturated colours) saved at JPEG quality 75 and 90 with 4:2:0 chroma, the
common camera and web settings. The largest differences sit on coloured edges, where libjpeg's
reduced chroma upsampling and the full decode's smooth one disagree most; for scale, the JPEG
compression itself moves these images by about 5 grey levels on average.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from plugin.format.images import read_image, read_reduced, reduction_factor
from plugin.nn.preprocess import read_resized, resize_image
from plugin.synthetic import natural_image

MEAN_TOLERANCE = 1.0
P999_TOLERANCE = 16
ORIENTATION = 0x0112


def write_jpeg(path: Path, rgb: np.ndarray, quality: int, orientation: int | None = None) -> Path:
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    Image.fromarray(rgb).save(path, quality=quality, subsampling="4:2:0", exif=exif.tobytes())
    return path


def assert_within_tolerance(path: Path, target: tuple[int, int]) -> None:
    reduced = read_resized(path, *target)
    full = resize_image(read_image(path), *target)
    difference = np.abs(reduced.astype(np.int16) - full.astype(np.int16))
    mean, p999 = float(difference.mean()), float(np.percentile(difference, 99.9))
    assert mean < MEAN_TOLERANCE and p999 < P999_TOLERANCE, (mean, p999)


# (stored width, height), target (width, height), the factor expected; odd sizes check that a
# reduced side rounds up, as libjpeg's does.
CASES = [
    ((1024, 1024), (256, 256), 2),
    ((2048, 2048), (256, 256), 4),
    ((1024, 1024), (128, 128), 4),
    ((2051, 1733), (100, 100), 8),
    ((1333, 999), (100, 130), 2),  # squashed: the less-shrunk side (7.7x) decides
    ((333, 515), (64, 41), 2),
    ((1023, 1023), (128, 128), 4),  # 1023 / 4 rounds up to 256 = 2 x 128
]


@pytest.mark.parametrize("quality", [75, 90])
@pytest.mark.parametrize(("size", "target", "factor"), CASES)
def test_reduced_decode_matches_full_decode_within_tolerance(
    tmp_path: Path, size: tuple[int, int], target: tuple[int, int], factor: int, quality: int
) -> None:
    width, height = size
    path = write_jpeg(tmp_path / "photo.jpg", natural_image(height, width, seed=width + height), quality)
    reduced = read_reduced(path, target)
    assert reduction_factor(size, target) == reduced.factor == factor and reduced.size == size
    assert reduced.pixels.shape == (-(-height // factor), -(-width // factor), 3)
    assert_within_tolerance(path, target)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_reduced_decodes_are_oriented_as_full_ones(tmp_path: Path, orientation: int) -> None:
    path = write_jpeg(tmp_path / "turned.jpg", natural_image(400, 600, seed=orientation), 90, orientation)
    turned = orientation >= 5
    assert read_reduced(path, (50, 50)).pixels.shape == ((150, 100, 3) if turned else (100, 150, 3))  # 1/4
    assert_within_tolerance(path, (50, 50))


# Stored 1200x800 with orientation 6 decodes as 800x1200 (width x height), reduced or not. A target of
# 100x300 admits 1/2 only in that orientation; 300x100 only in the stored one.
@pytest.mark.parametrize(("target", "factor"), [((100, 300), 2), ((300, 100), 1)])
def test_reduction_follows_the_exif_orientation(tmp_path: Path, target: tuple[int, int], factor: int) -> None:
    path = write_jpeg(tmp_path / "turned.jpg", natural_image(800, 1200, seed=6), 90, orientation=6)
    assert read_image(path).shape == (1200, 800, 3)
    reduced = read_reduced(path, target)
    assert (reduced.factor, reduced.size, reduced.pixels.shape) == (factor, (800, 1200), (1200 // factor, 800 // factor, 3))
    assert_within_tolerance(path, target)


def test_small_shrinks_and_other_formats_decode_in_full(tmp_path: Path) -> None:
    rgb = natural_image(1024, 1024, seed=1)
    jpeg = write_jpeg(tmp_path / "photo.jpg", rgb, 90)
    full = read_image(jpeg)
    for target in ((512, 512), (300, 300), (257, 256), (1024, 1024), (2048, 2048)):  # under 4x on a side
        assert read_reduced(jpeg, target).factor == 1
        assert np.array_equal(read_resized(jpeg, *target), resize_image(full, *target))
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    png = read_reduced(tmp_path / "photo.png", (64, 64))
    assert png.factor == 1 and np.array_equal(png.pixels, rgb)


@pytest.mark.parametrize("mode", ["L", "CMYK", "MPO"])
def test_grey_cmyk_and_multi_picture_jpegs_reduce_to_rgb(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "photo.jpg"
    image = Image.fromarray(natural_image(512, 384, seed=2))
    if mode == "MPO":  # a camera's multi-picture JPEG: the first picture is decoded
        image.save(path, format="MPO", save_all=True, append_images=[image.rotate(90)], quality=90)
    else:
        image.convert(mode).save(path, quality=90)
    assert read_reduced(path, (48, 64)).pixels.shape == (128, 96, 3)
    assert_within_tolerance(path, (48, 64))


@pytest.mark.parametrize(("size", "target"), [((9, 9), (1, 1)), ((25, 10), (2, 1)), ((1031, 1001), (3, 5))])
def test_the_output_has_the_target_size_where_the_scaled_size_rounds_up(
    tmp_path: Path, size: tuple[int, int], target: tuple[int, int]
) -> None:
    width, height = size
    path = write_jpeg(tmp_path / "tiny.jpg", natural_image(height, width, seed=3), 90)
    assert read_reduced(path, target).factor == 8
    assert read_resized(path, *target).shape == (target[1], target[0], 3)
