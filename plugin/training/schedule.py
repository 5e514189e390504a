"""When to validate and when to end, and how the optimizer and its learning rate are set up and moved during a run.

The learning rate of step s (0-based, counted over epochs * iters_per_epoch) is
`LrSchedule.lr_at(s) * LrPolicy.scale`: a linear warmup, then a per-iteration decay (poly or cosine),
or no decay for "plateau", whose divisions come from LrPolicy at the validations (the legacy rule).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from plugin.config.typed import EarlyStoppingRule, TrainConfig
from plugin.errors import TaskError
from plugin.nn.metrics import summarize

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

    def due(self, epoch: int, batch_index: int) -> bool:
        """Whether to validate after batch `batch_index` of `epoch` (both 0-based); `mark` records that it was done.

        Kept apart so that a validation cut short by a stop signal is still due when the run resumes.
        """
        last = epoch == self.epochs - 1 and batch_index == self.iters_per_epoch - 1
        return self._count(epoch, batch_index) > self.done or last

    def mark(self, epoch: int, batch_index: int) -> None:
        """Record a validation after batch `batch_index` of `epoch`."""
        self.done = max(self._count(epoch, batch_index), self.done + 1)

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.done = state["done"]

    def _count(self, epoch: int, batch_index: int) -> int:
        progress = epoch + (batch_index + 1) / self.iters_per_epoch
        return math.floor(progress / self.val_every + 1e-9)


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

    def state_dict(self) -> dict:
        # patience and divisor come from the config, which the resume fingerprint holds equal.
        return {"losses": list(self.losses), "last_reset": self.last_reset, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.losses, self.last_reset, self.scale = list(state["losses"]), state["last_reset"], state["scale"]


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

    def lr_at(self, step: int, budget_used: float = 0.0) -> float:
        """The LR of optimizer step `step` (0-based over the whole run).

        `budget_used` is the share of time_budget_minutes spent: when it is ahead of the share of the
        steps, the decay follows it, so a run that the budget ends early still ends at a low LR.
        """
        if step < self.warmup_steps:
            # (step + 1): the first step already moves the weights, at base_lr / warmup_steps.
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.name == "plateau":
            return self.base_lr
        t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        t = min(max(t, budget_used), 1.0)
        if self.name == "poly":
            return self.base_lr * (1.0 - t) ** POLY_POWER
        return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass
class EarlyStopping:
    """`rule.patience` validations in a row without a better `rule.metric` end the run."""

    rule: EarlyStoppingRule
    best: float | None = None
    waited: int = 0

    def step(self, metrics: dict[str, float]) -> bool:
        """Record a validation's metrics; True when the run should end."""
        value = metrics.get(self.rule.metric)
        if value is None or not math.isfinite(value):
            self.waited += 1
        elif self.best is None or (value < self.best if self.rule.lower_is_better else value > self.best):
            self.best, self.waited = value, 0
        else:
            self.waited += 1
        return self.waited >= self.rule.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "waited": self.waited}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.waited = state["best"], state["waited"]


def check_metric(metric: str, titles: list[str]) -> None:
    """early_stopping.metric must be a val metric of this model's classes."""
    names = ["loss", *summarize(torch.zeros(len(titles), len(titles), dtype=torch.int64), titles)]
    if metric not in names:
        raise TaskError(f"{metric!r} is not a val metric of this model; use one of {', '.join(names)}",
                        where="early_stopping.metric")


@dataclass
class TimeBudget:
    """time_budget_minutes: training seconds spent over every part of a resumed run, and how many more
    iterations (and the validation that must follow them) still fit.

    The ranks of a run decide from shared figures (the slowest rank's clock at the last METRICS line,
    log_interval.py) rather than their own clocks, so that they stop at the same iteration and follow the
    same learning-rate curve.
    """

    seconds: float | None  # None: no budget, the clock only counts
    spent_before: float = 0.0  # by the earlier parts of a resumed run
    started: float = field(default_factory=time.monotonic)

    def spent(self) -> float:
        """This process's training seconds so far."""
        return self.spent_before + time.monotonic() - self.started

    def state_dict(self) -> dict:
        return {"spent": self.spent()}

    def load_state_dict(self, state: dict) -> None:
        self.spent_before = state["spent"]

    def share(self, spent_s: float) -> float:
        """The share of the budget that `spent_s` seconds are (0 without a budget)."""
        return 0.0 if self.seconds is None else spent_s / self.seconds

    def iterations_left(self, spent_s: float, step_s: float, final_s: float) -> int | None:
        """Iterations of `step_s` seconds that still fit after `spent_s`, keeping `final_s` for the
        last validation; None without a budget."""
        if self.seconds is None:
            return None
        room = self.seconds - spent_s - final_s
        return max(0, math.floor(room / step_s)) if step_s > 0 else (0 if room < 0 else 2**31)


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


def create_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
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
    # Fused: one kernel per step, no host sync (the foreach path reads each step count back), and the
    # update is skipped on the device when train_step passes found_inf.
    return optimizer_class(groups, lr=config.lr, fused=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
