"""Numeric precision and memory layout of a run: the `amp` setting -> autocast dtype and gradient scaler.

Training and inference resolve `amp` here, so a model runs under the same autocast in both. Only the
network's forward (and its backward) runs under autocast: losses, probabilities and metrics are
computed from float32 logits, whatever the setting.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from plugin.errors import TaskError

log = logging.getLogger(__name__)

AMP_SETTINGS = ("auto", "bf16", "fp16", "off")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How the network runs on `device_type`: autocast to `dtype` (None: float32), with a gradient
    scaler in training when the dtype is float16, and channels_last tensors where the kernels favour them."""

    device_type: str
    dtype: torch.dtype | None
    channels_last: bool

    @property
    def name(self) -> str:
        return {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.dtype]

    @property
    def scales_gradients(self) -> bool:
        # float16 has 5 exponent bits: small gradients underflow unless the loss is scaled; bfloat16
        # has float32's range and needs no scaler.
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.scales_gradients else None

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        """A (N, C, H, W) batch in the layout the model expects."""
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    def logits(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """float32 logits of `model` on a (N, C, H, W) batch: only the forward runs in this layout and
        under this autocast, so what follows (loss, softmax, metrics) is computed in float32."""
        with self.autocast():
            logits = model(self.inputs(batch))
        return logits.float()


# Where no `amp` setting applies (a Predictor built by hand, a tool): float32 in the default layout.
FLOAT32 = Precision("cpu", None, channels_last=False)


def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU has AMX tiles, on which oneDNN runs bfloat16 convolutions several times faster
    than float32 (2.4x for a training step of the default network on a 2-core Xeon); elsewhere CPU
    autocast is slower than float32. torch asks the CPU through a private helper: without it, no."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


def resolve_precision(amp: str, device: torch.device, where: str = "amp", training: bool = False) -> Precision:
    """The Precision of an `amp` setting on `device`, for training or (the default) for inference and
    validation; TaskError naming `where` for a dtype the device lacks.

    `auto` on the CPU trains in bfloat16 where the CPU has bfloat16 matrix units and predicts in
    float32 everywhere: training time is where the speed pays, and predictions stay exactly those of
    an exported ONNX model. Validation uses the inference precision, so it scores what inference writes.
    """
    if amp not in AMP_SETTINGS:
        raise TaskError(f"{amp!r} is not one of {', '.join(AMP_SETTINGS)}", where=where)
    cuda = device.type == "cuda"
    if amp == "auto":
        if cuda:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.bfloat16 if training and cpu_has_bf16_matrix_units() else None
    elif amp == "off":
        dtype = None
    else:
        dtype = _DTYPES[amp]
        if cuda and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise TaskError(
                f"{torch.cuda.get_device_name(device)} does not support bfloat16; use fp16 or auto", where=where
            )
    # oneDNN's CPU convolutions run on blocked NHWC data: channels_last saves a reorder per layer
    # (1.8x for a float32 training step of the default network here), as it does for cuDNN.
    return Precision(device.type, dtype, channels_last=cuda or torch.backends.mkldnn.is_available())


def prepare_model(model: nn.Module, precision: Precision) -> nn.Module:
    """The model in the precision's memory layout; on CUDA also lets cuDNN pick its fastest kernels,
    since the input size is fixed for a whole run."""
    if precision.device_type == "cuda":
        torch.backends.cudnn.benchmark = True
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
