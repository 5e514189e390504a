"""Image files: OpenCV decoding as the SDK does, and the EXIF-oriented size every size check uses."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from plugin.errors import TaskError
from plugin.format.classes import create_mapping
from plugin.format.images import read_image, read_image_size
from plugin.format.project import list_items, read_meta
from plugin.training.data import CorruptionBudget, prepare_masks

# Raw pixels 30 rows x 40 columns; orientations 5..8 decode to 40 x 30.
RAW_HEIGHT, RAW_WIDTH = 30, 40
ORIENTATION = 0x0112


def marked_image() -> np.ndarray:
    """Non-square, with one red corner and one green corner, so that every flip and turn shows."""
    image = np.full((RAW_HEIGHT, RAW_WIDTH, 3), 90, np.uint8)
    image[:10, :10] = (255, 0, 0)
    image[:10, -10:] = (0, 255, 0)
    return image


def write_oriented(path: Path, orientation: int | None) -> Path:
    """The marked image saved by PIL (format from the suffix) with EXIF orientation `orientation`, or no EXIF."""
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    Image.fromarray(marked_image()).save(path, exif=exif.tobytes(), quality=95)
    return path


def oriented_by_pil(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.size == (RAW_WIDTH, RAW_HEIGHT)  # the header keeps the raw size
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def expected_size(orientation: int | None) -> tuple[int, int]:
    return (RAW_WIDTH, RAW_HEIGHT) if orientation in (5, 6, 7, 8) else (RAW_HEIGHT, RAW_WIDTH)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
@pytest.mark.parametrize("orientation", [None, 1, 2, 3, 4, 5, 6, 7, 8])
def test_orientation_is_applied_and_size_agrees(tmp_path: Path, suffix: str, orientation: int | None) -> None:
    path = write_oriented(tmp_path / f"o{suffix}", orientation)
    image = read_image(path)
    reference = oriented_by_pil(path)
    assert image.shape == (*expected_size(orientation), 3) == reference.shape
    # Both decoders see the same lossy data; they may differ by rounding, not by a flip of the corners.
    assert np.abs(image.astype(int) - reference.astype(int)).max() <= 8
    assert read_image_size(path) == image.shape[:2]


def test_png_exif_after_the_pixels_counts_too(tmp_path: Path) -> None:
    # PNG allows eXIf after IDAT; OpenCV applies it there as well, so the size must not stop at the header.
    plain = tmp_path / "plain.png"
    Image.fromarray(marked_image()).save(plain)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    payload = exif.tobytes()[len(b"Exif\x00\x00"):]
    chunk = b"eXIf" + payload
    chunk = struct.pack(">I", len(payload)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    data = plain.read_bytes()
    iend = data.rindex(b"IEND") - 4
    late = tmp_path / "late.png"
    late.write_bytes(data[:iend] + chunk + data[iend:])
    assert data.index(b"IDAT") < late.read_bytes().index(b"eXIf")
    image = read_image(late)
    assert image.shape[:2] == expected_size(6)
    assert np.array_equal(image, oriented_by_pil(late))
    assert read_image_size(late) == image.shape[:2]


def test_read_image_is_rgb(tmp_path: Path) -> None:
    bgr = np.zeros((3, 4, 3), np.uint8)
    bgr[..., 0] = 200  # blue in OpenCV's order
    cv2.imwrite(str(tmp_path / "a.png"), bgr)
    rgb = read_image(tmp_path / "a.png")
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 2] == 200).all() and (rgb[..., :2] == 0).all()
    cv2.imwrite(str(tmp_path / "g.png"), np.full((2, 2), 7, np.uint8))
    assert read_image(tmp_path / "g.png").shape == (2, 2, 3)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(TaskError, match="cannot be decoded") as info:
        read_image(tmp_path / "bad.jpg")
    assert info.value.where == str(tmp_path / "bad.jpg")
    with pytest.raises(TaskError, match="cannot be read"):
        read_image(tmp_path / "missing.png")


def test_unreadable_header_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(TaskError, match="the image cannot be read") as info:
        read_image_size(tmp_path / "bad.jpg")
    assert info.value.where == str(tmp_path / "bad.jpg")
    with pytest.raises(TaskError, match="the image cannot be read") as info:
        read_image_size(tmp_path / "missing.png")
    assert info.value.where == str(tmp_path / "missing.png")


def rotated_project(root: Path, ann_height: int, ann_width: int) -> Path:
    """One train image: a JPEG of raw size 40x30 (width x height) with orientation 6, so 30x40 as decoded."""
    (root / "ds" / "img").mkdir(parents=True)
    (root / "ds" / "ann").mkdir(parents=True)
    (root / "meta.json").write_text(json.dumps({"classes": [{"title": "cat", "shape": "rectangle", "color": "#FF0000"}]}))
    write_oriented(root / "ds" / "img" / "photo.jpg", 6)
    ann = {
        "size": {"height": ann_height, "width": ann_width},
        "tags": [{"name": "train", "value": None}],
        "objects": [{"classTitle": "cat", "tags": [], "points": {"exterior": [[0, 0], [9, 9]], "interior": []}}],
    }
    (root / "ds" / "ann" / "photo.jpg.json").write_text(json.dumps(ann))
    return root


def test_training_checks_the_annotation_against_the_oriented_size(tmp_path: Path) -> None:
    oriented = rotated_project(tmp_path / "oriented", ann_height=RAW_WIDTH, ann_width=RAW_HEIGHT)
    meta = read_meta(oriented)
    mapping = create_mapping(meta, "bg", "neutral")
    kept, masks = prepare_masks(list_items(oriented), meta, mapping, (16, 16), CorruptionBudget.create("train", 0))
    assert [item.name for item in kept] == ["photo.jpg"] and masks[0].shape == (16, 16)

    raw = rotated_project(tmp_path / "raw", ann_height=RAW_HEIGHT, ann_width=RAW_WIDTH)
    with pytest.raises(TaskError, match=r"says the image is 40x30 .* photo.jpg is 30x40") as info:
        prepare_masks(list_items(raw), meta, mapping, (16, 16), CorruptionBudget.create("train", 0))
    assert info.value.where == str(raw / "ds" / "ann" / "photo.jpg.json")
