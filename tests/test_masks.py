"""Annotation -> class mask, and the `masks` command's files, on projects written to tmp_path."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from plugin.format.classes import create_mapping
from plugin.format.geometry import decode_bitmap, encode_bitmap
from plugin.format.masks import encode_png, rasterize, write_masks
from plugin.format.project import list_items, read_annotation, read_meta

ISBI = Path(__file__).resolve().parent.parent.parent / "shared/data/isbi2012-membranes"

CLASSES = [
    {"title": "c", "shape": "bitmap", "color": "#0000FF"},
    {"title": "a", "shape": "polygon", "color": "#FF0000"},
    {"title": "b", "shape": "rectangle", "color": "#00FF00"},
    {"title": "bg", "shape": "polygon", "color": "#000000"},
    {"title": "neutral", "shape": "rectangle", "color": "#FFFFFF"},
]  # indices: bg 0, a 1, b 2, c 3, neutral 255


def rect(title: str, corners: list) -> dict:
    return {"classTitle": title, "tags": [], "points": {"exterior": corners, "interior": []}}


def poly(title: str, exterior: list) -> dict:
    return {"classTitle": title, "tags": [], "points": {"exterior": exterior, "interior": []}}


def write_project(root: Path, images: dict[tuple[str, str], tuple[dict, tuple[int, int]]]) -> Path:
    """images: (dataset, file name) -> (annotation, (height, width)); real image files are written."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").write_text(json.dumps({"classes": CLASSES, "tags": []}))
    for (dataset, name), (ann, (height, width)) in images.items():
        for sub in ("img", "ann"):
            (root / dataset / sub).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / dataset / "img" / name), np.full((height, width, 3), 90, np.uint8))
        (root / dataset / "ann" / f"{name}.json").write_text(json.dumps(ann))
    return root


def mask_of(tmp_path: Path, objects: list, height: int, width: int) -> np.ndarray:
    root = write_project(tmp_path / "p", {("ds", "i.png"): ({"size": {"height": height, "width": width},
                                                             "tags": [], "objects": objects}, (height, width))})
    meta = read_meta(root)
    return rasterize(read_annotation(list_items(root)[0].ann_path, meta), create_mapping(meta, "bg", "neutral"))


def test_spec_example_b_overlap_and_border(tmp_path: Path) -> None:
    bitmap = np.zeros((3, 4), bool)
    bitmap[0] = True
    mask = mask_of(tmp_path, [rect("b", [[4, 3], [10, 8]]),
                              {"classTitle": "c", "tags": [], "bitmap": encode_bitmap(bitmap, (10, 8))}], 10, 12)
    expected = np.zeros((10, 12), np.uint8)
    expected[3:9, 4:11] = 2
    expected[8, 10:12] = 3  # the bitmap's first row, cropped to cols 10-11; it overwrites b at (8, 10)
    assert mask.dtype == np.uint8 and mask.shape == (10, 12)
    np.testing.assert_array_equal(mask, expected)


def test_later_objects_overwrite_and_background_erases(tmp_path: Path) -> None:
    objects = [
        rect("b", [[0, 0], [5, 5]]),
        poly("a", [[2, 2], [7, 2], [7, 7], [2, 7]]),
        rect("neutral", [[6, 0], [7, 1]]),
        poly("bg", [[3, 3], [4, 3], [4, 4], [3, 4]]),  # background objects draw 0
    ]
    mask = mask_of(tmp_path, objects, 8, 8)
    expected = np.zeros((8, 8), np.uint8)
    expected[0:6, 0:6] = 2
    expected[2:8, 2:8] = 1
    expected[0:2, 6:8] = 255
    expected[3:5, 3:5] = 0
    np.testing.assert_array_equal(mask, expected)


def test_mask_follows_the_annotation_size(tmp_path: Path) -> None:
    mask = mask_of(tmp_path, [rect("b", [[-5, -5], [100, 1]])], 3, 4)
    np.testing.assert_array_equal(mask, [[2, 2, 2, 2], [2, 2, 2, 2], [0, 0, 0, 0]])


