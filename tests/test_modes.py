"""Inference modes on real images with a seeded model: coverage, blending, probabilities, box arithmetic."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from plugin.config.load import read_inference_config
from plugin.config.typed import LEGACY_NETWORK, tta_flips
from plugin.format.geometry import Polygon, Rectangle
from plugin.format.project import Label
from plugin.inference import modes
from plugin.inference.predictor import Predictor
from plugin.nn import tiling
from plugin.nn.network import create_network


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    model = create_network(LEGACY_NETWORK, 3).eval()
    out_classes = [{"title": t, "shape": "bitmap", "color": "#112233"} for t in ("bg", "a", "b")]
    return Predictor(tiling.TorchNetwork(model), torch.device("cpu"), (64, 48), ["bg", "a", "b"], out_classes)


@pytest.fixture(scope="module")
def confident_predictor() -> Predictor:
    # The seeded model's probabilities sit near uniform; larger logits make its tile-border effects measurable.
    torch.manual_seed(0)
    model = create_network(LEGACY_NETWORK, 3).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "last_conv" in name:
                param.mul_(20)
    return Predictor(tiling.TorchNetwork(model), torch.device("cpu"), (64, 48), ["bg", "a", "b"], [])


def smooth(height: int, width: int) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    channels = [128 + 100 * np.sin(cols / 40), 120 + 60 * np.cos(rows / 30 + cols / 70), np.full(cols.shape, 100.0)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[: height // 2, : width // 3] = (200, 40, 40)  # a structure the model responds to
    return image


def assert_probabilities(pred: modes.Prediction, shape: tuple[int, int]) -> None:
    assert pred.probs.shape == (3, *shape) and pred.probs.dtype == np.float32
    covered = np.ones(shape, bool) if pred.covered is None else pred.covered
    sums = pred.probs.sum(axis=0)[covered]
    assert np.isfinite(pred.probs).all()
    assert np.allclose(sums, 1.0, atol=1e-5)
    assert pred.probs.min() >= 0 and pred.probs.max() <= 1 + 1e-6


def test_window_starts_match_the_legacy_example():
    # agent-protocol.md: 300x500 image, window 128, overlap 10 -> tops 0, 118, 172; lefts 0, 118, 236, 354, 372.
    assert tiling.window_starts(300, 128, 118) == [0, 118, 172]
    assert tiling.window_starts(500, 128, 118) == [0, 118, 236, 354, 372]
    assert tiling.window_starts(128, 128, 118) == [0]
    assert tiling.window_starts(100, 128, 118) == [0]  # smaller than the window: padded, one window
    assert tiling.window_starts(236 + 128, 128, 118) == [0, 118, 236]  # exact fit: no extra window


def test_window_weights_fall_toward_the_borders():
    weights = tiling.window_weights(9, 7)
    assert weights.shape == (9, 7)
    assert weights[4, 3] == pytest.approx(1.0)
    assert weights[0, 0] < weights[2, 2] < weights[4, 3]
    assert weights.min() >= tiling.WINDOW_WEIGHT_FLOOR


def test_full_image_probabilities(predictor):
    pred = modes.full_image(predictor, textured(50, 70))
    assert_probabilities(pred, (50, 70))
    assert pred.covered is None and pred.boxes == [Rectangle(0, 0, 69, 49)]


def test_sliding_window_with_one_window_equals_full_image(predictor):
    image = textured(48, 64)
    full = modes.full_image(predictor, image)
    window = modes.sliding_window(predictor, image, (64, 48), (0, 0), batch_size=4)
    assert np.allclose(window.probs, full.probs, atol=1e-5)
    assert np.array_equal(window.class_map(), full.class_map())


@pytest.mark.parametrize(("height", "width"), [(100, 70), (61, 131), (30, 20)])
def test_sliding_window_covers_every_pixel(predictor, height, width):
    image = textured(height, width, seed=height)
    pred = modes.sliding_window(predictor, image, (48, 40), (8, 6), batch_size=3)
    assert_probabilities(pred, (height, width))
    assert pred.covered is None
    # The saved windows lie inside the image and together cover it.
    cover = np.zeros((height, width), bool)
    for box in pred.boxes:
        assert 0 <= box.left <= box.right < width and 0 <= box.top <= box.bottom < height
        cover[box.top : box.bottom + 1, box.left : box.right + 1] = True
    assert cover.all()


def test_sliding_window_does_not_depend_on_the_batch_size(predictor):
    image = textured(90, 100, seed=3)
    one = modes.sliding_window(predictor, image, (48, 40), (10, 10), batch_size=1)
    many = modes.sliding_window(predictor, image, (48, 40), (10, 10), batch_size=16)
    assert np.allclose(one.probs, many.probs, atol=1e-5)


def test_sliding_window_blends_without_seams(predictor):
    # Where two windows overlap, the result lies between their two predictions, weighted toward the
    # window whose centre is nearer: no hard switch at a window border.
    image = textured(40, 80, seed=5)
    pred = modes.sliding_window(predictor, image, (48, 40), (16, 0), batch_size=2)
    left = predictor.probabilities([image[:, 0:48]])[0].numpy()
    right = predictor.probabilities([image[:, 32:80]])[0].numpy()
    overlap = pred.probs[:, :, 32:48]
    low = np.minimum(left[:, :, 32:48], right[:, :, 0:16]) - 1e-5
    high = np.maximum(left[:, :, 32:48], right[:, :, 0:16]) + 1e-5
    assert ((overlap >= low) & (overlap <= high)).all()
    assert np.allclose(pred.probs[:, :, 33], left[:, :, 33], atol=0.5)  # nearer the left window's centre...
    assert not np.allclose(pred.probs[:, :, 33], right[:, :, 1], atol=1e-6)  # ...but blended


def test_roi_follows_the_legacy_bounds_arithmetic(predictor):
    # agent-protocol.md: 500x1000, "30%" top, "10%" elsewhere -> rows 150..449, cols 100..899.
    image = textured(500, 1000)
    pred = modes.roi(predictor, image, {"left": "10%", "top": "30%", "right": "10%", "bottom": "10%"})
    assert pred.boxes == [Rectangle(100, 150, 899, 449)]
    expected = np.zeros((500, 1000), bool)
    expected[150:450, 100:900] = True
    assert np.array_equal(pred.covered, expected)
    assert_probabilities(pred, (500, 1000))
    assert (pred.class_map()[~expected] == 255).all()


def test_bboxes_pad_and_merge_overlaps_by_probability(predictor):
    image = textured(60, 80, seed=7)
    square = np.array([[10, 10], [29, 10], [29, 29], [10, 29]], np.int32)
    labels = [Label("x", Rectangle(20, 20, 49, 39)), Label("y", Polygon(square))]
    pred = modes.bboxes(predictor, image, labels, {"left": "10%", "top": "0px", "right": "0px", "bottom": "5px"})
    # 10% of the 30-px-wide rectangle is 3 px; the polygon's box is 20 wide -> 2 px.
    assert pred.boxes == [Rectangle(17, 20, 49, 44), Rectangle(8, 10, 29, 34)]
    assert pred.box_sources == ["x", "y"]
    assert_probabilities(pred, (60, 80))
    first = predictor.probabilities([image[20:45, 17:50]])[0].numpy()
    second = predictor.probabilities([image[10:35, 8:30]])[0].numpy()
    # Pixel (row 25, col 20) lies in both boxes: the mean of the two predictions there.
    expected = (first[:, 25 - 20, 20 - 17] + second[:, 25 - 10, 20 - 8]) / 2
    assert np.allclose(pred.probs[:, 25, 20], expected, atol=1e-6)
    assert not pred.covered[50:, :].any()


def test_boxes_outside_the_image_are_skipped(predictor):
    image = textured(30, 30)
    pred = modes.bboxes(predictor, image, [Label("x", Rectangle(40, 40, 50, 50))], {k: "0px" for k in ("left", "top", "right", "bottom")})
    assert pred.boxes == [] and pred.box_sources == [] and not pred.covered.any()


def test_the_default_overlap_leaves_no_seam(confident_predictor, tmp_path):
    path = tmp_path / "task_config.json"
    path.write_text(json.dumps({"mode": {"name": "sliding_window", "window": {"width": 64, "height": 48}}}))
    mode = read_inference_config(path).mode
    _window, default = modes.window_plan(confident_predictor, mode.window, mode.min_overlap)
    image = smooth(48, 192)
    seams = [63, 127]  # abutting 64-px windows meet between columns 63|64 and 127|128
    # Away from the image's own borders, where the model's padding shows whatever the tiling.
    elsewhere = [c for c in range(8, 192 - 9) if c not in seams]

    def jumps(overlap: tuple[int, int]) -> np.ndarray:
        probs = modes.sliding_window(confident_predictor, image, (64, 48), overlap, batch_size=4).probs
        return np.abs(np.diff(probs, axis=2)).mean(axis=(0, 1))  # [c]: between columns c and c + 1

    blended = jumps(default)
    assert blended[seams].max() <= blended[elsewhere].max()
    abutting = jumps((0, 0))
    assert np.argmax(abutting[8 : 192 - 9]) + 8 in seams
    assert abutting[seams].max() > 5 * blended[seams].max()


def test_tta_makes_predictions_flip_equivariant(predictor):
    # The model's input size, so no resizing (whose rounding need not commute with flips) gets in the way.
    image = textured(48, 64, seed=11)
    flipped = np.ascontiguousarray(image[:, ::-1])
    plain = predictor.probabilities([image, flipped]).numpy()
    assert not np.allclose(plain[1], plain[0][:, :, ::-1], atol=1e-3)
    mirrored = dataclasses.replace(predictor, tta=tta_flips(True)).probabilities([image, flipped]).numpy()
    assert np.allclose(mirrored[1], mirrored[0][:, :, ::-1], atol=1e-6)
    # Only the flips asked for: a horizontal flip alone leaves the vertical direction unmirrored.
    upside_down = np.ascontiguousarray(image[::-1])
    horizontal = dataclasses.replace(predictor, tta=("horizontal",)).probabilities([image, upside_down]).numpy()
    assert not np.allclose(horizontal[1], horizontal[0][:, ::-1], atol=1e-3)


def test_tta_averages_the_flipped_back_probabilities(predictor):
    image = textured(48, 64, seed=12)
    vertical = dataclasses.replace(predictor, tta=("vertical",)).probabilities([image])[0].numpy()
    plain = predictor.probabilities([image, np.ascontiguousarray(image[::-1])]).numpy()
    assert np.allclose(vertical, (plain[0] + plain[1][:, ::-1]) / 2, atol=1e-6)


def test_tta_reaches_every_mode(predictor):
    # A tiling symmetric under the flip (lefts 0, 32, 64, 96 of 160) keeps sliding_window equivariant too.
    mirrored = dataclasses.replace(predictor, tta=tta_flips(True))
    image = textured(48, 160, seed=13)
    flipped = np.ascontiguousarray(image[:, ::-1])
    for run in (
        lambda p, img: modes.sliding_window(p, img, (64, 48), (32, 24), batch_size=3),
        lambda p, img: modes.roi(p, img, {"left": "16px", "top": "0px", "right": "16px", "bottom": "0px"}),
    ):
        pred, pred_flipped = run(mirrored, image), run(mirrored, flipped)
        assert_probabilities(pred, (48, 160))
        assert np.allclose(pred_flipped.probs, pred.probs[:, :, ::-1], atol=1e-6)
        assert not np.allclose(run(predictor, flipped).probs, run(predictor, image).probs[:, :, ::-1], atol=1e-3)
