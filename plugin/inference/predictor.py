"""A trained model ready to predict: model/ (config.json + model.pt) -> RGB crops in, class probabilities out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from plugin.errors import TaskError
from plugin.format.classes import titles_by_index
from plugin.jsonfile import read_json
from plugin.nn.devices import plan_devices
from plugin.nn.model import build_model
from plugin.nn.precision import FLOAT32, Precision, prepare_model, resolve_precision
from plugin.nn.preprocess import normalize, read_resized
from plugin.nn.tiling import (
    crop_probabilities,
    network_inputs,
    network_probabilities,
    predict_tiled,
    resize_probabilities,
    training_window,
)
from plugin.settings import RESIZE, Scale
from plugin.nn.weights import CONFIG_NAME, WEIGHTS_NAME, load_continue, load_state_dict

log = logging.getLogger(__name__)

# Windows per forward when a crop-trained model tiles a whole image or box (full_image, roi, bboxes).
REGION_BATCH = 4


@dataclass
class Predictor:
    """The model in eval mode on its device, with what its checkpoint says about classes, input size and scale."""

    model: nn.Module
    device: torch.device
    input_size: tuple[int, int]  # (width, height) the model was trained at
    class_titles: list[str]  # by model index
    out_classes: list[dict]  # {"title", "shape", "color", ...} as config.json lists them
    tta: tuple[str, ...] = ()  # FLIPS names whose flipped-back predictions are averaged in; () = one pass
    scale: Scale = RESIZE  # how training presented images; legacy checkpoints: resize
    precision: Precision = FLOAT32  # the forward's autocast and layout

    @property
    def num_classes(self) -> int:
        return len(self.class_titles)

    @property
    def window(self) -> tuple[int, int]:
        """(width, height) in image pixels of one network input at the training scale (crop models)."""
        return training_window(self.input_size, self.scale.factor)

    def color_of(self, title: str) -> str:
        return next((c["color"] for c in self.out_classes if c.get("title") == title), "#FF0000")

    def probabilities(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """Softmax probabilities (N, C, h, w) of same-sized RGB uint8 crops, each resized to the input
        size and back, on the model's device; with `tta`, averaged over the flips."""
        with torch.inference_mode():
            return crop_probabilities(self.model, crops, self.input_size, self.device, self.tta, self.precision)

    def region(self, image: np.ndarray) -> torch.Tensor:
        """Probabilities (C, H, W) of a whole image or box at the training scale (see `regions`)."""
        return self.regions([image])[0]

    def network_input_of(self, path: Path | bytes) -> torch.Tensor:
        """The (3, h, w) input that `regions` feeds a resize-trained model for a whole image file (or its bytes), on the
        CPU: decoded and resized by read_resized, as training made its samples (a large JPEG decoded
        at reduced size), so that inference sees the very pixels training did."""
        return normalize(read_resized(path, *self.input_size))

    def regions(
        self,
        images: Sequence[np.ndarray | None],
        windows_per_forward: int = REGION_BATCH,
        inputs: Sequence[torch.Tensor] | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
    ) -> list[torch.Tensor]:
        """Probabilities (C, H, W) of whole images or boxes of any sizes, presented at the training scale.

        A resize-trained (or legacy) model sees them all resized to its input size in one forward
        (`inputs`: their network_input_of, made beforehand, with the images' (height, width) `sizes`:
        the images themselves may then be None), and each output is resized back to its image;
        a crop-trained model tiles each image with its training window, `windows_per_forward` at a time.
        """
        if self.scale.crops:
            win_w, win_h = self.window
            return [
                predict_tiled(
                    self.probabilities, image, self.window, (win_w // 2, win_h // 2), windows_per_forward,
                    self.num_classes, self.device,
                )[0]
                for image in images
            ]
        with torch.inference_mode():
            batch = (network_inputs(images, self.input_size) if inputs is None else torch.stack(list(inputs)))
            batch = batch.to(self.device)
            probs = network_probabilities(self.model, batch, self.tta, self.precision)
            # One image at a time: an image's output does not depend on what it was batched with.
            sizes = [image.shape[:2] for image in images] if sizes is None else sizes
            return [resize_probabilities(p[None], size)[0] for p, size in zip(probs, sizes)]


def load_predictor(model_dir: Path, gpu_device: int, tta: tuple[str, ...] = (), amp: str = "auto") -> Predictor:
    """The model in model/, checked against its config.json, on its device in the `amp` precision
    (model.amp of the inference config); TaskError naming the file or key at fault."""
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

    scale = read_scale(config, config_path)
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
    precision = resolve_precision(amp, device, where="model.amp")
    model = prepare_model(model.to(device).eval(), precision)

    titles = titles_by_index(mapping)
    log.info(
        f"model loaded: {num_classes} classes ({', '.join(titles)}), input {input_size[0]}x{input_size[1]}, "
        f"trained on {scale.describe()}; predicting in {precision.name}",
        extra={"classes": titles, "scale": {"mode": scale.mode, "factor": scale.factor}, "precision": precision.name},
    )
    out_classes = list(config.get("out_classes") or [])
    return Predictor(model, device, input_size, titles, out_classes, tta, scale, precision)


def read_scale(config: dict, where: Path) -> Scale:
    """settings.scale of a checkpoint's config.json; a checkpoint without one (legacy) was trained on resized images."""
    record = config["settings"].get("scale")
    if record is None:
        return RESIZE
    try:
        scale = Scale(str(record["mode"]), float(record["factor"]))
    except (KeyError, TypeError, ValueError):
        raise TaskError("settings.scale must be {\"mode\": \"resize\" or \"crop\", \"factor\": number}", where=where) from None
    if scale.mode not in ("resize", "crop") or not scale.factor > 0:
        raise TaskError(f"settings.scale {record!r}: mode must be resize or crop and factor above 0", where=where)
    return scale
