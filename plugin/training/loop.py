"""The training loop: forward, loss, backward, step; validation and a checkpoint when the planner says so.

With several processes every rank runs this loop on its share of each batch under
DistributedDataParallel. The figures that drive the run (train loss, gradient norm, validation
loss and confusion matrix, the time budget's verdict) are summed over the ranks, so every rank
takes the same decisions and rank 0 logs what a single process would; only rank 0 writes files.

A step never waits for the device (step.py): train figures are summed on the device and read back
once per METRICS line (log_interval.py, about every log_every seconds), so a GPU runs ahead of Python.

A run can stop at any moment and go on later as if it had not (state.py): at every checkpoint, and
when a stop signal abandons the step in flight (stop.py), rank 0 writes the resume state as of the
last completed step, and `Loop(..., resume=state).fit()` continues from it, sample for sample.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from plugin import agent_log
from plugin.config.typed import TrainConfig
from plugin.errors import Stopped
from plugin.format.classes import ClassMapping, titles_by_index
from plugin.nn.metrics import logged_metrics
from plugin.nn.precision import prepare_model, resolve_precision
from plugin.training import distributed, stop
from plugin.training.checkpoints import CheckpointWriter, checkpoint_config
from plugin.training.data import batches
from plugin.training.distributed import DistContext
from plugin.training.guard import NonFiniteSteps, restore_buffers, snapshot_buffers
from plugin.training.log_interval import LogInterval, headline, iterations_between_lines
from plugin.training.run_state import RunState
from plugin.training.sampler import EpochSampler
from plugin.training.schedule import (
    EarlyStopping,
    EvalPlanner,
    TimeBudget,
    check_metric,
    create_optimizer,
    lr_schedule,
    plateau_policy,
)
from plugin.training.state import Position, log_resume
from plugin.training.step import log_precision, loss_fn, train_step
from plugin.training.validate import validate

log = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    """What rank 0 wrote; the other ranks write nothing (empty list, no best checkpoint)."""

    checkpoints: list[Path]
    best_checkpoint: Path | None
    best_val_metrics: dict[str, float]
    final_val_metrics: dict[str, float]
    end: str = "epochs"  # or "time_budget", "early_stopping"


class Loop:
    """One run's training: its parts (run_state.RunState), the shared clock that plans the METRICS
    lines and the time budget, and the steps, validations and resume writes that move it on.
    `Loop(...).fit()` runs it.

    The loop: the configured optimizer and LR schedule, train metrics every log_every, validation
    and a checkpoint when the planner says so, until the epochs, the time budget or early stopping end it.

    `writer` and `save_state` (which writes a resume state, returning its size) are None on the
    ranks that write nothing; `val_real` is how many of this rank's val samples are real (the rest
    is padding), all of them when None; `class_weights` (one per class) weight the cross-entropy
    term; `resume` is a resume state of this run to continue from; `on_validated` runs after each
    validation's checkpoint (rank 0 redraws the training curves). The train loader's sampler is an
    EpochSampler. Raises Stopped after a stop signal, once the resume state is written.
    """

    def __init__(
        self,
        model: nn.Module,
        loaders: dict[str, DataLoader],
        config: TrainConfig,
        mapping: ClassMapping,
        device: torch.device,
        writer: CheckpointWriter | None,
        ctx: DistContext = distributed.SINGLE,
        val_real: int | None = None,
        class_weights: list[float] | None = None,
        resume: dict | None = None,
        save_state: Callable[[dict], int] | None = None,
        on_validated: Callable[[], None] | None = None,
    ) -> None:
        self.config, self.mapping, self.device, self.ctx = config, mapping, device, ctx
        self.loaders, self.writer, self.val_real = loaders, writer, val_real
        self.save_state, self.on_validated = save_state, on_validated
        self.precision = resolve_precision(config.amp, device, training=True)
        self.val_precision = resolve_precision(config.amp, device)
        self.model = prepare_model(model.to(device), self.precision)
        net = distributed.wrap_model(self.model, device, ctx, config.sync_batchnorm)
        self.net = torch.compile(net) if config.compile else net
        self.compute_loss = loss_fn(config, mapping.num_classes, class_weights)
        self.titles = titles_by_index(mapping.title_to_idx)
        self.sampler: EpochSampler = loaders["train"].sampler
        self.sampler.set_position(0)
        self.iters = len(loaders["train"])
        self.total = config.epochs * self.iters
        self.schedule = lr_schedule(config, self.iters)
        stopping = EarlyStopping(config.early_stopping) if config.early_stopping is not None else None
        if stopping is not None:
            check_metric(stopping.rule.metric, self.titles)
        self.run = RunState(
            self.model, create_optimizer(self.model, config), self.precision.grad_scaler(), Position(),
            EvalPlanner(config.val_every, self.iters, config.epochs), plateau_policy(config), stopping,
            TimeBudget(config.time_budget_s), NonFiniteSteps(config.max_nonfinite_steps, config.lr),
            LogInterval(mapping.num_classes, device), writer,
        )
        if resume is not None:
            self.run.load_state_dict(resume, loaders["train"], self.iters)
        self.position, self.interval, self.budget = self.run.position, self.run.interval, self.run.budget
        if ctx.is_main:
            log.info(
                f"optimizer {config.optimizer} (weight decay {config.weight_decay:g}), "
                f"lr {config.lr:g} with the {self.schedule.name} schedule after {self.schedule.warmup_steps} "
                f"warmup iterations of {self.schedule.total_steps}",
                extra={"optimizer": config.raw["optimizer"], "lr_schedule": config.raw["lr_schedule"],
                       "warmup_iterations": self.schedule.warmup_steps, "iterations": self.schedule.total_steps},
            )
            log_precision(config, self.precision, self.val_precision)
            if resume is not None:
                log_resume(resume, self.position, self.sampler.size)
        self.ckpt_config = checkpoint_config(config.raw, mapping)
        self.eval_batchnorm = config.validate_with_model_eval
        if not self.eval_batchnorm and config.scale.crops and ctx.world_size > 1:
            # Ranks tile val images of different sizes into different numbers of forwards; in train mode
            # SyncBatchNorm would wait for forwards that other ranks never make.
            self.eval_batchnorm = True
            if ctx.is_main:
                log.warning("validate_with_model_eval false is ignored: tiled validation of crop training "
                            "with several processes needs BatchNorm in eval mode")
        self.progress = agent_log.Progress("Model training: ", self.total)
        self.progress.tick(self.position.step)
        self.saved: list[Path] = []
        self.val_metrics: dict[str, float] = {}
        # Buffers (BatchNorm statistics) as of the last completed step: a forward changes them before the
        # step is complete, so an abandoned or skipped step puts them back.
        self.committed = snapshot_buffers(self.model)
        self.last_saved_step = self.position.step if resume is not None else -1
        # The ranks' shared clock as of the last METRICS line: training seconds spent and seconds per
        # iteration (log_interval.py); val_s is the last validation with its writes.
        self.clock_spent, self.clock_step_s, self.val_s = self.budget.spent_before, 0.0, 0.0
        self.first_step = self.position.step
        self.interval.planned = self.plan_interval()

    def fit(self) -> TrainSummary:
        """Train until the epochs, the time budget or early stopping end the run."""
        remove_hooks = stop.watch(self.model) if not self.config.compile else _no_hooks
        try:
            end = self.validate_if_cut_short()
            while end is None and self.position.epoch < self.config.epochs:
                end = self.train_epoch()
            if end == "time_budget":
                self.end_on_time_budget()
        except BaseException as error:
            signum = stop.requested()
            if signum is None:
                raise
            self.abandon_step(signum)
            stopped = error if isinstance(error, Stopped) else Stopped(signum)
            stopped.logged = True
            raise stopped from None
        finally:
            remove_hooks()
        distributed.dump_rank_weights(self.model, self.ctx)
        # The last checkpoint is on disk before any rank leaves the process group.
        distributed.barrier()
        ended = end or "epochs"  # nothing ended it early: it ran its epochs
        if self.writer is None:
            return TrainSummary([], None, {}, self.val_metrics, ended)
        best = self.writer.best_subdir
        best_path = None if best is None else self.writer.results_dir / best
        return TrainSummary(self.saved, best_path, self.writer.best_metrics, self.val_metrics, ended)

    def train_epoch(self) -> str | None:
        """The rest of the current epoch, from where the position is; returns what ended the run, if
        something did: "time_budget" (the next step would not fit) or "early_stopping"."""
        position, interval, run = self.position, self.interval, self.run
        epoch = position.epoch
        self.sampler.set_position(epoch, position.samples)
        self.loaders["train"].dataset.set_epoch(epoch)  # new augmentations each epoch
        first = self.iters - len(self.loaders["train"])
        for k, (images, targets) in enumerate(batches(self.loaders["train"])):
            batch_index = first + k
            if interval.planned == 0:
                return "time_budget"
            stop.check()  # the hooks' safe points are off under torch.compile
            self.net.train()
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            lr = self.lr_now()
            step_started = time.monotonic()
            result = train_step(self.net, self.model, run.optimizer, run.scaler, self.precision, self.compute_loss,
                                images, targets, lr, self.committed)
            self.committed = snapshot_buffers(self.model)
            self.advance(epoch, len(images))
            interval.add(position.step, lr, result, targets)
            if self.config.compile and position.step == self.first_step + 1 and self.ctx.is_main:
                result.loss.item()  # once: the compilation's cost is only known when the step is done
                log.info(f"compile: the first iteration took {time.monotonic() - step_started:.1f} s, "
                         "torch.compile's one-off compilation included")
            due = run.planner.due(epoch, batch_index)
            if interval.full or due or batch_index == self.iters - 1:
                self.close_interval(epoch, batch_index)
            if due:
                end = self.validate_and_save(epoch, batch_index, None)
                if end is not None:
                    return end
        return None

    def lr_now(self) -> float:
        """The next step's LR: the schedule's (its decay ahead where the time budget runs ahead of the
        steps), times the plateau rule's scale."""
        budget_used = self.budget.share(self.clock_spent + self.interval.size * self.clock_step_s)
        scale = 1.0 if self.run.lr_policy is None else self.run.lr_policy.scale
        return self.schedule.lr_at(self.position.step, budget_used) * scale

    def advance(self, epoch: int, batch: int) -> None:
        """Count a completed step of `batch` images per process."""
        position, samples_per_epoch = self.position, self.sampler.size
        position.step += 1
        position.samples = min(samples_per_epoch, position.samples + batch * self.ctx.world_size)
        if position.samples >= samples_per_epoch:
            position.epoch, position.samples = epoch + 1, 0
        self.progress.tick()

    def plan_interval(self) -> int:
        """Iterations until the next METRICS line: log_every's, fewer when the time budget ends sooner."""
        planned = iterations_between_lines(self.clock_step_s, self.config.log_every_s, self.config.log_every_iterations)
        final_s = self.val_s or self.clock_step_s * len(self.loaders["val"])
        fit_in_budget = self.budget.iterations_left(self.clock_spent, self.clock_step_s, final_s)
        return planned if fit_in_budget is None else min(planned, fit_in_budget)

    def close_interval(self, epoch: int, batch_index: int) -> None:
        """The METRICS line of the steps since the last one; divergence is found (and may end the run) here."""
        report = self.interval.close(self.budget.spent())
        self.clock_spent, self.clock_step_s = report.spent_s, report.step_s
        self.run.nonfinite.account(report.steps, report.diverged, self.total, warn=self.ctx.is_main)
        metrics, _ = logged_metrics(report.cm, self.titles)
        line = headline(metrics) if report.loss is None else {"loss": report.loss, **headline(metrics)}
        # The LR of the interval's last step rides along for the training curves (plots.py).
        agent_log.log_metrics("train", epoch + (batch_index + 1) / self.iters, line, lr=report.steps[-1][1])
        self.interval.planned = self.plan_interval()

    def validate_and_save(self, epoch: int, batch_index: int, ending: str | None) -> str | None:
        """Validate after batch `batch_index` (0-based) of `epoch`, write the checkpoint and the resume
        state; returns why the run ends here, if it does."""
        run, config = self.run, self.config
        started = time.monotonic()
        epoch_float = epoch + (batch_index + 1) / self.iters
        self.val_metrics, absent = validate(
            self.net, self.loaders["val"], self.compute_loss, self.mapping, self.titles, self.device, config,
            self.val_precision, self.val_real, self.eval_batchnorm,
        )
        agent_log.log_metrics("val", epoch_float, self.val_metrics, absent_classes=absent)
        # A validation in train mode (validate_with_model_eval false) moves the buffers.
        self.committed = snapshot_buffers(self.model)
        run.planner.mark(epoch, batch_index)
        run.validated_step = self.position.step
        stopping, lr_policy = run.stopping, run.lr_policy
        if stopping is not None and ending is None and stopping.step(self.val_metrics):
            ending = "early_stopping"
            if self.ctx.is_main:
                log.info(f"early_stopping: {stopping.rule.metric} did not improve for {stopping.rule.patience} "
                         f"validations (best {stopping.best}); this checkpoint is the last")
        if lr_policy is not None and lr_policy.step(self.val_metrics["loss"]) and self.ctx.is_main:
            lr = config.lr * lr_policy.scale
            log.info(f"val loss did not improve for {lr_policy.patience} validations: "
                     f"learning rate lowered to {lr:.3g}", extra={"lr": lr})
        if self.writer is not None:
            self.saved.append(self.writer.save(self.ckpt_config, self.model, epoch_float, self.val_metrics,
                                               end=ending, before_announce=self.write_state))
        else:
            self.write_state()
        if self.on_validated is not None:
            self.on_validated()
        if self.budget.seconds is not None:
            # Shared, so that every rank plans the same iterations to the end of the budget.
            elapsed = torch.tensor([time.monotonic() - started], device=self.device)
            self.val_s = distributed.all_reduce_max(elapsed).item()
            self.clock_spent += self.val_s
            self.interval.planned = min(self.interval.planned, self.plan_interval())
        self.interval.restart_clock()
        return ending

    def write_state(self) -> None:
        """The resume state as of the last completed step (rank 0; the others only count)."""
        if self.save_state is not None:
            self.save_state(self.run.state_dict())
        self.last_saved_step = self.position.step

    def validate_if_cut_short(self) -> str | None:
        """The validation due after the last completed step, when a stop signal cut it short."""
        position = self.position
        if position.step == 0 or self.run.validated_step == position.step:
            return None
        previous = divmod(position.step - 1, self.iters)
        return self.validate_and_save(*previous, None) if self.run.planner.due(*previous) else None

    def end_on_time_budget(self) -> None:
        if self.ctx.is_main:
            log.info(f"time_budget_minutes: the next iteration would not finish in time; training ends "
                     f"after iteration {self.position.step} of {self.total}",
                     extra={"ending": "time_budget", "iteration": self.position.step, "iterations": self.total})
        if self.run.validated_step != self.position.step:
            self.validate_and_save(*divmod(self.position.step - 1, self.iters), "time_budget")

    def abandon_step(self, signum: int) -> None:
        """After a stop signal: the step in flight is abandoned (a peer's broken connection under DDP is
        the same stop) and rank 0 writes the resume state as of the last completed one."""
        restore_buffers(self.model, self.committed)
        if not self.ctx.is_main:
            return
        if self.position.step != self.last_saved_step:
            self.write_state()
        name, position = signal.Signals(signum).name, self.position
        epoch = round(position.epoch + position.samples / self.sampler.size, 4)
        log.warning(
            f"stopped by {name} after iteration {position.step} of {self.total} (epoch {epoch:.2f}); the step "
            "in flight was abandoned. The resume state is written: run the task again to continue",
            extra={"signal": name, "iteration": position.step, "iterations": self.total, "epoch": epoch},
        )


def _no_hooks() -> None:
    pass
