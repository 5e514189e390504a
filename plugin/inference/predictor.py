"""A trained model ready to predict: model/ (config.json + model.pt) -> RGB crops in, class probabilities out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plugin.errors import TaskError
from plugin.format.classes import titles_by_index
from plugin.jsonfile import read_json
from plugin.nn.devices import plan_devices
from plugin.nn.model import build_model
from plugin.nn.preprocess import normalize, resize_image
from plugin.nn.weights import CONFIG_NAME, WEIGHTS_NAME, load_continue, load_state_dict

log = logging.getLogger(__name__)

# Test-time augmentation flips by config name -> the (N, C, H, W) dims they reverse.
FLIPS: dict[str, tuple[int, ...]] = {"horizontal": (3,), "vertical": (2,), "both": (2, 3)}


def tta_flips(setting: bool | Sequence[str]) -> tuple[str, ...]:
    """The flips of a config's mode.tta: true is every flip (nnU-Net's mirroring), false none."""
    if isinstance(setting, bool):
        return tuple(FLIPS) if setting else ()
    return tuple(setting)


@dataclass
class Predictor:
    """The model in eval mode on its device, with what its checkpoint says about classes and input size."""

    model: nn.Module
    device: torch.device
    input_size: tuple[int, int]  # (width, height) the model was trained at
    class_titles: list[str]  # by model index
    out_classes: list[dict]  # {"title", "shape", "color", ...} as config.json lists them
    tta: tuple[str, ...] = ()  # FLIPS names whose flipped-back predictions are averaged in; () = one pass

    @property
    def num_classes(self) -> int:
        return len(self.class_titles)

    def color_of(self, title: str) -> str:
        return next((c["color"] for c in self.out_classes if c.get("title") == title), "#FF0000")

    def probabilities(self, crops: Sequence[np.ndarray], size: tuple[int, int] | None = None) -> torch.Tensor:
        """Softmax probabilities (N, C, h, w) of RGB uint8 crops, on the model's device.

        Each crop is resized to the input size as in training; the output is resized back (bilinear,
        which keeps probabilities in [0, 1] and summing to 1) to `size` = (height, width), by default
        the size of the first crop, so all crops of one call must share their size. With `tta`, the mean
        over the plain pass and each flip (flipped back) is returned, so every mode gets the same TTA.
        """
        width, height = self.input_size
        batch = torch.stack([normalize(resize_image(crop, width, height)) for crop in crops]).to(self.device)
        with torch.inference_mode():
            probs = torch.softmax(self.model(batch).float(), dim=1)
            # One pass per flip rather than one 4x batch: sliding_window's batch_size bounds the memory.
            for name in self.tta:
                dims = FLIPS[name]
                probs += torch.softmax(self.model(batch.flip(dims)).float(), dim=1).flip(dims)
            probs /= 1 + len(self.tta)
            out_size = size if size is not None else crops[0].shape[:2]
            if tuple(out_size) != (height, width):
                probs = F.interpolate(probs, size=tuple(out_size), mode="bilinear", align_corners=False)
        return probs


def load_predictor(model_dir: Path, gpu_device: int, tta: tuple[str, ...] = ()) -> Predictor:
    """The model in model/, checked against its config.json; TaskError naming the file at fault."""
    config_path, weights_path = model_dir / CONFIG_NAME, model_dir / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise TaskError(
                "the model is missing: inference needs model/config.json and model/model.pt from a train checkpoint",
                where=path,
            )
    config = read_json(config_path)
    mapping = config.get("class_title_to_idx")
    if not isinstance(mapping, dict) or not mapping or not all(isinstance(i, int) for i in mapping.values()):
        raise TaskError("class_title_to_idx is missing or is not a mapping of class titles to indices", where=config_path)
    try:
        size = config["settings"]["input_size"]
        input_size = (int(size["width"]), int(size["height"]))
    except (KeyError, TypeError, ValueError):
        raise TaskError("settings.input_size {width, height} is missing", where=config_path) from None

    num_classes = max(mapping.values()) + 1
    state = load_state_dict(weights_path)
    head = next((t for k, t in state.items() if k.endswith("last_conv.weight")), None)
    if head is not None and head.shape[0] != num_classes:
        raise TaskError(
            f"config.json maps {num_classes} classes ({', '.join(sorted(mapping))}) but model.pt predicts "
            f"{head.shape[0]}: the two files come from different models",
            where=model_dir,
        )
    model = build_model(num_classes)
    load_continue(model, state, where=weights_path)
    device = plan_devices([gpu_device]).device
    model.to(device).eval()

    titles = titles_by_index(mapping)
    log.info(
        f"model loaded: {num_classes} classes ({', '.join(titles)}), input {input_size[0]}x{input_size[1]}",
        extra={"classes": titles},
    )
    return Predictor(model, device, input_size, titles, list(config.get("out_classes") or []), tta)
