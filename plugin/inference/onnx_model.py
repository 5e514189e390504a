"""The exported network (model.onnx) as a Network run by onnxruntime, and the metadata it carries.

The file's metadata_props record what a consumer needs without our code: the classes by output
channel, the input size and training scale, and the normalisation. Loading checks them against the
model folder's config.json, so that a file exported from another model never runs silently.
onnxruntime is an optional dependency (the `export` extra): it is imported only here, when asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from plugin.errors import TaskError, require_extra
from plugin.inference.model_dir import ModelConfig, class_color
from plugin.nn.network import INPUT_NORMALIZATION, network_record, size_divisor
from plugin.nn.preprocess import PAD_COLOR

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
# Bumped when a key changes meaning, so that a consumer can refuse a file it does not understand.
METADATA_VERSION = "1"
# The keys whose values must match config.json (and this code's preprocessing) for the file to be run.
# A file exported before networks could be chosen has no "network" key: it is a UNet v2, as its
# config.json says when it has no record either.
CHECKED_KEYS = ("classes", "input_size", "scale", "normalization")


def model_metadata(config: ModelConfig) -> dict[str, str]:
    """metadata_props of the file exported from a model with `config`: JSON values by key."""
    classes = [{"index": i, "title": t, "color": class_color(config.out_classes, t)}
               for i, t in enumerate(config.class_titles)]
    values: dict[str, Any] = {
        "sly_unet_metadata_version": METADATA_VERSION,
        "classes": classes,
        "input_size": {"width": config.input_size[0], "height": config.input_size[1]},
        "scale": {"mode": config.scale.mode, "factor": config.scale.factor},
        "normalization": {
            "channels": "RGB",
            "layout": "NCHW",
            "formula": "(pixel / 255 - mean) / std",
            **INPUT_NORMALIZATION,
        },
        "size_divisor": size_divisor(config.network),
        "network": network_record(config.network),
        "pad_color": list(PAD_COLOR),
    }
    return {key: json.dumps(value) for key, value in values.items()}


@dataclass(frozen=True)
class OnnxNetwork:
    """model.onnx as a Network: float32 inputs in, its softmax probabilities out, on the batch's device."""

    session: Any  # onnxruntime.InferenceSession
    path: Path

    @property
    def name(self) -> str:
        return f"onnxruntime, {self.session.get_providers()[0]}, float32"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        # Flipped (TTA) batches are strided views; onnxruntime reads contiguous buffers.
        inputs = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        (probs,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: inputs})
        return torch.from_numpy(probs).to(batch.device)


def load_onnx_network(path: Path, config: ModelConfig, gpu_device: int | None) -> OnnxNetwork:
    """An onnxruntime session of `path`, checked against `config`; on CUDA device `gpu_device` where
    onnxruntime has the CUDA provider, else (and for None) on the CPU. TaskError naming the file at fault."""
    if not path.is_file():
        raise TaskError(
            f"backend onnxruntime runs the exported {path.name}, which this model folder lacks: run "
            f"`sly-unet export --model {path.parent}` first (it writes {path.name} beside model.pt)",
            where=path,
        )
    require_extra("export", ("onnxruntime",), where="model.backend")
    import onnxruntime

    providers: list = ["CPUExecutionProvider"]
    if gpu_device is not None and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": gpu_device}))
    try:
        session = onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TaskError(f"not a readable ONNX model ({first}); export it again with `sly-unet export`",
                        where=path) from exc
    check_metadata(session, config, path)
    return OnnxNetwork(session, path)


def check_metadata(session: Any, config: ModelConfig, path: Path) -> None:
    """TaskError unless the session's graph and metadata are those of a model with `config`."""
    found = session.get_modelmeta().custom_metadata_map
    missing = [key for key in CHECKED_KEYS if key not in found]
    if missing:
        raise TaskError(f"the file has no sly-unet metadata ({', '.join(missing)} missing): it was not written by "
                        "`sly-unet export`; export the model with it", where=path)
    expected = model_metadata(config)
    differ = []
    for key in CHECKED_KEYS:
        ours, theirs = json.loads(expected[key]), _parse(found[key], key, path)
        if key == "classes" and isinstance(theirs, list):
            # The colours only paint the output; the titles by index decide what each channel means.
            ours = [c["title"] for c in ours]
            theirs = [c.get("title") if isinstance(c, dict) else c for c in theirs]
        if ours != theirs:
            differ.append(f"{key} {json.dumps(theirs)} in {path.name}, {json.dumps(ours)} in config.json")
    (image,), (probs,) = session.get_inputs(), session.get_outputs()
    if (image.name, probs.name) != (INPUT_NAME, OUTPUT_NAME) or len(probs.shape) != 4:
        differ.append(f"the graph maps {image.name!r} to {probs.name!r} {probs.shape}, not {INPUT_NAME!r} "
                      f"(N, 3, H, W) to {OUTPUT_NAME!r} (N, classes, H, W)")
    elif probs.shape[1] != config.num_classes:
        differ.append(f"the graph outputs {probs.shape[1]} classes, config.json has {config.num_classes}")
    if differ:
        raise TaskError(f"{path.name} and config.json come from different models: {'; '.join(differ)}; "
                        f"export {path.name} again from this folder with `sly-unet export`", where=path)


def _parse(text: str, key: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise TaskError(f"metadata {key!r} is not JSON: {text[:80]!r}", where=path) from None
