"""The training loop: forward, loss, backward, step; validation and a checkpoint when the planner says so.

With several processes every rank runs this loop on its share of each batch under
DistributedDataParallel. The figures that drive the run (train loss, gradient norm, validation
loss and confusion matrix, the time budget's verdict) are summed over the ranks, so every rank
takes the same decisions and rank 0 logs what a single process would; only rank 0 writes files.

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
from plugin.errors import Stopped
from plugin.format.classes import NEUTRAL_INDEX, ClassMapping, titles_by_index
from plugin.nn.losses import segmentation_loss
from plugin.nn.metrics import confusion_matrix
from plugin.settings import TrainConfig
from plugin.training import distributed, stop
from plugin.training.checkpoints import CheckpointWriter, checkpoint_config
from plugin.training.distributed import DistContext
from plugin.training.guard import NonFiniteSteps, finite_step, restore_buffers, snapshot_buffers
from plugin.training.sampler import EpochSampler
from plugin.training.schedule import (
    EarlyStopping,
    EvalPlanner,
    LrPolicy,
    TimeBudget,
    build_optimizer,
    check_metric,
    lr_schedule,
    plateau_policy,
    set_lr,
)
from plugin.training.state import Position, log_resume, resumed_position, rng_states, set_rng_states
from plugin.training.validate import batch_metrics, validate

log = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    """What rank 0 wrote; the other ranks write nothing (empty list, no best checkpoint)."""

    checkpoints: list[Path]
    best_checkpoint: Path | None
    best_val_metrics: dict[str, float]
    final_val_metrics: dict[str, float]
    end: str = "epochs"  # or "time_budget", "early_stopping"


def loss_fn(config: TrainConfig, num_classes: int, class_weights: list[float] | None = None):
    """(logits, target) -> the configured loss, neutral ignored, with the resolved class weights."""
    per_class = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)

    def compute(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return segmentation_loss(
            logits, target, num_classes, NEUTRAL_INDEX, config.bce_weight, config.dice_weight, per_class
        )

    return compute


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
) -> TrainSummary:
    """The loop: the configured optimizer and LR schedule, per-iteration train metrics, validation and
    a checkpoint when the planner says so, until the epochs, the time budget or early stopping end it.

    `writer` and `save_state` (which writes a resume state, returning its size) are None on the
    ranks that write nothing; `val_real` is how many of this rank's val samples are real (the rest
    is padding), all of them when None; `class_weights` (one per class) weight the cross-entropy
    term; `resume` is a resume state of this run to continue from. The train loader's sampler is an
    EpochSampler. Raises Stopped after a stop signal, once the resume state is written.
    """
    if resume is not None:
        model.load_state_dict(resume["model"])
    model.to(device)
    net = distributed.wrap_model(model, device, ctx, config.sync_batchnorm)
    optimizer = build_optimizer(net, config)
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
    step_s = val_s = 0.0  # the last step, data loading included, and the last validation with its writes
    first_step = position.step
    end = "epochs"

    def capture() -> dict:
        return {
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "position": asdict(position),
            "planner_done": planner.done,
            "lr_policy": None if lr_policy is None else asdict(lr_policy),
            "early_stopping": None if stopping is None else [stopping.best, stopping.waited],
            "train_seconds": budget.spent(),
            "nonfinite_in_row": nonfinite.in_row,
            "validated_step": validated_step,
            "checkpoints": writer.state() if writer is not None else None,
            "rng": rng_states(),
        }

    def write_state() -> None:
        nonlocal last_saved_step
        if save_state is not None:
            save_state(capture())
        last_saved_step = position.step

    def checkpoint(epoch: int, iteration: int, ending: str | None) -> str | None:
        """Validate after `iteration` of `epoch`, write the checkpoint and the resume state; returns
        why the run ends here, if it does."""
        nonlocal val_metrics, val_s, committed, validated_step
        started = time.monotonic()
        epoch_float = epoch + (iteration + 1) / iters
        val_metrics, absent = validate(
            net, loaders["val"], compute_loss, mapping, titles, device, config, val_real, eval_batchnorm
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
        val_s = time.monotonic() - started
        return ending

    remove_hooks = stop.watch(model)
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
            last_end = time.monotonic()
            for k, (images, targets) in enumerate(loaders["train"]):
                iteration = first + k
                if budget.seconds is not None and position.step > first_step:
                    final_s = val_s or step_s * len(loaders["val"])
                    if _any_rank(not budget.fits(step_s, final_s), device, ctx):
                        end = "time_budget"
                        break
                net.train()
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                logits = net(images)
                loss = compute_loss(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # DDP's gradient is the mean of the ranks' losses; the logged loss is the same mean.
                mean_loss = distributed.all_reduce_sum(loss.detach().float().clone()) / ctx.world_size
                lr = schedule.lr_at(position.step, budget.used()) * (1.0 if lr_policy is None else lr_policy.scale)
                if finite_step(mean_loss, model):
                    set_lr(optimizer, lr)
                    optimizer.step()
                    nonfinite.in_row = 0
                else:
                    optimizer.zero_grad(set_to_none=True)
                    restore_buffers(model, committed)
                    nonfinite.skip(position.step + 1, total, lr, warn=ctx.is_main)
                committed = snapshot_buffers(model)
                position.step += 1
                position.samples = min(samples_per_epoch, position.samples + len(images) * ctx.world_size)
                if position.samples >= samples_per_epoch:
                    position.epoch, position.samples = epoch + 1, 0
                progress.tick()
                now = time.monotonic()
                step_s, last_end = now - last_end, now

                with torch.no_grad():
                    cm = distributed.all_reduce_sum(
                        confusion_matrix(logits.argmax(1), targets, mapping.num_classes, NEUTRAL_INDEX)
                    )
                train_metrics, _ = batch_metrics(cm.cpu(), titles)
                agent_log.log_metrics("train", epoch + (iteration + 1) / iters,
                                      {"loss": float(mean_loss), **_headline(train_metrics)})
                if planner.due(epoch, iteration):
                    end = checkpoint(epoch, iteration, None) or "epochs"
                    last_end = time.monotonic()
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


def _any_rank(flag: bool, device: torch.device, ctx: DistContext) -> bool:
    """True on every rank when it is True on one: ranks that measure time apart still stop together."""
    if ctx.world_size == 1:
        return flag
    return bool(distributed.all_reduce_sum(torch.tensor([int(flag)], device=device)).item())


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    # Per-class IoU on one batch is noise; the per-iteration line keeps the figures the agent charts.
    return {k: v for k, v in metrics.items() if "/" not in k}
