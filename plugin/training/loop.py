"""The training loop: forward, loss, backward, step; validation and a checkpoint when the planner says so.

With several processes every rank runs this loop on its share of each batch under
DistributedDataParallel. The figures that drive the run (train loss, gradient norm, validation
loss and confusion matrix, the time budget's verdict) are summed over the ranks, so every rank
takes the same decisions and rank 0 logs what a single process would; only rank 0 writes files.

A step never waits for the device (step.py): train figures are summed on the device and read back
once per METRICS line (log_interval.py, about every log_every seconds), so a GPU runs ahead of Python.

A run can stop at any moment and go on later as if it had not (state.py): at every checkpoint, and
when a stop signal abandons the step in flight (stop.py), rank 0 writes the resume state as of the
last completed step, and `fit(..., resume=state)` continues from it, sample for sample.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from plugin import agent_log
from plugin.config.settings import TrainConfig
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
from plugin.training.sampler import EpochSampler
from plugin.training.schedule import (
    EarlyStopping,
    EvalPlanner,
    LrPolicy,
    TimeBudget,
    check_metric,
    create_optimizer,
    lr_schedule,
    plateau_policy,
)
from plugin.training.state import Position, log_resume, resumed_position, rng_states, set_rng_states
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


def fit(
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
) -> TrainSummary:
    """The loop: the configured optimizer and LR schedule, train metrics every log_every, validation
    and a checkpoint when the planner says so, until the epochs, the time budget or early stopping end it.

    `writer` and `save_state` (which writes a resume state, returning its size) are None on the
    ranks that write nothing; `val_real` is how many of this rank's val samples are real (the rest
    is padding), all of them when None; `class_weights` (one per class) weight the cross-entropy
    term; `resume` is a resume state of this run to continue from; `on_validated` runs after each
    validation's checkpoint (rank 0 redraws the training curves). The train loader's sampler is an
    EpochSampler. Raises Stopped after a stop signal, once the resume state is written.
    """
    if resume is not None:
        model.load_state_dict(resume["model"])
    precision = resolve_precision(config.amp, device)
    model = prepare_model(model.to(device), precision)
    net = distributed.wrap_model(model, device, ctx, config.sync_batchnorm)
    if config.compile:
        net = torch.compile(net)
    optimizer = create_optimizer(model, config)
    scaler = precision.grad_scaler()
    compute_loss = loss_fn(config, mapping.num_classes, class_weights)
    titles = titles_by_index(mapping.title_to_idx)
    sampler: EpochSampler = loaders["train"].sampler
    sampler.set_position(0)
    iters, epochs, total = len(loaders["train"]), config.epochs, config.epochs * len(loaders["train"])
    samples_per_epoch = sampler.size
    planner = EvalPlanner(config.val_every, iters, epochs)
    schedule = lr_schedule(config, iters)
    lr_policy = plateau_policy(config)
    stopping = EarlyStopping(config.early_stopping) if config.early_stopping is not None else None
    budget = TimeBudget(config.time_budget_s)
    position = Position()
    nonfinite = NonFiniteSteps(config.max_nonfinite_steps, config.lr)
    if stopping is not None:
        check_metric(stopping.rule.metric, titles)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        position = resumed_position(resume["position"], loaders["train"], iters)
        planner.done = resume["planner_done"]
        if lr_policy is not None:
            lr_policy = LrPolicy(**resume["lr_policy"])
        if stopping is not None and resume["early_stopping"] is not None:
            stopping.best, stopping.waited = resume["early_stopping"]
        budget.spent_before = resume["train_seconds"]
        nonfinite.in_row = resume["nonfinite_in_row"]
        if scaler is not None and resume.get("grad_scaler") is not None:
            scaler.load_state_dict(resume["grad_scaler"])
        if writer is not None:
            writer.restore(resume["checkpoints"])
        set_rng_states(resume["rng"])
    if ctx.is_main:
        log.info(
            f"optimizer {config.optimizer} (weight decay {config.weight_decay:g}), "
            f"lr {config.lr:g} with the {schedule.name} schedule after {schedule.warmup_steps} warmup "
            f"iterations of {schedule.total_steps}",
            extra={"optimizer": config.raw["optimizer"], "lr_schedule": config.raw["lr_schedule"]},
        )
        log_precision(config, precision)
        if resume is not None:
            log_resume(resume, position, samples_per_epoch)
    ckpt_config = checkpoint_config(config.raw, mapping)
    eval_batchnorm = config.validate_with_model_eval
    if not eval_batchnorm and config.scale.crops and ctx.world_size > 1:
        # Ranks tile val images of different sizes into different numbers of forwards; in train mode
        # SyncBatchNorm would wait for forwards that other ranks never make.
        eval_batchnorm = True
        if ctx.is_main:
            log.warning("validate_with_model_eval false is ignored: tiled validation of crop training "
                        "with several processes needs BatchNorm in eval mode")
    progress = agent_log.Progress("Model training: ", total)
    progress.tick(position.step)
    saved: list[Path] = []
    val_metrics: dict[str, float] = {}
    # Buffers (BatchNorm statistics) as of the last completed step: a forward changes them before the
    # step is complete, so an abandoned or skipped step puts them back.
    committed = snapshot_buffers(model)
    last_saved_step = position.step if resume is not None else -1
    validated_step = resume["validated_step"] if resume is not None else -1
    interval = LogInterval(mapping.num_classes, device)
    # The ranks' shared clock as of the last METRICS line: training seconds spent and seconds per
    # iteration (log_interval.py); val_s is the last validation with its writes.
    clock_spent, clock_step_s, val_s = budget.spent_before, 0.0, 0.0
    first_step = position.step
    end = "epochs"

    def capture() -> dict:
        return {
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "grad_scaler": None if scaler is None else scaler.state_dict(),
            "position": asdict(position),
            "planner_done": planner.done,
            "lr_policy": None if lr_policy is None else asdict(lr_policy),
            "early_stopping": None if stopping is None else [stopping.best, stopping.waited],
            "train_seconds": budget.spent(),
            "nonfinite_in_row": nonfinite.in_row_after(interval.diverged_so_far()),
            "validated_step": validated_step,
            "checkpoints": writer.state() if writer is not None else None,
            "rng": rng_states(),
        }

    def write_state() -> None:
        nonlocal last_saved_step
        if save_state is not None:
            save_state(capture())
        last_saved_step = position.step

    def plan_interval() -> int:
        planned = iterations_between_lines(clock_step_s, config.log_every_s, config.log_every_iterations)
        fit_in_budget = budget.iterations_left(clock_spent, clock_step_s, val_s or clock_step_s * len(loaders["val"]))
        return planned if fit_in_budget is None else min(planned, fit_in_budget)

    def close_interval(epoch: int, iteration: int) -> None:
        """The METRICS line of the steps since the last one; divergence is found (and may end the run) here."""
        nonlocal clock_spent, clock_step_s
        report = interval.close(budget.spent())
        clock_spent, clock_step_s = report.spent_s, report.step_s
        nonfinite.account(report.steps, report.diverged, total, warn=ctx.is_main)
        metrics, _ = logged_metrics(report.cm, titles)
        line = headline(metrics) if report.loss is None else {"loss": report.loss, **headline(metrics)}
        # The LR of the interval's last step rides along for the training curves (plots.py).
        agent_log.log_metrics("train", epoch + (iteration + 1) / iters, line, lr=report.steps[-1][1])
        interval.planned = plan_interval()

    def checkpoint(epoch: int, iteration: int, ending: str | None) -> str | None:
        """Validate after `iteration` of `epoch`, write the checkpoint and the resume state; returns
        why the run ends here, if it does."""
        nonlocal val_metrics, val_s, committed, validated_step, clock_spent
        started = time.monotonic()
        epoch_float = epoch + (iteration + 1) / iters
        val_metrics, absent = validate(
            net, loaders["val"], compute_loss, mapping, titles, device, config, precision, val_real, eval_batchnorm
        )
        agent_log.log_metrics("val", epoch_float, val_metrics, absent_classes=absent)
        committed = snapshot_buffers(model)  # a validation in train mode (validate_with_model_eval false) moves them
        planner.mark(epoch, iteration)
        validated_step = position.step
        if stopping is not None and ending is None and stopping.step(val_metrics):
            ending = "early_stopping"
            if ctx.is_main:
                log.info(f"early_stopping: {stopping.rule.metric} did not improve for {stopping.rule.patience} "
                         f"validations (best {stopping.best}); this checkpoint is the last")
        if lr_policy is not None and lr_policy.step(val_metrics["loss"]) and ctx.is_main:
            lr = config.lr * lr_policy.scale
            log.info(f"val loss did not improve for {lr_policy.patience} validations: "
                     f"learning rate lowered to {lr:.3g}", extra={"lr": lr})
        if writer is not None:
            saved.append(writer.save(ckpt_config, model, epoch_float, val_metrics, end=ending,
                                     before_announce=write_state))
        else:
            write_state()
        if on_validated is not None:
            on_validated()
        if budget.seconds is not None:
            # Shared, so that every rank plans the same iterations to the end of the budget.
            val_s = distributed.all_reduce_max(torch.tensor([time.monotonic() - started], device=device)).item()
            clock_spent += val_s
            interval.planned = min(interval.planned, plan_interval())
        interval.restart_clock()
        return ending

    interval.planned = plan_interval()
    remove_hooks = stop.watch(model) if not config.compile else _no_hooks
    try:
        if position.step > 0 and validated_step != position.step:
            # A stop signal cut short the validation due after the last completed step.
            previous = divmod(position.step - 1, iters)
            if planner.due(*previous):
                end = checkpoint(*previous, None) or "epochs"
        while position.epoch < epochs and end == "epochs":
            epoch = position.epoch
            sampler.set_position(epoch, position.samples)
            loaders["train"].dataset.set_epoch(epoch)  # new augmentations each epoch
            first = iters - len(loaders["train"])
            for k, (images, targets) in enumerate(batches(loaders["train"])):
                iteration = first + k
                if interval.planned == 0:
                    end = "time_budget"
                    break
                stop.check()  # the hooks' safe points are off under torch.compile
                net.train()
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                budget_used = budget.share(clock_spent + interval.size * clock_step_s)
                lr = schedule.lr_at(position.step, budget_used) * (1.0 if lr_policy is None else lr_policy.scale)
                step_started = time.monotonic()
                result = train_step(net, model, optimizer, scaler, precision, compute_loss, images, targets, lr,
                                    committed)
                committed = snapshot_buffers(model)
                position.step += 1
                position.samples = min(samples_per_epoch, position.samples + len(images) * ctx.world_size)
                if position.samples >= samples_per_epoch:
                    position.epoch, position.samples = epoch + 1, 0
                progress.tick()
                interval.add(position.step, lr, result, targets)
                if config.compile and position.step == first_step + 1 and ctx.is_main:
                    result.loss.item()  # once: the compilation's cost is only known when the step is done
                    log.info(f"compile: the first iteration took {time.monotonic() - step_started:.1f} s, "
                             "torch.compile's one-off compilation included")
                due = planner.due(epoch, iteration)
                if interval.full or due or iteration == iters - 1:
                    close_interval(epoch, iteration)
                if due:
                    end = checkpoint(epoch, iteration, None) or "epochs"
                    if end != "epochs":
                        break
        if end == "time_budget":
            if ctx.is_main:
                log.info(f"time_budget_minutes: the next iteration would not finish in time; training ends "
                         f"after iteration {position.step} of {total}")
            if validated_step != position.step:
                checkpoint(*divmod(position.step - 1, iters), "time_budget")
    except BaseException as error:
        signum = stop.requested()
        if signum is None:
            raise
        # The step in flight is abandoned (a peer's broken connection under DDP is the same stop).
        restore_buffers(model, committed)
        if ctx.is_main:
            if position.step != last_saved_step:
                write_state()
            log.warning(
                f"stopped by {signal.Signals(signum).name} after iteration {position.step} of {total} "
                f"(epoch {position.epoch + position.samples / samples_per_epoch:.2f}); the step in flight was "
                "abandoned. The resume state is written: run the task again to continue",
                extra={"signal": signal.Signals(signum).name, "iteration": position.step},
            )
        stopped = error if isinstance(error, Stopped) else Stopped(signum)
        stopped.logged = True
        raise stopped from None
    finally:
        remove_hooks()
    distributed.dump_rank_weights(model, ctx)
    # The last checkpoint is on disk before any rank leaves the process group.
    distributed.barrier()
    if writer is None:
        return TrainSummary([], None, {}, val_metrics, end)
    best = writer.best_subdir
    return TrainSummary(saved, None if best is None else writer.results_dir / best, writer.best_metrics,
                        val_metrics, end)


def _no_hooks() -> None:
    pass
