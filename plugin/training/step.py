"""One optimisation step that never waits for the device.

Forward under the run's autocast, the loss in float32, backward (scaled for float16), then the
update: applied only when the loss and every gradient are finite on every rank, a choice the fused
optimizer makes on the device from `found_inf`, the tensor GradScaler passes it too. BatchNorm
statistics of a skipped step are put back the same way (guard.keep_buffers_if). What the host needs
to know (the loss, whether the step was skipped) stays on the device until the train window closes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from plugin.config.typed import TrainConfig
from plugin.format.classes import NEUTRAL_INDEX
from plugin.nn.losses import segmentation_loss
from plugin.nn.precision import Precision
from plugin.training.guard import keep_buffers_if, nonfinite_flags
from plugin.training.schedule import set_lr

log = logging.getLogger(__name__)


def loss_fn(config: TrainConfig, num_classes: int, class_weights: list[float] | None = None):
    """(logits, target) -> the configured loss, neutral ignored, with the resolved class weights."""
    per_class = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)

    def compute(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return segmentation_loss(
            logits, target, num_classes, NEUTRAL_INDEX, config.bce_weight, config.dice_weight, per_class
        )

    return compute


@dataclass(frozen=True)
class StepResult:
    loss: torch.Tensor  # this rank's loss, float32 scalar on the device
    logits: torch.Tensor  # (N, C, H, W) float32, for the train confusion matrix
    skipped: torch.Tensor  # bool scalar: the update was left out (a loss or gradient not finite on some rank)
    diverged: torch.Tensor  # bool scalar: counts toward max_nonfinite_steps


def train_step(
    net: nn.Module,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    precision: Precision,
    compute_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    targets: torch.Tensor,
    lr: float,
    committed: list[torch.Tensor],
) -> StepResult:
    """One step of `net` (the model, wrapped for DDP or compiled) on a batch already on the device;
    `committed` are the buffers of the last completed step. The optimizer must take `found_inf`
    (a fused Adam or AdamW)."""
    logits = precision.logits(net, images)
    loss = compute_loss(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    flags = nonfinite_flags(loss, model)
    skipped = flags.sum() > 0
    set_lr(optimizer, lr)
    optimizer.found_inf = skipped.float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    if scaler is not None:
        # Overflowing gradients with a finite loss are how the scaler finds its scale, not divergence.
        scaler.update()
    keep_buffers_if(model, committed, skipped)
    return StepResult(loss.detach(), logits.detach(), skipped, flags[0] > 0 if scaler is not None else skipped)


def log_precision(config: TrainConfig, precision: Precision, val_precision: Precision) -> None:
    """One line saying how the network trains and validates: autocast dtype, scaler, layout and compilation."""
    details = [f"{precision.name} autocast" if precision.dtype is not None else "float32"]
    if precision.scales_gradients:
        details.append("a gradient scaler")
    if precision.channels_last:
        details.append("channels_last")
    if config.compile:
        details.append("torch.compile")
    validates = "" if val_precision == precision else f", validates in {val_precision.name} (as inference)"
    log.info(f"amp {config.amp}: the network trains in {', '.join(details)}{validates}; losses and metrics in float32",
             extra={"amp": config.amp, "precision": precision.name, "val_precision": val_precision.name})
