"""Crop training (scale.mode crop): what a crop holds, foreground oversampling, padding, and that a
crop-trained model is validated and applied at its training scale."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from plugin.config.load import read_train_config
from plugin.config.typed import LEGACY_NETWORK, RESIZE, Scale
from plugin.demo import create_inference_task
from plugin.files import read_json, write_json
from plugin.format.classes import NEUTRAL_INDEX, create_mapping
from plugin.format.images import read_image
from plugin.format.project import find_project, list_items, read_meta
from plugin.inference import modes
from plugin.inference.evaluate import evaluate_projects
from plugin.inference.predictor import Predictor, load_predictor
from plugin.inference.task import infer_task
from plugin.nn.network import create_network
from plugin.nn.preprocess import PAD_COLOR, normalize, resize_image
from plugin.nn.tiling import TorchNetwork, training_window
from plugin.task_dir import TaskDir
from plugin.training.crops import crop_origin, cut
from plugin.training.data import WholeImageDataset, split_items
from plugin.training.task import create_dataset, resolve_scale, train_task
from tests.conftest import TINY_CONFIG, make_task, run_entrypoint
from tests.test_contract import Recorder

CROP = {"mode": "crop", "factor": 1.0}


def dataset_of(root: Path, split: str = "train", **overrides):
    config = {**TINY_CONFIG, "augmentations": False, **overrides}
    (root / "task_config.json").write_text(json.dumps(config))
    config = read_train_config(root / "task_config.json")
    project = find_project(root / "data")
    meta = read_meta(project)
    items = split_items(list_items(project), "train", "val")[split]
    return create_dataset(split, items, meta, create_mapping(meta, "bg", "neutral"), config)


def find_window(image: np.ndarray, crop: np.ndarray) -> list[tuple[int, int]]:
    """Every (top, left) where `crop` equals a window of `image`."""
    h, w = crop.shape[:2]
    return [
        (top, left)
        for top in range(image.shape[0] - h + 1)
        for left in range(image.shape[1] - w + 1)
        if np.array_equal(image[top : top + h, left : left + w], crop)
    ]


def test_crop_origin_keeps_the_most_image_and_centres_where_asked():
    rng = np.random.default_rng(0)
    starts = {crop_origin(100, 64, None, rng) for _ in range(500)}
    assert min(starts) == 0 and max(starts) == 36  # uniform over every position inside the image
    assert crop_origin(100, 64, 50, rng) == 18  # centred on 50
    assert crop_origin(100, 64, 2, rng) == 0 and crop_origin(100, 64, 99, rng) == 36  # moved inside
    shorter = {crop_origin(40, 64, None, rng) for _ in range(500)}
    assert min(shorter) == -24 and max(shorter) == 0  # the whole image, padding on either side


def test_cut_fills_outside_the_array():
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert cut(array, -1, 2, 3, 3, 255).tolist() == [[255, 255, 255], [2, 3, 255], [6, 7, 255]]


def test_crops_are_native_pixels_of_the_image(tmp_path):
    root = make_task(tmp_path / "task", size=80)
    dataset = dataset_of(root, scale=CROP)
    for index, item in enumerate(dataset.items):
        image, mask = dataset.sample(index)
        assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
        native = read_image(item.image_path)
        (top, left), *_ = find_window(native, image)
        assert np.array_equal(mask, dataset.masks[index][top : top + 64, left : left + 64])


def test_scale_factor_crops_the_scaled_image(tmp_path):
    root = make_task(tmp_path / "task", size=160)
    dataset = dataset_of(root, scale={"mode": "crop", "factor": 0.5})
    assert all(m.shape == (80, 80) for m in dataset.masks)
    image, _ = dataset.sample(0)
    scaled = resize_image(read_image(dataset.items[0].image_path), 80, 80)
    assert find_window(scaled, image)


def test_images_smaller_than_the_crop_are_padded_with_neutral_pixels(tmp_path, caplog):
    root = make_task(tmp_path / "task", size=40)
    with caplog.at_level(logging.WARNING):
        dataset = dataset_of(root, scale=CROP)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "every train image is smaller than the 64x64 input_size crop" in warnings[0]
    image, mask = dataset.sample(0)
    padding = mask == NEUTRAL_INDEX
    assert padding.sum() >= 64 * 64 - 40 * 40  # at least the padded pixels, plus the project's own neutral
    rows, cols = np.nonzero(~padding)
    inside = image[rows.min() : rows.min() + 40, cols.min() : cols.min() + 40]
    assert np.array_equal(inside, read_image(dataset.items[0].image_path))
    outside = np.ones((64, 64), bool)
    outside[rows.min() : rows.min() + 40, cols.min() : cols.min() + 40] = False
    assert (image[outside] == PAD_COLOR).all() and (mask[outside] == NEUTRAL_INDEX).all()
    # The tensors the loader yields count the padding in no loss.
    _tensor, target = dataset[0]
    assert (target.numpy()[outside] == NEUTRAL_INDEX).all()


def foreground_shares(dataset, epochs: int) -> tuple[float, float]:
    """Shares of crops that hold a foreground pixel (a class other than background and neutral), and
    whose centre is one."""
    holds = centred = total = 0
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            _image, mask = dataset.sample(index)
            foreground = (mask != 0) & (mask != NEUTRAL_INDEX)
            holds += foreground.any()
            centred += foreground[32, 32]
            total += 1
    return holds / total, centred / total


def test_foreground_oversampling_centres_crops_on_foreground(tmp_path):
    root = make_task(tmp_path / "task", size=160)
    always = foreground_shares(dataset_of(root, scale=CROP, foreground_oversampling=1.0), 10)
    never = foreground_shares(dataset_of(root, scale=CROP, foreground_oversampling=0.0), 10)
    assert always[0] == 1.0
    # Centred unless the foreground pixel lies within half a crop of the border (the crop stays inside).
    assert always[1] > 0.8 and always[1] > never[1] + 0.3


def test_crop_validation_uses_whole_images(tmp_path):
    root = make_task(tmp_path / "task", size=80)
    val = dataset_of(root, "val", scale=CROP)
    assert isinstance(val, WholeImageDataset)
    image, target = val[0]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (80, 80, 3) and tuple(target.shape) == (80, 80)
    assert np.array_equal(image.numpy(), read_image(val.items[0].image_path))


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory):
    """A crop-trained tiny model (112 px images, 64 px crops, so 3 x 3 windows): its task dir and train summary."""
    root = make_task(tmp_path_factory.mktemp("crop") / "task", {**TINY_CONFIG, "epochs": 2, "val_every": 2, "scale": CROP}, size=112)
    return TaskDir(root), train_task(TaskDir(root))


def test_the_checkpoint_records_the_training_scale(crop_run):
    _task, summary = crop_run
    settings = read_json(summary.best_checkpoint / "config.json")["settings"]
    assert settings["scale"] == CROP and settings["input_size"] == {"width": 64, "height": 64}
    predictor = load_predictor(summary.best_checkpoint, 0)
    assert predictor.scale == Scale("crop", 1.0) and predictor.window == (64, 64)


def test_validation_scores_what_inference_writes(crop_run, tmp_path):
    # The last validation and `evaluate` on the predictions of full_image agree to the last digit: the
    # validation predicts whole images tile by tile exactly as inference does.
    task, summary = crop_run
    infer = create_inference_task(tmp_path / "infer", summary.best_checkpoint, find_project(task.data_dir), "val")
    report = evaluate_projects(infer.data_dir, infer_task(infer).output_dir)
    assert report["mean_iou"] == pytest.approx(summary.best_val_metrics["mean_iou"], abs=1e-12)
    assert report["pixel_accuracy"] == pytest.approx(summary.best_val_metrics["accuracy"], abs=1e-12)


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_every_mode_shows_a_crop_model_the_image_at_its_training_scale(factor):
    recorder = Recorder(create_network(LEGACY_NETWORK, 2).eval())
    predictor = Predictor(TorchNetwork(recorder), torch.device("cpu"), (64, 48), ["bg", "a"], [], (),
                          Scale("crop", factor))
    window = training_window((64, 48), factor)
    image = np.random.default_rng(0).integers(0, 256, (150, 170, 3), dtype=np.uint8)
    full = modes.full_image(predictor, image)
    inputs = torch.cat(recorder.inputs)
    # Tiles of the training window (half overlap), each resized to the input: here 3 x 4 windows at
    # scale 1, and the first is the image's top-left window at the training scale.
    assert inputs.shape[1:] == (3, 48, 64)
    first = normalize(resize_image(image[: window[1], : window[0]], 64, 48))
    assert torch.equal(inputs[0], first)
    tiled = modes.sliding_window(predictor, image, window, (window[0] // 2, window[1] // 2), 4)
    assert np.array_equal(full.probs, tiled.probs)


def test_a_window_at_another_scale_is_warned_about_once(caplog):
    predictor = Predictor(TorchNetwork(create_network(LEGACY_NETWORK, 2).eval()), torch.device("cpu"), (64, 64), ["bg", "a"], [], (),
                          Scale("crop", 0.5))
    with caplog.at_level(logging.WARNING):
        assert modes.window_plan(predictor, (None, None), (None, None)) == ((128, 128), (64, 64))
        assert not caplog.records
        assert modes.window_plan(predictor, (64, 64), (8, None)) == ((64, 64), (8, 32))
    [record] = caplog.records
    assert "scale 1x1" in record.getMessage() and "trained at scale 0.5" in record.getMessage()


def test_a_checkpoint_without_a_scale_record_is_a_resize_model(crop_run, tmp_path):
    _task, summary = crop_run
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    config = read_json(summary.best_checkpoint / "config.json")
    del config["settings"]["scale"]
    write_json(legacy / "config.json", config)
    (legacy / "model.pt").write_bytes((summary.best_checkpoint / "model.pt").read_bytes())
    predictor = load_predictor(legacy, 0)
    assert predictor.scale == Scale("resize", 1.0)
    recorder = Recorder(predictor.network.model)
    image = np.random.default_rng(1).integers(0, 256, (150, 170, 3), dtype=np.uint8)
    modes.full_image(Predictor(TorchNetwork(recorder), predictor.device, (64, 64), predictor.class_titles, []), image)
    [batch] = recorder.inputs
    assert torch.equal(batch[0], normalize(resize_image(image, 64, 64)))  # the whole image, resized


def test_a_legacy_model_keeps_the_legacy_window():
    predictor = Predictor(TorchNetwork(create_network(LEGACY_NETWORK, 2).eval()), torch.device("cpu"), (64, 64), ["bg", "a"], [])
    assert predictor.scale == Scale("resize", 1.0)
    assert modes.window_plan(predictor, (None, None), (None, None)) == ((128, 128), (64, 64))


def test_sliding_window_defaults_to_the_scale_a_resize_model_was_trained_at(caplog):
    # Trained on 512 px images resized to a 256 input (scale 0.5): its window is 512, so that each tile
    # reaches the network at the scale it learnt; a checkpoint without the record keeps the legacy 128.
    network = TorchNetwork(create_network(LEGACY_NETWORK, 2).eval())
    trained = Predictor(network, torch.device("cpu"), (256, 256), ["bg", "a"], [], (), Scale("resize", 1.0),
                        presented_scale=(0.5, 0.5))
    legacy = Predictor(network, torch.device("cpu"), (256, 256), ["bg", "a"], [])
    with caplog.at_level(logging.WARNING):
        assert modes.window_plan(trained, (None, None), (None, None)) == ((512, 512), (256, 256))
        assert modes.window_plan(legacy, (None, None), (None, None)) == ((128, 128), (64, 64))
        assert not caplog.records
        modes.window_plan(trained, (128, 128), (None, None))
    [record] = caplog.records
    assert "scale 2x2" in record.getMessage() and "trained at scale 0.5" in record.getMessage()


def auto_config(tmp_path: Path, **keys):
    write_json(tmp_path / "task_config.json", {**TINY_CONFIG, "scale": {"mode": "crop", "factor": "auto"}, **keys})
    return read_train_config(tmp_path / "task_config.json")


def test_scale_auto_is_native_until_a_crop_would_span_under_a_third_of_the_images(tmp_path):
    config = auto_config(tmp_path)  # 64 px crops: native up to a median shorter side of 192 px
    assert config.scale == Scale("crop", None)
    native = resolve_scale(config, [(120, 160), (192, 300), (100, 100)])
    assert native.scale == Scale("crop", 1.0) and native.raw["scale"] == {"mode": "crop", "factor": 1.0}
    large = resolve_scale(config, [(480, 640), (600, 800), (300, 400)])  # median shorter side 480
    assert large.scale == Scale("crop", 0.4) and large.raw["scale"] == {"mode": "crop", "factor": 0.4}
    # A number is kept, and resize takes none: the checkpoint records a number either way.
    given = resolve_scale(auto_config(tmp_path, scale={"mode": "crop", "factor": 0.5}), [(4000, 4000)])
    assert given.scale == Scale("crop", 0.5)
    resized = resolve_scale(auto_config(tmp_path, scale={"mode": "resize", "factor": "auto"}), [(4000, 4000)])
    assert resized.scale == RESIZE and resized.raw["scale"] == {"mode": "resize", "factor": 1.0}


def test_a_new_task_trains_on_crops_at_the_auto_scale_and_inference_uses_it(tmp_path):
    # No scale key: the default. 224 px images are over 3 crops of 64: scale 192 / 224.
    config = {k: v for k, v in TINY_CONFIG.items() if k != "scale"}
    task = TaskDir(make_task(tmp_path / "task", config, size=224))
    run = run_entrypoint("entrypoints.train", task.root)
    assert run.returncode == 0, run.stderr[-3000:]
    factor = round(192 / 224, 4)
    assert [line["scale"] for line in run.lines if "scale" in line] == [{"mode": "crop", "factor": factor}]
    checkpoint = task.results_dir / "00000000"
    assert read_json(checkpoint / "config.json")["settings"]["scale"] == {"mode": "crop", "factor": factor}
    assert read_json(checkpoint / "config.json")["presented_scale"] == {"x": factor, "y": factor}
    predictor = load_predictor(checkpoint, 0)
    assert predictor.scale == Scale("crop", factor) and predictor.window == training_window((64, 64), factor)
