"""The training loader: samples of large JPEGs come from a reduced decode (read_resized), in both
scale modes; data_workers "auto"; the DataLoader's workers, prefetching and pinned memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from plugin.config.schema import TRAIN_DEFAULTS
from plugin.config.typed import Scale, parse_steps
from plugin.format.classes import create_mapping
from plugin.format.images import read_image, read_reduced
from plugin.format.project import list_items, read_meta
from plugin.nn.preprocess import read_resized
from plugin.synthetic import natural_image
from plugin.training.augment import create_augmenter
from plugin.training.data import (
    AUTO_WORKER_CAP,
    PREFETCH_BATCHES,
    CorruptionBudget,
    SegmentationDataset,
    WholeImageDataset,
    create_loader,
    loader_workers,
    prepare_masks,
)
from tests.test_reduced_decode import write_jpeg


def jpeg_project(root: Path, width: int = 1024, height: int = 768) -> Path:
    """One train image, a JPEG of natural-looking content with one rectangle of class cat."""
    (root / "ds" / "img").mkdir(parents=True)
    (root / "ds" / "ann").mkdir(parents=True)
    (root / "meta.json").write_text(json.dumps({"classes": [{"title": "cat", "shape": "rectangle", "color": "#FF0000"}]}))
    write_jpeg(root / "ds" / "img" / "photo.jpg", natural_image(height, width, seed=4), 90)
    ann = {
        "size": {"height": height, "width": width},
        "tags": [{"name": "train", "value": None}],
        "objects": [{"classTitle": "cat", "tags": [], "points": {"exterior": [[100, 100], [600, 500]], "interior": []}}],
    }
    (root / "ds" / "ann" / "photo.jpg.json").write_text(json.dumps(ann))
    return root


def dataset(project: Path, mask_size: tuple[int, int] | float, input_size: tuple[int, int], scale: Scale,
            augment: bool = False, whole: bool = False) -> SegmentationDataset:
    meta = read_meta(project)
    budget = CorruptionBudget.create("train", 0)
    kept, masks = prepare_masks(list_items(project), meta, create_mapping(meta, "bg", "neutral"), mask_size, budget)
    if whole:
        return WholeImageDataset(kept, masks, input_size, budget)
    augmenter = create_augmenter(parse_steps(TRAIN_DEFAULTS["augmentations"])) if augment else None
    return SegmentationDataset(kept, masks, input_size, budget, augmenter, seed=7, scale=scale)


def test_resize_samples_come_from_the_reduced_decode(tmp_path: Path) -> None:
    project = jpeg_project(tmp_path / "p")
    data = dataset(project, (128, 96), (128, 96), Scale("resize"))
    path = data.items[0].image_path
    assert read_reduced(path, (128, 96)).factor == 4  # 1024x768 -> 256x192, twice the input
    image, _ = data.sample(0)
    assert np.array_equal(image, read_resized(path, 128, 96))


def test_crop_samples_at_a_small_scale_come_from_the_reduced_decode(tmp_path: Path) -> None:
    # Scale 0.25 caches the mask at 256x192, and the image is decoded for that size; an input of
    # that size makes the crop the whole scaled image.
    project = jpeg_project(tmp_path / "p")
    data = dataset(project, 0.25, (256, 192), Scale("crop", 0.25))
    path = data.items[0].image_path
    assert read_reduced(path, (256, 192)).factor == 2
    image, _ = data.sample(0)
    assert np.array_equal(image, read_resized(path, 256, 192))


def test_whole_image_validation_decodes_in_full(tmp_path: Path) -> None:
    project = jpeg_project(tmp_path / "p")
    data = dataset(project, 1.0, (256, 256), Scale("crop", 0.25), whole=True)
    image, _ = data[0]
    assert np.array_equal(image.numpy(), read_image(data.items[0].image_path))


def test_augmented_samples_stay_deterministic(tmp_path: Path) -> None:
    project = jpeg_project(tmp_path / "p")
    first, again = (dataset(project, (128, 96), (128, 96), Scale("resize"), augment=True) for _ in range(2))
    for epoch in (0, 1):
        first.set_epoch(epoch)
        again.set_epoch(epoch)
        image, mask = first.sample(0)
        assert np.array_equal(image, again.sample(0)[0]) and np.array_equal(mask, again.sample(0)[1])


@pytest.mark.parametrize(
    ("cores", "split", "processes", "expected"),
    [
        (16, "train", 1, AUTO_WORKER_CAP["train"]),  # capped
        (16, "val", 1, AUTO_WORKER_CAP["val"]),
        (16, "train", 4, 4),  # the node's cores shared among its training processes
        (6, "train", 4, 1),
        (2, "train", 8, 1),  # at least one
    ],
)
def test_auto_workers_share_the_available_cores(monkeypatch, cores, split, processes, expected) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)), raising=False)
    assert loader_workers("auto", split, processes) == expected


def test_a_worker_count_is_taken_as_given(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    assert loader_workers(12, "train", 1) == 12
    assert loader_workers(0, "val", 4) == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_keeps_workers_prefetches_and_pins_on_cuda(tmp_path: Path, workers: int) -> None:
    project = jpeg_project(tmp_path / "p", 64, 48)
    loader = create_loader(dataset(project, (32, 16), (32, 16), Scale("resize")), 2, workers)
    assert loader.num_workers == workers
    assert loader.persistent_workers == (workers > 0)
    assert loader.prefetch_factor == (PREFETCH_BATCHES if workers else None)
    assert loader.pin_memory == torch.cuda.is_available()
