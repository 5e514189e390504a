"""The train figures between two METRICS lines, summed on the device and read back once per interval.

Each step adds its loss, confusion matrix and step flags on the device; nothing reaches the host
until the interval closes: then two all-reduces (sums, and the slowest rank's clock) and one copy.

How many iterations the next interval runs is planned at each close from figures every rank shares
(the slowest rank's seconds per iteration and seconds spent), so the ranks close their intervals, and
end a time budget, at the same iteration without talking in between.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from plugin.format.classes import NEUTRAL_INDEX
from plugin.nn.metrics import confusion_matrix
from plugin.training import distributed
from plugin.training.step import StepResult


@dataclass(frozen=True)
class IntervalReport:
    loss: float | None  # mean over the interval's finite losses of every rank; None when none was finite
    cm: torch.Tensor  # (C, C) int64 on the CPU, summed over the ranks
    steps: list[tuple[int, float]]  # (1-based iteration, lr) of each step
    diverged: list[bool]  # by step: counts toward max_nonfinite_steps
    step_s: float  # the slowest rank's seconds per iteration over the interval
    spent_s: float  # the most training seconds any rank has spent


class LogInterval:
    """Device-side sums of the steps since the last METRICS line; `planned` is how many steps it takes."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.device = device
        self.planned = 1  # the first line comes after the first step, before any timing is known
        self._start()

    def _start(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_count = torch.zeros((), dtype=torch.float64, device=self.device)
        self.cm = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64, device=self.device)
        self.flags: list[torch.Tensor] = []
        self.steps: list[tuple[int, float]] = []
        self.started = time.monotonic()

    def restart_clock(self) -> None:
        """Leave what happened since the interval started (a validation) out of its seconds per step."""
        self.started = time.monotonic()

    @property
    def size(self) -> int:
        return len(self.steps)

    @property
    def full(self) -> bool:
        return self.size >= self.planned

    def add(self, iteration: int, lr: float, result: StepResult, targets: torch.Tensor) -> None:
        finite = torch.isfinite(result.loss)
        self.loss_sum += torch.where(finite, result.loss.double(), 0.0)
        self.loss_count += finite
        self.cm += confusion_matrix(result.logits.argmax(1), targets, self.num_classes, NEUTRAL_INDEX, check=False)
        self.flags.append(result.diverged)
        self.steps.append((iteration, lr))

    def diverged_so_far(self) -> list[bool]:
        """The open interval's divergence flags, read back here on this rank alone (they agree on every rank)."""
        return torch.stack(self.flags).tolist() if self.flags else []

    def close(self, spent_s: float) -> IntervalReport:
        """The interval's figures over every rank (a collective: every rank closes at the same step);
        `spent_s` is this rank's training seconds so far. Starts the next interval."""
        clock = torch.tensor([(time.monotonic() - self.started) / max(1, self.size), spent_s],
                             dtype=torch.float64, device=self.device)
        sums = torch.cat([self.loss_sum[None], self.loss_count[None], self.cm.flatten().double()])
        distributed.all_reduce_max(clock)
        distributed.all_reduce_sum(sums)
        flags = torch.stack(self.flags).double() if self.flags else sums.new_zeros(0)
        host = torch.cat([clock, sums, flags]).cpu()
        loss_sum, loss_count = host[2].item(), host[3].item()
        report = IntervalReport(
            loss=loss_sum / loss_count if loss_count else None,
            cm=host[4 : 4 + self.num_classes**2].round().long().reshape(self.num_classes, self.num_classes),
            steps=self.steps,
            diverged=[bool(v) for v in host[4 + self.num_classes**2 :].tolist()],
            step_s=host[0].item(),
            spent_s=host[1].item(),
        )
        self._start()
        return report


def iterations_between_lines(step_s: float, seconds: float | None, iterations: int | None) -> int:
    """The next interval's length: log_every's iterations, or as many as fit in its seconds (at least 1)."""
    planned = iterations if iterations is not None else math.inf
    if seconds is not None:
        planned = min(planned, max(1, int(seconds / step_s)) if step_s > 0 else 1)
    return int(min(planned, 2**31))


def headline(metrics: dict[str, float]) -> dict[str, float]:
    # Per-class IoU on one batch is noise; the per-iteration line keeps the figures the agent charts.
    return {k: v for k, v in metrics.items() if "/" not in k}
