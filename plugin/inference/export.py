"""`sly-unet export`: a model folder's network as an ONNX file that outputs class probabilities.

torch's dynamo exporter (torch.export, then onnxscript) traces the network with a dynamic batch and a
dynamic height and width, each its size divisor (16 for UNet v2, 32 for a UNet on an encoder) times a
free integer, so one file serves every input size and batch; the softmax over the classes is part of the graph. The
file's metadata (onnx_model.model_metadata) carries the classes, sizes and normalisation.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from plugin.errors import require_extra
from plugin.inference.model_dir import ONNX_NAME, ModelConfig, load_model, read_model_config
from plugin.inference.onnx_model import INPUT_NAME, OUTPUT_NAME, check_metadata, model_metadata
from plugin.nn.network import size_divisor

log = logging.getLogger(__name__)

# The largest side (in units of the size divisor) and batch the exported shapes admit: far beyond what
# fits in memory, so only the multiple-of-divisor rule binds in practice.
MAX_SIDE_UNITS = 4096
MAX_BATCH = 4096
# The exporter's libraries log each graph optimisation at INFO, and warn that torchvision's detection
# ops are not registered (the UNet uses none) and about their own deprecated internals (FutureWarning):
# none of it is the user's to act on, and it would fill the agent's log.
QUIET_LOGGERS = {
    "onnxscript": logging.WARNING,
    "onnx_ir": logging.WARNING,
    "torch.onnx._internal.exporter._registration": logging.ERROR,
}
# The exported file must reproduce the torch probabilities this closely (float32 round-off only).
TOLERANCE = 1e-4


class _Probabilities(nn.Module):
    """The network followed by the softmax over its classes: what the exported file computes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(image), dim=1)


@dataclass(frozen=True)
class Exported:
    path: Path
    megabytes: float
    max_difference: float  # of the self-check against torch


def default_output(model_dir: Path) -> Path:
    """Where the onnxruntime backend looks for the file."""
    return model_dir / ONNX_NAME


def export_onnx(model_dir: Path, out: Path) -> Exported:
    """Write the network of `model_dir` (config.json + model.pt) to `out` (a file, or a folder to hold
    model.onnx) as ONNX, checked by running it in onnxruntime against torch; TaskError naming the file
    at fault."""
    require_extra("export", ("onnx", "onnxscript", "onnxruntime"), where="export")
    if out.is_dir():
        out = out / ONNX_NAME
    config = read_model_config(model_dir)
    network = _Probabilities(load_model(model_dir, config)).eval()
    divisor = size_divisor(config.network)
    program = _trace(network, divisor)
    proto = program.model_proto
    proto.producer_name = "sly-unet"
    proto.doc_string = (
        f"{config.network.describe()}: {INPUT_NAME} float32 (batch, 3, height, width), RGB normalised as the 'normalization' "
        f"metadata says, height and width multiples of {divisor} -> {OUTPUT_NAME} float32 "
        f"(batch, {config.num_classes}, height, width), softmax over the classes of the 'classes' metadata"
    )
    del proto.metadata_props[:]
    for key, value in model_metadata(config).items():
        proto.metadata_props.add(key=key, value=value)

    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed into place, so that a failed export never leaves a file that looks whole.
    partial = out.with_name(out.name + ".partial")
    try:
        onnx.save_model(proto, str(partial))
        difference = _self_check(partial, network, config, divisor)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    exported = Exported(out, out.stat().st_size / 2**20, difference)
    log.info(
        f"exported {out} ({exported.megabytes:.0f} MB): {INPUT_NAME} (batch, 3, H, W) -> {OUTPUT_NAME} "
        f"(batch, {config.num_classes}, H, W), H and W multiples of {divisor}; onnxruntime matches torch "
        f"within {difference:.1e}",
        extra={"onnx": str(out), "classes": list(config.class_titles), "max_difference": difference},
    )
    return exported


def _trace(network: nn.Module, divisor: int) -> torch.onnx.ONNXProgram:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # Named by what they count: the graph's axes read e.g. "32*height_32", "32*width_32".
    height = torch.export.Dim(f"height_{divisor}", min=1, max=MAX_SIDE_UNITS)
    width = torch.export.Dim(f"width_{divisor}", min=1, max=MAX_SIDE_UNITS)
    # Batch 2 and unequal sides: torch.export would specialise an axis whose example size is 1, or tie
    # two axes of equal size.
    example = torch.randn(2, 3, 2 * divisor, 3 * divisor)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.onnx.export(
            network, (example,), dynamo=True, verbose=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch, 2: divisor * height, 3: divisor * width},),
        )


def _self_check(path: Path, network: nn.Module, config: ModelConfig, divisor: int) -> float:
    """The largest probability difference between the file in onnxruntime and torch, on a batch of
    another size and shape than the traced one; RuntimeError above TOLERANCE."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check_metadata(session, config, path)
    batch = torch.randn(3, 3, 3 * divisor, 2 * divisor, generator=torch.Generator().manual_seed(0))
    (probs,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})
    with torch.inference_mode():
        reference = network(batch).numpy()
    difference = float(np.abs(probs - reference).max())
    if not difference <= TOLERANCE:
        raise RuntimeError(f"the exported graph's probabilities differ from torch's by {difference:.3g} "
                           f"(more than {TOLERANCE:g}): the export is wrong, not written")
    return difference
