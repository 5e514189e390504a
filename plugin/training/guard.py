"""What keeps a training step whole: a step is applied only when its loss and gradient are finite,
and an abandoned or skipped step leaves no trace.

A forward in train mode moves the BatchNorm statistics before the step is known to be good, so the
loop keeps the buffers of the last completed step (`snapshot_buffers`) and puts them back when a
step is skipped or cut short by a stop signal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from plugin.errors import TaskError

log = logging.getLogger(__name__)


def finite_step(mean_loss: torch.Tensor, model: nn.Module) -> bool:
    """Whether the loss and every gradient are finite (one host sync; under DDP the same on every rank,
    whose loss and gradients are all-reduced)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=mean_loss.device)
    return bool(torch.isfinite(mean_loss + norm.to(mean_loss.device)))


def snapshot_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def restore_buffers(model: nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(model.buffers(), saved):
            buffer.copy_(value)


@dataclass
class NonFiniteSteps:
    """Counts non-finite steps in a row; more than `limit` (max_nonfinite_steps) end the run."""

    limit: int
    base_lr: float
    in_row: int = 0

    def skip(self, iteration: int, total: int, lr: float, warn: bool) -> None:
        """Record that step `iteration` (1-based) of `total` at `lr` is left out; raises past the limit."""
        self.in_row += 1
        if self.in_row > self.limit:
            raise TaskError(
                f"the loss or gradient was not finite in {self.in_row} iterations in a row (the last: iteration "
                f"{iteration} of {total}, lr {lr:.3g}): training diverged. Lower lr (try {self.base_lr / 10:g}), "
                "or check the images and annotations of the train split",
                where="lr",
            )
        if warn:
            log.warning(
                f"iteration {iteration}: the loss or gradient is not finite (lr {lr:.3g}); the step is skipped "
                f"({self.in_row} in a row of max_nonfinite_steps {self.limit})",
                extra={"iteration": iteration, "lr": lr},
            )
