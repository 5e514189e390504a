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
    scaler in training when the dtype is float16, and channels_last tensors on CUDA."""

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


def resolve_precision(amp: str, device: torch.device, where: str = "amp") -> Precision:
    """The Precision of an `amp` setting on `device`; TaskError naming `where` for a dtype the device lacks."""
    if amp not in AMP_SETTINGS:
        raise TaskError(f"{amp!r} is not one of {', '.join(AMP_SETTINGS)}", where=where)
    cuda = device.type == "cuda"
    if amp == "auto":
        if not cuda:
            dtype = None  # CPU autocast is slower than float32 for convolutions on most CPUs
        else:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif amp == "off":
        dtype = None
    else:
        dtype = _DTYPES[amp]
        if cuda and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise TaskError(
                f"{torch.cuda.get_device_name(device)} does not support bfloat16; use fp16 or auto", where=where
            )
    return Precision(device.type, dtype, channels_last=cuda)


def prepare_model(model: nn.Module, precision: Precision) -> nn.Module:
    """The model in the precision's memory layout; on CUDA also lets cuDNN pick its fastest kernels,
    since the input size is fixed for a whole run."""
    if precision.device_type == "cuda":
        torch.backends.cudnn.benchmark = True
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
