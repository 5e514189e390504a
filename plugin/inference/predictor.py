"""A trained model ready to predict: a model folder -> RGB crops in, class probabilities out.

The network is torch's (model.pt) or onnxruntime's (model.onnx, `sly-unet export`); everything else
(resizing, tiling, TTA, sizes back) is the same code for both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from plugin.config.typed import BACKENDS, LEGACY_NETWORK, RESIZE, NetworkSpec, Scale
from plugin.errors import TaskError
from plugin.inference.model_dir import ONNX_NAME, class_color, load_model, read_model_config
from plugin.nn.devices import plan_devices
from plugin.nn.precision import prepare_model, resolve_precision
from plugin.nn.preprocess import normalize, read_resized
from plugin.nn.tiling import (
    Network,
    TorchNetwork,
    crop_probabilities,
    network_inputs,
    network_probabilities,
    predict_tiled,
    resize_probabilities,
)

log = logging.getLogger(__name__)

# Windows per forward when a crop-trained model tiles a whole image or box (full_image, roi, bboxes).
REGION_BATCH = 4


@dataclass
class Predictor:
    """The network on its device, with what its checkpoint says about classes, input size and scale."""

    network: Network  # normalised batch -> probabilities (TorchNetwork or onnx_model.OnnxNetwork)
    device: torch.device  # where the network takes its batches and tiles are blended
    input_size: tuple[int, int]  # (width, height) the model was trained at
    class_titles: list[str]  # by model index
    out_classes: list[dict]  # {"title", "shape", "color", ...} as config.json lists them
    tta: tuple[str, ...] = ()  # FLIPS names whose flipped-back predictions are averaged in; () = one pass
    scale: Scale = RESIZE  # how training presented images; legacy checkpoints: resize
    architecture: NetworkSpec = LEGACY_NETWORK  # what `network` runs, as config.json records it
    presented_scale: tuple[float, float] | None = None  # ModelConfig.presented_scale

    @property
    def num_classes(self) -> int:
        return len(self.class_titles)

    @property
    def training_scale(self) -> tuple[float, float] | None:
        """(x, y) scale at which training presented images: the record, else a crop model's factor; None
        for a resize-trained checkpoint that predates the record."""
        if self.presented_scale is None and self.scale.crops:
            return self.scale.factor, self.scale.factor
        return self.presented_scale

    @property
    def window(self) -> tuple[int, int] | None:
        """(width, height) in image pixels of one network input at the training scale; None where unknown."""
        if self.training_scale is None:
            return None
        (width, height), (x, y) = self.input_size, self.training_scale
        return max(1, round(width / x)), max(1, round(height / y))

    def color_of(self, title: str) -> str:
        return class_color(self.out_classes, title)

    def probabilities(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """Softmax probabilities (N, C, h, w) of same-sized RGB uint8 crops, each resized to the input
        size and back, on the model's device; with `tta`, averaged over the flips."""
        with torch.inference_mode():
            return crop_probabilities(self.network, crops, self.input_size, self.device, self.tta)

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
            win_w, win_h = self.window  # known for every crop-trained model
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
            probs = network_probabilities(self.network, batch, self.tta)
            # One image at a time: an image's output does not depend on what it was batched with.
            sizes = [image.shape[:2] for image in images] if sizes is None else sizes
            return [resize_probabilities(p[None], size)[0] for p, size in zip(probs, sizes)]


def load_predictor(
    model_dir: Path, gpu_device: int | None, tta: tuple[str, ...] = (), amp: str = "auto", backend: str = "torch"
) -> Predictor:
    """The model in model_dir, checked against its config.json: backend "torch" runs model.pt on CUDA
    device `gpu_device` (the CPU for None, or where there is no CUDA) in the `amp` precision (model.amp
    of the inference config), "onnxruntime" runs the exported model.onnx in float32. TaskError naming
    the file or key at fault."""
    if backend not in BACKENDS:
        raise TaskError(f"{backend!r} is not one of {', '.join(BACKENDS)}", where="model.backend")
    config = read_model_config(model_dir)
    if backend == "onnxruntime":
        # Imported here: onnxruntime is an optional extra that torch inference does without.
        from plugin.inference.onnx_model import load_onnx_network

        network: Network = load_onnx_network(model_dir / ONNX_NAME, config, gpu_device)
        # Its outputs come back to host memory whatever the provider: tiles are blended there.
        device = torch.device("cpu")
    else:
        device = torch.device("cpu") if gpu_device is None else plan_devices([gpu_device]).device
        precision = resolve_precision(amp, device, where="model.amp")
        network = TorchNetwork(prepare_model(load_model(model_dir, config).to(device), precision), precision)

    titles = list(config.class_titles)
    log.info(
        f"model loaded: {config.num_classes} classes ({', '.join(titles)}), input {config.input_size[0]}x"
        f"{config.input_size[1]}, {config.network.describe()} trained on {config.scale.describe()}; predicting "
        f"with {network.name}",
        extra={"classes": titles, "scale": {"mode": config.scale.mode, "factor": config.scale.factor},
               "backend": backend, "network": network.name, "architecture": config.network.describe()},
    )
    return Predictor(network, device, config.input_size, titles, list(config.out_classes), tta, config.scale,
                     config.network, config.presented_scale)
