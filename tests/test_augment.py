"""Training augmentation: geometry keeps image and mask aligned, outside pixels are neutral, off is off,
samples are a function of (seed, epoch, index), the config is checked, and augment-preview draws samples."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from plugin.config.load import merged_train_config, read_train_config
from plugin.config.schema import TRAIN_DEFAULTS
from plugin.config.typed import parse_steps
from plugin.errors import TaskError
from plugin.format.classes import NEUTRAL_INDEX, create_mapping
from plugin.format.images import read_image
from plugin.format.project import find_project, list_items, read_meta
from plugin.nn.preprocess import normalize, resize_image
from plugin.task_dir import TaskDir
from plugin.training.augment import create_augmenter
from plugin.training.data import CorruptionBudget, SegmentationDataset, create_loader, prepare_masks, split_items
from plugin.training.preview import overlay, write_preview
from plugin.training.task import create_dataset
from tests.conftest import REPO, TINY_CONFIG, make_task

GEOMETRIC = [
    {"name": "hflip", "p": 1.0},
    {"name": "vflip", "p": 1.0},
    {"name": "rotate90", "p": 1.0},
    {"name": "affine", "scale": [0.8, 1.2], "rotate": [-40, 40], "p": 1.0},
    {"name": "elastic", "alpha": 400, "sigma": 8, "p": 1.0},
]


def marked_square() -> tuple[np.ndarray, np.ndarray]:
    """A white off-centre square on black, and the mask with class 1 exactly there."""
    image = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    image[8:28, 12:36] = 255
    mask[8:28, 12:36] = 1
    return image, mask


@pytest.mark.parametrize("step", GEOMETRIC, ids=lambda s: s["name"])
def test_geometric_steps_move_image_and_mask_together(step):
    augment = create_augmenter(parse_steps([step]))
    image, mask = marked_square()
    moved = False
    for seed in range(5):
        out_image, out_mask = augment(image, mask, seed)
        assert out_image.shape == image.shape and out_mask.shape == mask.shape and out_mask.dtype == np.uint8
        # Nearest-neighbour: no mixed class values at the square's edges.
        assert set(np.unique(out_mask)) <= {0, 1, NEUTRAL_INDEX}
        square, bright = out_mask == 1, out_image[..., 0] > 127
        moved |= not np.array_equal(square, mask == 1)
        assert (square & bright).sum() / (square | bright).sum() > 0.9
    # rotate90 may draw a quarter turn of 0; over five seeds every step moves the square at least once.
    assert moved


def test_pixels_from_outside_the_image_are_neutral():
    augment = create_augmenter(parse_steps([{"name": "affine", "scale": [0.5, 0.5], "rotate": [45, 45], "p": 1.0}]))
    image = np.full((64, 64, 3), 100, np.uint8)
    out_image, out_mask = augment(image, np.zeros((64, 64), np.uint8), 0)
    for corner in (out_mask[0, 0], out_mask[0, -1], out_mask[-1, 0], out_mask[-1, -1]):
        assert corner == NEUTRAL_INDEX
    assert out_mask[32, 32] == 0 and out_image[32, 32, 0] == 100
    assert out_image[0, 0, 0] == 0
    # The image shrunk to half its side covers a quarter of the output; all the rest is neutral.
    assert 0.72 < (out_mask == NEUTRAL_INDEX).mean() < 0.78


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_task(tmp_path_factory.mktemp("aug") / "task", n_train=4, n_val=2, size=80)
    return root


def train_dataset(root, augmentations, seed: int = 0, scale: str = "crop") -> SegmentationDataset:
    config = {**TINY_CONFIG, "augmentations": augmentations, "seed": seed, "scale": {"mode": scale, "factor": 1.0}}
    (root / "task_config.json").write_text(json.dumps(config))
    config = read_train_config(root / "task_config.json")
    project_dir = find_project(root / "data")
    meta = read_meta(project_dir)
    mapping = create_mapping(meta, "bg", "neutral")
    items = split_items(list_items(project_dir), "train", "val")["train"]
    return create_dataset("train", items, meta, mapping, config)


@pytest.mark.parametrize("off", [False, []], ids=["false", "empty_list"])
def test_no_augmentation_gives_todays_samples_bit_for_bit(project, off):
    # Today's samples: whole images resized, the legacy scale rule.
    dataset = train_dataset(project, off, scale="resize")
    assert dataset.augment is None
    meta = read_meta(find_project(project / "data"))
    _, masks = prepare_masks(
        dataset.items, meta, create_mapping(meta, "bg", "neutral"), (64, 64), CorruptionBudget.create("train", 0)
    )
    for epoch in (0, 3):
        dataset.set_epoch(epoch)
        for index, item in enumerate(dataset.items):
            image, target = dataset[index]
            assert torch.equal(image, normalize(resize_image(read_image(item.image_path), 64, 64)))
            assert torch.equal(target, torch.from_numpy(masks[index].astype(np.int64)))


def test_the_default_pipeline_augments_the_training_split_only(project):
    dataset = train_dataset(project, copy.deepcopy(TRAIN_DEFAULTS["augmentations"]))
    assert dataset.augment is not None and len(dataset.augment.steps) == len(TRAIN_DEFAULTS["augmentations"])
    assert any(not np.array_equal(dataset.sample(i)[0], _plain(dataset, i)) for i in range(4))
    config = read_train_config(project / "task_config.json")
    meta = read_meta(find_project(project / "data"))
    items = split_items(list_items(find_project(project / "data")), "train", "val")["val"]
    assert create_dataset("val", items, meta, create_mapping(meta, "bg", "neutral"), config).augment is None


def _plain(dataset: SegmentationDataset, index: int) -> np.ndarray:
    return resize_image(read_image(dataset.items[index].image_path), dataset.width, dataset.height)


def test_a_sample_is_a_function_of_seed_epoch_and_index(project):
    steps = [dict(step, p=1.0) for step in TRAIN_DEFAULTS["augmentations"]]
    dataset = train_dataset(project, steps, seed=7)
    dataset.set_epoch(2)
    first = [dataset.sample(i) for i in range(4)]
    again = [dataset.sample(i) for i in (3, 2, 1, 0)][::-1]
    for (a_img, a_mask), (b_img, b_mask) in zip(first, again):
        assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    dataset.set_epoch(3)
    assert not np.array_equal(dataset.sample(0)[0], first[0][0])
    other_seed = train_dataset(project, steps, seed=8)
    other_seed.set_epoch(2)
    assert not np.array_equal(other_seed.sample(0)[0], first[0][0])


def test_persistent_loader_workers_follow_set_epoch(project):
    dataset = train_dataset(project, [dict(step, p=1.0) for step in TRAIN_DEFAULTS["augmentations"]])
    loader = create_loader(dataset, 2, 2, sampler=[3, 1, 0, 2])
    assert loader.persistent_workers
    by_epoch = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        by_epoch.append(torch.cat([targets for _, targets in loader]))
    for epoch, got in enumerate(by_epoch):
        dataset.set_epoch(epoch)
        expected = torch.stack([dataset[i][1] for i in (3, 1, 0, 2)])
        assert torch.equal(got, expected)
    assert not torch.equal(by_epoch[0], by_epoch[1])


@pytest.mark.parametrize(
    ("augmentations", "line"),
    [
        (
            [{"name": "hflip", "p": 0.5}, {"name": "vflip", "p": 0.5}, {"name": "warp", "p": 0.5}],
            "augmentations[2].name: 'warp' is not one of ['hflip', ",
        ),
        ([{"name": "affine", "scale": [0.7, 1.4], "rotate": [-180, 270], "p": 0.2}],
         "augmentations[0].rotate[1]: 270 is greater than the maximum of 180"),
        ([{"name": "gamma", "gamma": [1.5, 0.7], "p": 0.2}],
         "augmentations[0].gamma: [1.5, 0.7] is not [low, high] (low is above high)"),
        ([{"name": "blur", "sigma": [0.5, 1.0], "p": 1.5}], "augmentations[0].p: 1.5 is greater than the maximum of 1"),
        ([{"name": "elastic", "alpha": 100, "p": 0.2}], "augmentations[0].sigma: missing required key"),
        ([{"name": "hflip", "p": 0.5, "prob": 1}], "augmentations[0].prob: unknown key"),
        (True, "augmentations: True is not false or a list of augmentation steps"),
    ],
)
def test_bad_augmentations_are_one_line_naming_the_key(tmp_path, augmentations, line):
    (tmp_path / "c.json").write_text(json.dumps({"augmentations": augmentations}))
    with pytest.raises(TaskError) as err:
        merged_train_config(tmp_path / "c.json")
    assert line in err.value.message
    assert err.value.message.count("\n") == 1


def test_rotate90_needs_a_square_input(tmp_path):
    config = {"input_size": {"width": 64, "height": 32}, "augmentations": [{"name": "rotate90", "p": 0.5}]}
    (tmp_path / "c.json").write_text(json.dumps(config))
    with pytest.raises(TaskError, match=r"augmentations\[0\]\.name: rotate90 would swap width and height"):
        merged_train_config(tmp_path / "c.json")


def test_overlay_blends_class_colours_and_hatches_neutral():
    image = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[0:4, 0:4] = 1
    mask[4:, 4:] = NEUTRAL_INDEX
    out = overlay(image, mask, {0: (0, 0, 0), 1: (200, 0, 0)})
    assert out[0, 0].tolist() == [150, 50, 50]
    assert out[0, 7].tolist() == [100, 100, 100]
    neutral = out[4:, 4:].reshape(-1, 3)
    assert {tuple(p) for p in neutral} == {(0, 0, 0), (255, 255, 255)}


def test_augment_preview_writes_n_side_by_side_pngs(project, tmp_path):
    (project / "task_config.json").write_text(json.dumps(TINY_CONFIG))
    written = write_preview(TaskDir(project), tmp_path / "preview", 6)
    assert len(written) == 6 and len(set(written)) == 6
    panels = [cv2.imread(str(path)) for path in written]
    assert all(panel.shape == (64, 128, 3) for panel in panels)
    # Samples 0 and 4 are the same image in epochs 0 and 1: differently augmented.
    assert not np.array_equal(panels[0], panels[4])


def test_augment_preview_command(project, tmp_path):
    (project / "task_config.json").write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "preview"
    proc = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "augment-preview", "--task-dir", str(project), "--out", str(out),
         "--n", "3", "--log-format", "json"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.suffix for p in out.iterdir()) == [".png"] * 3
