"""When to validate, and how the optimizer and its learning rate are set up and moved during a run.

The learning rate of step s (0-based, counted over epochs * iters_per_epoch) is
`LrSchedule.lr_at(s) * LrPolicy.scale`: a linear warmup, then a per-iteration decay (poly or cosine),
or no decay for "plateau", whose divisions come from LrPolicy at the validations (the legacy rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from plugin.settings import TrainConfig

# nnU-Net's exponent: lr * (1 - progress) ** 0.9.
POLY_POWER = 0.9


@dataclass
class EvalPlanner:
    """When to validate: every `val_every` epochs (fractional allowed), and always after the last iteration.

    The legacy count `floor(epoch / val_every + 1e-9)` is kept so checkpoints land where legacy users
    expect them; unlike the legacy trainer, the final iteration always validates, so every run ends
    with a checkpoint even when epochs / val_every is not whole or val_every > epochs.
    """

    val_every: float
    iters_per_epoch: int
    epochs: int
    done: int = 0

    def due(self, epoch: int, iteration: int) -> bool:
        """Whether to validate after `iteration` (0-based) of `epoch` (0-based)."""
        progress = epoch + (iteration + 1) / self.iters_per_epoch
        count = math.floor(progress / self.val_every + 1e-9)
        last = epoch == self.epochs - 1 and iteration == self.iters_per_epoch - 1
        if count > self.done or last:
            self.done = max(count, self.done + 1)
            return True
        return False


@dataclass
class LrPolicy:
    """The plateau rule: divide the LR by `divisor` after `patience` validations without a new best loss.

    `scale` is the product of the divisions so far, applied on top of LrSchedule; unlike the legacy
    trainer, the optimizer is kept (its moments survive the LR drop).
    """

    patience: int
    divisor: float
    losses: list[float] = field(default_factory=list)
    last_reset: int = 0
    scale: float = 1.0

    def step(self, val_loss: float) -> bool:
        """Record a validation loss; returns True when the LR was lowered."""
        self.losses.append(val_loss)
        waited = len(self.losses) - self.last_reset
        if waited <= self.patience or min(self.losses[-self.patience :]) <= min(self.losses):
            return False
        self.scale /= self.divisor
        self.last_reset = len(self.losses)
        return True


@dataclass(frozen=True)
class LrSchedule:
    """Per-iteration LR: linear warmup to `base_lr` over `warmup_steps`, then the decay of `name`.

    poly: base_lr * (1 - t) ** 0.9 and cosine: base_lr * (1 + cos(pi t)) / 2, t going from 0 at the
    first step after warmup to (n - 1) / n at the last of the n remaining steps, so the last step
    still learns a little; plateau: base_lr throughout (LrPolicy lowers it).
    """

    name: str
    base_lr: float
    total_steps: int
    warmup_steps: int

    def lr_at(self, step: int) -> float:
        """The LR of optimizer step `step` (0-based over the whole run)."""
        if step < self.warmup_steps:
            # (step + 1): the first step already moves the weights, at base_lr / warmup_steps.
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.name == "plateau":
            return self.base_lr
        t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        if self.name == "poly":
            return self.base_lr * (1.0 - t) ** POLY_POWER
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_schedule(config: TrainConfig, iters_per_epoch: int) -> LrSchedule:
    """The config's schedule for a run of config.epochs * iters_per_epoch steps."""
    total = config.epochs * iters_per_epoch
    warmup = min(total, round(config.warmup_epochs * iters_per_epoch))
    return LrSchedule(config.lr_schedule, config.lr, total, warmup)


def plateau_policy(config: TrainConfig) -> LrPolicy | None:
    """The lr_decreasing rule when the schedule is "plateau", else None."""
    if config.lr_schedule != "plateau":
        return None
    return LrPolicy(config.plateau_patience, config.plateau_divisor)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam or AdamW at config.lr, with weight decay on the conv weights only.

    Biases and BatchNorm scales/shifts (the 1-d parameters) are not decayed: shrinking them toward 0
    regularises nothing and only fights the normalisation.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=config.lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
