"""Every network end to end: it trains above chance with two processes, survives a kill and resumes,
predicts in every inference mode (TTA included), and its ONNX export matches torch.

The default network (a UNet on efficientnet_lite0 from its ImageNet weights) is what every other test
module trains; this module runs the others, from a random start (ResNet and VGG16-BN ImageNet files
are downloads, which the test machine cannot make).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from plugin.config.typed import tta_flips
from plugin.format.images import read_image
from plugin.format.project import list_items, read_annotation, read_meta
from plugin.inference import modes
from plugin.inference.export import TOLERANCE, export_onnx
from plugin.inference.predictor import load_predictor
from tests.conftest import TINY_CONFIG, make_task
from tests.test_infer import MODES, link_model
from tests.test_resume import Training, is_checkpoint

NETWORKS = {
    "resnet18": {"arch": "unet", "encoder": "resnet18", "encoder_weights": None},
    "resnet34": {"arch": "unet", "encoder": "resnet34", "encoder_weights": None},
    "unet_v2": {"arch": "unet_v2"},
}
# 16 train images, a global batch of 4 over two processes, 8 epochs: 32 steps, validated every 2 epochs
# (a checkpoint each time, so that the run can be killed after the first and resumed).
CONFIG = dict(TINY_CONFIG, batch_size={"train": 2, "val": 2}, cpu_processes=2, epochs=8, val_every=2, lr=0.003,
              log_every={"seconds": None, "iterations": 4})
# Four classes (bg, ring, blob, box) on the synthetic shapes: calling every pixel background scores a
# mean IoU of about 0.2 (background's IoU, about 0.8, over four classes).
MIN_MEAN_IOU = 0.45


@pytest.fixture(scope="module", params=list(NETWORKS))
def trained(request, tmp_path_factory) -> tuple[str, Path, list[dict]]:
    """A two-process run of the network, SIGKILLed after its first checkpoint and run again to the end:
    (network, task dir, the resumed run's lines)."""
    name = request.param
    task = make_task(tmp_path_factory.mktemp(name) / "task", dict(CONFIG, network=NETWORKS[name]), n_train=16,
                     n_val=4)
    first = Training(task)
    first.until(is_checkpoint(0))
    first.process.kill()
    first.process.wait()
    resumed = Training(task).finish(timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return name, task, resumed.lines


def test_each_network_resumes_and_learns_above_chance(trained):
    name, task, lines = trained
    assert [line["resumed_checkpoint"] for line in lines if "resumed_iteration" in line] == ["00000000"]
    checkpoints = [line for line in lines if line.get("event_type") == "EventType.CHECKPOINT"]
    assert [c["id"] for c in checkpoints] == [1, 2, 3]  # 0 was written before the kill
    assert checkpoints[-1]["optional"]["val_metrics"]["mean_iou"] >= MIN_MEAN_IOU
    config = json.loads((task / "results" / "00000003" / "config.json").read_text())
    assert {k: config["network"].get(k) for k in ("arch", "encoder")} == {
        "arch": NETWORKS[name]["arch"], "encoder": NETWORKS[name].get("encoder")}


def test_each_network_predicts_in_every_mode_and_exports_what_torch_computes(trained, tmp_path):
    name, task, _ = trained
    model_dir = tmp_path / "model"
    link_model(task / "results" / "00000003", model_dir)
    project = task / "data" / "shapes"
    item = list_items(project)[0]
    image, labels = read_image(item.image_path), read_annotation(item.ann_path, read_meta(project)).labels
    predictor = load_predictor(model_dir, 0, tta=tta_flips(True))
    assert predictor.architecture.arch == NETWORKS[name]["arch"]
    predictions = [
        modes.full_image(predictor, image),
        modes.roi(predictor, image, MODES["roi"]["bounds"]),
        modes.bboxes(predictor, image, labels, MODES["bboxes"]["padding"]),
        # The default window: the training scale (64 px images resized to the 64 px input).
        modes.sliding_window(predictor, image, *modes.window_plan(predictor, (None, None), (None, None)), 4),
    ]
    for prediction in predictions:
        assert prediction.probs.shape[1:] == image.shape[:2]
        assert np.allclose(prediction.probs.sum(axis=0)[prediction.covered if prediction.covered is not None
                                                        else slice(None)], 1, atol=1e-4)

    exported = export_onnx(model_dir, model_dir / "model.onnx")
    assert exported.max_difference <= TOLERANCE
    onnx_predictor = load_predictor(model_dir, 0, backend="onnxruntime")
    torch_predictor = load_predictor(model_dir, 0)
    with torch.inference_mode():
        ours, theirs = modes.full_image(torch_predictor, image).probs, modes.full_image(onnx_predictor, image).probs
    assert np.abs(ours - theirs).max() <= TOLERANCE
