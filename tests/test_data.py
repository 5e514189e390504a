"""Samples: splitting by tags, the mask cache at input size, image resize and normalisation, the loader."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from plugin.errors import TaskError
from plugin.format.classes import NEUTRAL_INDEX, create_mapping
from plugin.format.masks import rasterize
from plugin.format.project import list_items, read_annotation, read_meta
from plugin.nn.preprocess import normalize, resize_image, resize_mask
from plugin.training.data import (
    CorruptionBudget,
    SegmentationDataset,
    create_loader,
    prepare_masks,
    split_items,
)
from tests.conftest import REPO

META = {
    "classes": [
        {"title": "cat", "shape": "rectangle", "color": "#FF0000"},
        {"title": "neutral", "shape": "rectangle", "color": "#FFFF00"},
    ],
    "tags": [],
}


def write_project(root: Path, tags_per_image: list[list[str]], size: tuple[int, int] = (32, 48)) -> Path:
    """Images h x w = size; each has a cat rectangle at rows 8..15, cols 0..23 and a neutral pixel block."""
    height, width = size
    (root / "ds" / "img").mkdir(parents=True)
    (root / "ds" / "ann").mkdir(parents=True)
    (root / "meta.json").write_text(json.dumps(META))
    for i, tags in enumerate(tags_per_image):
        image = np.full((height, width, 3), 40 * i, np.uint8)
        cv2.imwrite(str(root / "ds" / "img" / f"im{i}.png"), image)
        ann = {
            "size": {"height": height, "width": width},
            "tags": [{"name": t, "value": None} for t in tags],
            "objects": [
                {"classTitle": "cat", "tags": [], "points": {"exterior": [[0, 8], [23, 15]], "interior": []}},
                {"classTitle": "neutral", "tags": [], "points": {"exterior": [[40, 0], [47, 3]], "interior": []}},
            ],
        }
        (root / "ds" / "ann" / f"im{i}.png.json").write_text(json.dumps(ann))
    return root


def test_split_by_tags_with_both_and_neither(tmp_path, caplog):
    project = write_project(tmp_path, [["train"], ["val"], ["train", "val"], [], ["other"]])
    with caplog.at_level(logging.INFO):
        splits = split_items(list_items(project), "train", "val")
    assert [i.name for i in splits["train"]] == ["im0.png", "im2.png"]
    assert [i.name for i in splits["val"]] == ["im1.png", "im2.png"]
    assert any("2 of 5 images carry neither" in r.getMessage() for r in caplog.records)


def test_empty_split_names_the_tag(tmp_path):
    project = write_project(tmp_path, [["train"], ["train"]])
    with pytest.raises(TaskError, match="'validation'") as info:
        split_items(list_items(project), "train", "validation")
    assert info.value.where == "dataset_tags.val"


def test_masks_are_cached_at_input_size_with_nearest_exact(tmp_path):
    project = write_project(tmp_path, [["train"], ["train"]])
    meta = read_meta(project)
    mapping = create_mapping(meta, "bg", "neutral")
    items = list_items(project)
    kept, masks = prepare_masks(items, meta, mapping, (24, 16), CorruptionBudget.create("train", 0))
    assert kept == items
    full = rasterize(read_annotation(items[0].ann_path, meta), mapping)
    assert full.shape == (32, 48)
    # Halving: target pixel (r, c) takes source (2r, 2c) under floor((dst + 0.5) * 2).
    assert np.array_equal(masks[0], full[1::2, 1::2])
    assert masks[0].shape == (16, 24) and masks[0].dtype == np.uint8
    assert set(np.unique(masks[0])) == {0, 1, NEUTRAL_INDEX}


def test_annotation_size_mismatch_is_corruption(tmp_path):
    project = write_project(tmp_path, [["train"], ["train"]])
    ann_path = project / "ds" / "ann" / "im1.png.json"
    ann = json.loads(ann_path.read_text())
    ann["size"] = {"height": 30, "width": 48}
    ann_path.write_text(json.dumps(ann))
    meta = read_meta(project)
    mapping = create_mapping(meta, "bg", "neutral")
    kept, _ = prepare_masks(list_items(project), meta, mapping, (16, 16), CorruptionBudget.create("train", 1))
    assert [i.name for i in kept] == ["im0.png"]
    with pytest.raises(TaskError, match=r"48x30 .* is 48x32") as info:
        prepare_masks(list_items(project), meta, mapping, (16, 16), CorruptionBudget.create("train", 0))
    assert "allow_corrupted_samples.train = 0" in str(info.value)


def test_resize_shrinks_by_area_and_grows_bilinear():
    checker = np.zeros((4, 4, 3), np.uint8)
    checker[::2, ::2] = checker[1::2, 1::2] = 200
    assert np.array_equal(resize_image(checker, 2, 2), np.full((2, 2, 3), 100, np.uint8))
    ramp = np.array([[[0] * 3, [100] * 3]], np.uint8)  # 1 x 2
    assert resize_image(ramp, 4, 1)[0, :, 0].tolist() == [0, 25, 75, 100]
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    assert np.array_equal(resize_mask(mask, 4, 4), np.kron(mask, np.ones((2, 2), np.uint8)))


def test_normalize_uses_imagenet_statistics():
    image = np.zeros((2, 3, 3), np.uint8)
    image[..., 0] = 255
    tensor = normalize(image)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert tensor[0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-6)
    assert tensor[2, 1, 2].item() == pytest.approx(-0.406 / 0.225, rel=1e-6)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_batches_at_input_size(tmp_path, workers):
    project = write_project(tmp_path, [["train"]] * 5)
    meta = read_meta(project)
    mapping = create_mapping(meta, "bg", "neutral")
    budget = CorruptionBudget.create("train", 0)
    kept, masks = prepare_masks(list_items(project), meta, mapping, (32, 16), budget)
    loader = create_loader(SegmentationDataset(kept, masks, (32, 16), budget), 2, workers, shuffle=True)
    batches = list(loader)
    assert [len(images) for images, _ in batches] == [2, 2, 1]
    images, targets = batches[0]
    assert images.shape == (2, 3, 16, 32) and images.dtype == torch.float32
    assert targets.shape == (2, 16, 32) and targets.dtype == torch.int64
    assert sorted(int(n) for n in torch.cat([t for _, t in batches]).unique()) == [0, 1, NEUTRAL_INDEX]


def test_masks_command_writes_the_training_targets(tmp_path):
    write_project(tmp_path / "data" / "proj", [["train"], ["val"]])
    out = tmp_path / "masks"
    proc = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "masks", "--project", str(tmp_path / "data"), "--out", str(out),
         "--log-format", "json"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((out / "class_title_to_idx.json").read_text()) == {"bg": 0, "cat": 1, "neutral": 255}
    mask = cv2.imread(str(out / "ds" / "im0.png.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (32, 48) and mask.dtype == np.uint8
    expected = np.zeros((32, 48), np.uint8)
    expected[8:16, 0:24] = 1
    expected[0:4, 40:48] = NEUTRAL_INDEX
    assert np.array_equal(mask, expected)
    assert (out / "ds" / "im1.png.png").is_file()
    assert json.loads(proc.stdout.splitlines()[-1])["masks"] == 2


def test_loader_workers_do_not_hang_after_opencv_ran_in_the_parent(tmp_path):
    # A large OpenCV call in the parent (here a resize) starts OpenCV's thread pool; a forked worker that
    # then set OpenCV's thread count hung for good. Run it in a child so a hang fails the test, not the suite.
    project = write_project(tmp_path / "p", [["train"]] * 4, size=(1024, 1200))
    script = f"""
from pathlib import Path
from plugin.format.classes import create_mapping
import numpy as np
from plugin.nn.preprocess import resize_image
from plugin.training.data import CorruptionBudget, SegmentationDataset, create_loader, prepare_masks
from plugin.format.project import list_items, read_meta
resize_image(np.zeros((2000, 2000, 3), np.uint8), 700, 700)
meta = read_meta(Path({str(project)!r}))
mapping = create_mapping(meta, "bg", "neutral")
budget = CorruptionBudget.create("train", 0)
kept, masks = prepare_masks(list_items(Path({str(project)!r})), meta, mapping, (256, 256), budget)
loader = create_loader(SegmentationDataset(kept, masks, (256, 256), budget), 2, 2, shuffle=True)
print(sum(len(x) for x, _ in loader))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "4"
