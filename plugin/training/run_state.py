"""Everything of a run that a resume must restore, in one object: each stateful part has its own
state_dict() / load_state_dict() pair, as torch's optimizers do, and RunState captures or restores
them all in one call. state.py writes what state_dict() returns, and reads it back."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from plugin.training.checkpoints import CheckpointWriter
from plugin.training.guard import NonFiniteSteps
from plugin.training.log_interval import LogInterval
from plugin.training.schedule import EarlyStopping, EvalPlanner, LrPolicy, TimeBudget
from plugin.training.state import Position, resumed_position, rng_states, set_rng_states


@dataclass
class RunState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    position: Position
    planner: EvalPlanner
    lr_policy: LrPolicy | None  # the plateau rule, when the schedule is plateau
    stopping: EarlyStopping | None
    budget: TimeBudget
    nonfinite: NonFiniteSteps
    interval: LogInterval  # its steps not yet accounted for count in the non-finite run
    writer: CheckpointWriter | None  # None on the ranks that write nothing
    validated_step: int = -1  # the step after which the last validation ran

    def state_dict(self) -> dict:
        """The run as of its last completed step, on the CPU, for a resume file."""
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": None if self.scaler is None else self.scaler.state_dict(),
            "position": asdict(self.position),
            "planner": self.planner.state_dict(),
            "lr_policy": None if self.lr_policy is None else self.lr_policy.state_dict(),
            "early_stopping": None if self.stopping is None else self.stopping.state_dict(),
            "time_budget": self.budget.state_dict(),
            "nonfinite": self.nonfinite.state_dict(self.interval.diverged_so_far()),
            "validated_step": self.validated_step,
            "checkpoints": None if self.writer is None else self.writer.state_dict(),
            "rng": rng_states(),
        }

    def load_state_dict(self, state: dict, train_loader: DataLoader, iters_per_epoch: int) -> None:
        """Continue from `state`: the position is recounted for this run's process count (and the
        train loader's sampler set to it), every part and random generator restored."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["grad_scaler"] is not None:
            self.scaler.load_state_dict(state["grad_scaler"])
        position = resumed_position(state["position"], train_loader, iters_per_epoch)
        self.position.epoch, self.position.samples, self.position.step = position.epoch, position.samples, position.step
        self.planner.load_state_dict(state["planner"])
        if self.lr_policy is not None and state["lr_policy"] is not None:
            self.lr_policy.load_state_dict(state["lr_policy"])
        if self.stopping is not None and state["early_stopping"] is not None:
            self.stopping.load_state_dict(state["early_stopping"])
        self.budget.load_state_dict(state["time_budget"])
        self.nonfinite.load_state_dict(state["nonfinite"])
        self.validated_step = state["validated_step"]
        if self.writer is not None:
            self.writer.load_state_dict(state["checkpoints"])
        set_rng_states(state["rng"])
