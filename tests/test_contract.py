"""The ML contract: what the network is fed, and that training on a tiny task actually learns.

A model is only as good as the agreement between the tensors it was trained on and the tensors it
is asked to predict from. These tests pin that agreement from both sides: the inference tensor equals
the training tensor for the same image, and both are RGB normalised with the ImageNet statistics
that legacy checkpoints were trained with (so a swapped channel order or a dropped normalisation,
which would still agree between the two paths, fails here too).
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from plugin.config.typed import LEGACY_NETWORK, MATCH_ALL, Mode
from plugin.format.classes import create_mapping
from plugin.format.images import read_image
from plugin.format.project import list_items, read_meta
from plugin.inference import modes
from plugin.inference.apply import batching
from plugin.inference.predictor import Predictor
from plugin.nn.network import create_network
from plugin.nn.tiling import TorchNetwork, network_inputs
from plugin.synthetic import create_project, natural_image
from plugin.task_dir import TaskDir
from plugin.training.data import CorruptionBudget, SegmentationDataset, prepare_masks
from plugin.training.task import train_task

# RGB red through the ImageNet normalisation: ((1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225).
RED_TENSOR = (2.2489083, -2.0357144, -1.8044444)


class Recorder(nn.Module):
    """The real network, keeping every batch it is fed."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.inputs: list[torch.Tensor] = []

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.inputs.append(batch.detach().clone())
        return self.model(batch)


def _val_dataset(project, size: tuple[int, int]) -> SegmentationDataset:
    meta = read_meta(project)
    mapping = create_mapping(meta, "bg", "neutral")
    budget = CorruptionBudget.create("val", 0)
    kept, masks = prepare_masks(list_items(project), meta, mapping, size, budget)
    return SegmentationDataset(kept, masks, size, budget)


def test_inference_feeds_the_network_the_training_tensor(tmp_path):
    project = create_project(tmp_path / "p", n_train=0, n_val=2, size=96, seed=3)
    size = (64, 48)  # (width, height): a non-square input also checks the axis order of the resize
    dataset = _val_dataset(project, size)
    recorder = Recorder(create_network(LEGACY_NETWORK, 4).eval())
    predictor = Predictor(TorchNetwork(recorder), torch.device("cpu"), size, ["bg", "blob", "box", "ring"], [])
    for index, item in enumerate(dataset.items):
        modes.full_image(predictor, read_image(item.image_path))
        training_tensor, _ = dataset[index]
        assert recorder.inputs[-1].shape == (1, 3, 48, 64)
        assert torch.equal(recorder.inputs[-1][0], training_tensor)


@pytest.mark.parametrize("path_name", ["training", "inference"])
def test_the_network_sees_rgb_normalised_with_imagenet_statistics(tmp_path, path_name):
    project = create_project(tmp_path / "p", n_train=0, n_val=1, size=64, seed=0)
    item = list_items(project)[0]
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 2] = 255  # BGR on disk: OpenCV writes the red channel last
    cv2.imwrite(str(item.image_path), red)
    if path_name == "training":
        tensor = _val_dataset(project, (32, 32))[0][0]
    else:
        recorder = Recorder(create_network(LEGACY_NETWORK, 4).eval())
        predictor = Predictor(TorchNetwork(recorder), torch.device("cpu"), (32, 32), ["bg", "blob", "box", "ring"], [])
        modes.full_image(predictor, read_image(item.image_path))
        tensor = recorder.inputs[-1][0]
    expected = torch.tensor(RED_TENSOR).view(3, 1, 1).expand(3, 32, 32)
    assert torch.allclose(tensor, expected, atol=1e-5)


# Four model classes (bg, blob, box, ring): an untrained or all-background model scores about 0.2.
LEARNING_BAR = 0.5


def test_a_tiny_task_trains_well_above_chance(tmp_path):
    task = TaskDir(tmp_path / "task")
    create_project(task.data_dir / "shapes", n_train=32, n_val=8, size=64, seed=5)
    config = {
        "input_size": {"width": 64, "height": 64},
        "batch_size": {"train": 8, "val": 8},
        "data_workers": {"train": 0, "val": 0},
        "epochs": 8,
        "val_every": 8,
        "lr": 0.002,
        "augmentations": False,
    }
    task.config_path.write_text(json.dumps(config))
    summary = train_task(task)
    assert summary.final_val_metrics["mean_iou"] > LEARNING_BAR, summary.final_val_metrics


def test_whole_image_inference_decodes_a_large_jpeg_as_training_did(tmp_path):
    # A 1024x768 photo for a 64x48 input: training decodes it at reduced size (read_resized), and the
    # inference task's readers must feed the network those very pixels, not a full decode resized.
    project = tmp_path / "p"
    (project / "ds" / "img").mkdir(parents=True)
    (project / "ds" / "ann").mkdir(parents=True)
    (project / "meta.json").write_text(json.dumps({"classes": [], "tags": []}))
    photo = project / "ds" / "img" / "photo.jpg"
    cv2.imwrite(str(photo), natural_image(768, 1024, seed=5), [cv2.IMWRITE_JPEG_QUALITY, 90])
    (project / "ds" / "ann" / "photo.jpg.json").write_text(
        json.dumps({"size": {"height": 768, "width": 1024}, "tags": [], "objects": []}))
    size = (64, 48)
    training_tensor, _ = _val_dataset(project, size)[0]
    predictor = Predictor(TorchNetwork(create_network(LEGACY_NETWORK, 2).eval()), torch.device("cpu"), size, ["bg", "a"], [])
    _, prepare = batching(Mode("full_image", MATCH_ALL, "_unet", False, (), batch_size=4), predictor)
    assert torch.equal(prepare(photo), training_tensor)
    # The reduced decode is what makes them equal: a full decode resized differs.
    assert not torch.equal(network_inputs([read_image(photo)], size)[0], training_tensor)