def test_write_masks_files(tmp_path: Path) -> None:
    images = {
        ("ds1", "one.png"): ({"size": {"height": 4, "width": 6}, "tags": [{"name": "train", "value": None}],
                             "objects": [rect("b", [[1, 1], [2, 2]]), rect("neutral", [[5, 3], [5, 3]])]}, (4, 6)),
        ("ds1", "two.jpg"): ({"size": {"height": 3, "width": 3}, "tags": [], "objects": []}, (3, 3)),
        ("ds2", "three.png"): ({"size": {"height": 2, "width": 5}, "tags": ["val"],
                               "objects": [poly("a", [[0, 0], [4, 0], [4, 1], [0, 1]])]}, (2, 5)),
    }
    root = write_project(tmp_path / "project", images)
    out = tmp_path / "out"
    assert write_masks(root, out, "bg", "neutral") == 3
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "class_title_to_idx.json", "ds1/one.png.png", "ds1/two.jpg.png", "ds2/three.png.png",
    ]
    one = cv2.imread(str(out / "ds1" / "one.png.png"), cv2.IMREAD_UNCHANGED)
    assert one.dtype == np.uint8 and one.shape == (4, 6)
    expected = np.zeros((4, 6), np.uint8)
    expected[1:3, 1:3] = 2
    expected[3, 5] = 255
    np.testing.assert_array_equal(one, expected)
    assert not cv2.imread(str(out / "ds1" / "two.jpg.png"), cv2.IMREAD_UNCHANGED).any()
    np.testing.assert_array_equal(cv2.imread(str(out / "ds2" / "three.png.png"), cv2.IMREAD_UNCHANGED), np.ones((2, 5)))
    assert json.loads((out / "class_title_to_idx.json").read_text()) == {
        "bg": 0, "a": 1, "b": 2, "c": 3, "neutral": 255,
    }


def test_mask_png_decodes_to_the_same_pixels_in_opencv_and_pillow() -> None:
    # Every byte value, an odd size and long runs, as class masks have them.
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    mask[5:30, 10:40] = 3
    scanlines = np.zeros((37, 54), np.uint8)
    scanlines[:, 1:] = mask
    png = encode_png(scanlines)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED), mask)
    Image.open(io.BytesIO(png)).verify()  # every chunk's CRC
    with Image.open(io.BytesIO(png)) as image:
        assert image.mode == "L" and image.size == (53, 37)
        np.testing.assert_array_equal(np.asarray(image), mask)


def test_write_masks_on_real_slices(tmp_path: Path) -> None:
    if not ISBI.is_dir():
        pytest.skip(f"sample data not found: {ISBI}")
    root = tmp_path / "isbi"
    (root / "slices" / "img").mkdir(parents=True)
    (root / "slices" / "ann").mkdir()
    shutil.copy(ISBI / "meta.json", root / "meta.json")
    for name in ("slice_00.png", "slice_01.png"):
        shutil.copy(ISBI / "slices" / "img" / name, root / "slices" / "img" / name)
        shutil.copy(ISBI / "slices" / "ann" / f"{name}.json", root / "slices" / "ann" / f"{name}.json")
    out = tmp_path / "masks"
    assert write_masks(root, out, "bg", "neutral") == 2
    assert json.loads((out / "class_title_to_idx.json").read_text()) == {"bg": 0, "membrane": 1, "neutral": 255}
    for name in ("slice_00.png", "slice_01.png"):
        mask = cv2.imread(str(out / "slices" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        # The membrane pixels are exactly the union of the bitmaps placed at their origins.
        expected = np.zeros((512, 512), np.uint8)
        for obj in json.loads((root / "slices" / "ann" / f"{name}.json").read_text())["objects"]:
            bits = decode_bitmap(obj["bitmap"]["data"])
            x, y = obj["bitmap"]["origin"]
            expected[y:y + bits.shape[0], x:x + bits.shape[1]][bits] = 1
        assert mask.shape == (512, 512) and 0 < expected.sum() < expected.size
        np.testing.assert_array_equal(mask, expected)
