"""What keeps a training step whole: a step is applied only when its loss and gradient are finite,
and an abandoned or skipped step leaves no trace.

A forward in train mode moves the BatchNorm statistics before the step is known to be good, so the
loop keeps the buffers of the last completed step (`snapshot_buffers`) and puts them back when a
step is skipped or cut short by a stop signal. Whether a step is skipped is decided on the device
(`nonfinite_flags`, `keep_buffers_if`) and read by the host only when the train window closes
(window.py), where NonFiniteSteps counts the skipped steps in their order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from plugin.errors import TaskError
from plugin.training import distributed

log = logging.getLogger(__name__)


def nonfinite_flags(loss: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """float32 (2,) on the device: [the loss is not finite, a gradient is not finite], each counted over
    the ranks (DDP's gradients are already the same everywhere; a rank's loss is its own)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=loss.device)
    flags = torch.stack([~torch.isfinite(loss.detach()), ~torch.isfinite(norm.to(loss.device))]).float()
    return distributed.all_reduce_sum(flags)


def snapshot_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def restore_buffers(model: nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(model.buffers(), saved):
            buffer.copy_(value)


def keep_buffers_if(model: nn.Module, saved: list[torch.Tensor], skipped: torch.Tensor) -> None:
    """restore_buffers where `skipped` (a bool scalar on the device) is true, decided on the device."""
    with torch.no_grad():
        for buffer, value in zip(model.buffers(), saved):
            buffer.copy_(torch.where(skipped, value, buffer))


@dataclass
class NonFiniteSteps:
    """Counts non-finite steps in a row; more than `limit` (max_nonfinite_steps) end the run."""

    limit: int
    base_lr: float
    in_row: int = 0

    def account(self, steps: Sequence[tuple[int, float]], diverged: Sequence[bool], total: int, warn: bool) -> None:
        """Record, in order, a log interval's steps (1-based iteration, lr) and whether each one diverged."""
        for (iteration, lr), bad in zip(steps, diverged):
            if bad:
                self.skip(iteration, total, lr, warn)
            else:
                self.in_row = 0

    def state_dict(self, unaccounted: Sequence[bool] = ()) -> dict:
        """The count, with the steps of the open log interval (`unaccounted`, whether each diverged)
        counted in, without warning or raising."""
        in_row = self.in_row
        for bad in unaccounted:
            in_row = in_row + 1 if bad else 0
        return {"in_row": in_row}

    def load_state_dict(self, state: dict) -> None:
        self.in_row = state["in_row"]

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
                extra={"skipped_iteration": iteration, "lr": lr, "nonfinite_in_row": self.in_row},
            )
