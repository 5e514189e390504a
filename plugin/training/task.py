"""The train task: task dir -> config -> project -> masks -> samples -> model -> checkpoints and log.

`train_task` reads like that flow; `fit` is the plain loop (forward, loss, backward, step, validate
when the planner says so, checkpoint after every validation).

With more than one process (gpu_devices, cpu_processes or torchrun) every rank runs the same flow
on its share of each batch under DistributedDataParallel. The figures that drive the run (train
metrics, validation loss and confusion matrix) are summed over the ranks, so every rank takes the
same decisions and rank 0 logs what a single process would; only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from plugin import agent_log
from plugin.config import load_train_config
from plugin.errors import TaskError
from plugin.format.classes import NEUTRAL_INDEX, ClassMapping, build_mapping, check_continue_training, titles_by_index
from plugin.format.project import ProjectMeta, find_project, list_items, read_meta
from plugin.jsonfile import read_json
from plugin.nn.devices import WorldPlan, plan_world
from plugin.nn.losses import resolve_class_weights, segmentation_loss
from plugin.nn.metrics import confusion_matrix, summarize
from plugin.nn.model import build_model
from plugin.nn.weights import CONFIG_NAME, WEIGHTS_NAME, load_continue, load_state_dict, load_transfer
from plugin.task_dir import TaskDir
from plugin.training import distributed
from plugin.training.augment import build_augmenter
from plugin.training.checkpoints import CheckpointWriter, checkpoint_config
from plugin.training.data import (
    CorruptionBudget,
    SegmentationDataset,
    make_loader,
    prepare_masks,
    split_items,
    val_shard,
)
from plugin.training.distributed import DistContext
from plugin.training.schedule import EvalPlanner, build_optimizer, lr_schedule, plateau_policy, set_lr

log = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    """What rank 0 wrote; the other ranks write nothing (empty list, no best checkpoint)."""

    checkpoints: list[Path]
    best_checkpoint: Path | None
    best_val_metrics: dict[str, float]
    final_val_metrics: dict[str, float]


def train_task(task: TaskDir) -> TrainSummary:
    """Run the whole train task of a task dir, in one process or several; raises TaskError on bad input."""
    distributed.quiet_other_ranks()
    if distributed.env_rank() == 0:
        agent_log.add_log_file(task.tmp_dir / "train_log.jsonl")
    config = load_train_config(task.config_path)
    world = plan_world(config["gpu_devices"], config["cpu_processes"])
    if world.world_size > 1 and not distributed.under_torchrun():
        log.info(f"training with {world.world_size} processes ({world.backend})",
                 extra={"world_size": world.world_size, "backend": world.backend})
    return distributed.launch(world, train_rank, (task, config, world))


def train_rank(ctx: DistContext, task: TaskDir, config: dict, world: WorldPlan) -> TrainSummary:
    """One process's part of the train task."""
    if ctx.is_main:
        agent_log.add_log_file(task.tmp_dir / "train_log.jsonl")
    device = world.device(ctx.local_rank)
    project_dir, meta, mapping = read_project(task, config)
    initial_weights = read_initial_weights(task.model_dir, config["weights_init_type"], mapping)

    tags = config["dataset_tags"]
    splits = split_items(list_items(project_dir), tags["train"], tags["val"])
    train_data = build_dataset("train", splits["train"], meta, mapping, config)
    val_data = build_dataset("val", splits["val"], meta, mapping, config)
    titles = titles_by_index(mapping.title_to_idx)
    class_weights = resolve_class_weights(config["class_weights"], titles, train_data.masks, NEUTRAL_INDEX)
    if config["class_weights"] == "auto" and ctx.is_main:
        by_title = dict(zip(titles, class_weights))
        log.info("class_weights auto (median frequency over the train masks): "
                 + ", ".join(f"{t} {w:.3g}" for t, w in by_title.items()), extra={"class_weights": by_title})
    workers = config["data_workers"]
    # DistributedSampler for every world size, so the global batch of step i holds the same samples
    # whatever the number of processes (rank r takes every world-th index of one seeded permutation).
    train_sampler = DistributedSampler(
        train_data, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config["seed"], drop_last=False
    )
    val_indices, val_real = val_shard(len(val_data), ctx.rank, ctx.world_size)
    loaders = {
        "train": make_loader(train_data, config["batch_size"]["train"], workers["train"], sampler=train_sampler),
        "val": make_loader(val_data, config["batch_size"]["val"], workers["val"], sampler=val_indices),
    }

    torch.manual_seed(config["seed"])
    model = build_model(mapping.num_classes)
    apply_initial_weights(model, initial_weights, config["weights_init_type"], task.model_dir / WEIGHTS_NAME)
    writer = CheckpointWriter(task.results_dir, task.tmp_dir / "checkpoints") if ctx.is_main else None
    return fit(model, loaders, config, mapping, device, writer, ctx, val_real, class_weights)


def read_project(task: TaskDir, config: dict) -> tuple[Path, ProjectMeta, ClassMapping]:
    """The task dir's project folder, its meta and the class mapping the config's special classes give."""
    project_dir = find_project(task.data_dir)
    meta = read_meta(project_dir)
    specials = config["special_classes"]
    return project_dir, meta, build_mapping(meta, specials["background"], specials["neutral"])


def read_initial_weights(model_dir: Path, init_type: str, mapping: ClassMapping) -> dict[str, torch.Tensor] | None:
    """The state dict in model/, or None for a random init; continue_training also checks the classes."""
    weights_path = model_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        if init_type == "continue_training":
            raise TaskError(
                "weights_init_type is continue_training, but there is no model to continue: "
                f"{weights_path} does not exist",
                where="weights_init_type",
            )
        log.info("no model/ weights in the task dir: the network starts from a random initialisation")
        return None
    if init_type == "continue_training":
        config_path = model_dir / CONFIG_NAME
        saved = read_json(config_path).get("class_title_to_idx")
        if not isinstance(saved, dict):
            raise TaskError("the model's config has no class_title_to_idx mapping to continue from", where=config_path)
        check_continue_training(mapping, saved, str(config_path))
    return load_state_dict(weights_path)


def apply_initial_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None, init_type: str, where: Path
) -> None:
    if state_dict is None:
        return
    if init_type == "continue_training":
        load_continue(model, state_dict, where=where)
        log.info("continue_training: every weight of the model was loaded")
    else:
        loaded = load_transfer(model, state_dict, where=where)
        log.info(
            f"transfer_learning: loaded {len(loaded)} weight tensors; last_conv starts from a random initialisation",
            extra={"loaded_tensors": len(loaded)},
        )


def build_dataset(
    split: str, items: list, meta: ProjectMeta, mapping: ClassMapping, config: dict
) -> SegmentationDataset:
    size = (config["input_size"]["width"], config["input_size"]["height"])
    budget = CorruptionBudget.create(split, config["allow_corrupted_samples"][split])
    progress = agent_log.Progress(f"Preparing {split} masks: ", len(items))
    kept, masks = prepare_masks(items, meta, mapping, size, budget, on_item=progress.tick)
    if not kept:
        raise TaskError(f"every sample of the {split} split is corrupted", where=f"dataset_tags.{split}")
    augment = build_augmenter(config["augmentations"]) if split == "train" else None
    return SegmentationDataset(kept, masks, size, budget, augment, config["seed"])


def loss_fn(config: dict, num_classes: int, class_weights: list[float] | None = None):
    weights = config["loss_weights"]
    per_class = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)

    def compute(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return segmentation_loss(
            logits, target, num_classes, NEUTRAL_INDEX, weights["bce"], weights["dice"], per_class
        )

    return compute


def batch_metrics(cm: torch.Tensor, titles: list[str]) -> tuple[dict[str, float], list[str]]:
    """Metrics for the log: floats only; classes absent from prediction and target are listed apart."""
    summary = summarize(cm, titles)
    metrics = {k: float(v) for k, v in summary.items() if v is not None}
    absent = [k.split("/", 1)[1] for k, v in summary.items() if v is None and k.startswith("iou/")]
    return metrics, absent


def fit(
    model: nn.Module,
    loaders: dict[str, DataLoader],
    config: dict,
    mapping: ClassMapping,
    device: torch.device,
    writer: CheckpointWriter | None,
    ctx: DistContext = distributed.SINGLE,
    val_real: int | None = None,
    class_weights: list[float] | None = None,
) -> TrainSummary:
    """The loop: the configured optimizer and LR schedule, per-iteration train metrics, validation and
    a checkpoint when the planner says so.

    `writer` is None on the ranks that write nothing; `val_real` is how many of this rank's val
    samples are real (the rest is padding), all of them when None; `class_weights` (one per class)
    weight the cross-entropy term.
    """
    model.to(device)
    net = wrap_model(model, device, ctx, config["sync_batchnorm"])
    optimizer = build_optimizer(net, config)
    compute_loss = loss_fn(config, mapping.num_classes, class_weights)
    titles = titles_by_index(mapping.title_to_idx)
    iters = len(loaders["train"])
    epochs = config["epochs"]
    planner = EvalPlanner(config["val_every"], iters, epochs)
    schedule = lr_schedule(config, iters)
    lr_policy = plateau_policy(config)
    if ctx.is_main:
        log.info(
            f"optimizer {config['optimizer']['name']} (weight decay {config['optimizer']['weight_decay']:g}), "
            f"lr {config['lr']:g} with the {schedule.name} schedule after {schedule.warmup_steps} warmup "
            f"iterations of {schedule.total_steps}",
            extra={"optimizer": config["optimizer"], "lr_schedule": config["lr_schedule"]},
        )
    ckpt_config = checkpoint_config(config, mapping)
    progress = agent_log.Progress("Model training: ", epochs * iters)
    saved: list[Path] = []
    best: tuple[Path | None, dict[str, float]] | None = None
    val_metrics: dict[str, float] = {}
    sampler = loaders["train"].sampler

    for epoch in range(epochs):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        loaders["train"].dataset.set_epoch(epoch)  # and new augmentations
        for iteration, (images, targets) in enumerate(loaders["train"]):
            net.train()
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            logits = net(images)
            loss = compute_loss(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            scale = 1.0 if lr_policy is None else lr_policy.scale
            set_lr(optimizer, schedule.lr_at(epoch * iters + iteration) * scale)
            optimizer.step()
            progress.tick()

            epoch_float = epoch + (iteration + 1) / iters
            with torch.no_grad():
                cm = distributed.all_reduce_sum(
                    confusion_matrix(logits.argmax(1), targets, mapping.num_classes, NEUTRAL_INDEX)
                )
                # DDP's gradient is the mean of the ranks' losses; the logged loss is the same mean.
                mean_loss = distributed.all_reduce_sum(loss.detach().float().clone()) / ctx.world_size
            train_metrics, _ = batch_metrics(cm.cpu(), titles)
            agent_log.log_metrics("train", epoch_float, {"loss": float(mean_loss), **_headline(train_metrics)})

            if planner.due(epoch, iteration):
                val_metrics, absent = validate(
                    net, loaders["val"], compute_loss, mapping, titles, device, config, val_real
                )
                agent_log.log_metrics("val", epoch_float, val_metrics, absent_classes=absent)
                path = writer.save(ckpt_config, model, epoch_float, val_metrics) if writer is not None else None
                if path is not None:
                    saved.append(path)
                if best is None or val_metrics["loss"] < best[1]["loss"]:
                    best = (path, val_metrics)
                if lr_policy is not None and lr_policy.step(val_metrics["loss"]):
                    lr = config["lr"] * lr_policy.scale
                    log.info(
                        f"val loss did not improve for {lr_policy.patience} validations: "
                        f"learning rate lowered to {lr:.3g}",
                        extra={"lr": lr},
                    )
    assert best is not None, "the planner always validates after the last iteration"
    _dump_rank_weights(model, ctx)
    # The last checkpoint is on disk before any rank leaves the process group.
    distributed.barrier()
    return TrainSummary(saved, best[0], best[1], val_metrics)


def wrap_model(model: nn.Module, device: torch.device, ctx: DistContext, sync_batchnorm: bool) -> nn.Module:
    """The model itself in one process; with several, DistributedDataParallel (SyncBatchNorm first on CUDA).

    Converting in place keeps `model` the module whose state dict the checkpoints save, with the same names.
    """
    if ctx.world_size == 1:
        return model
    if sync_batchnorm and device.type == "cuda":
        for name, child in list(model.named_children()):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    elif sync_batchnorm and ctx.is_main:
        log.info("sync_batchnorm: torch's SyncBatchNorm runs on CUDA only, so each CPU process normalises "
                 "over its own batch")
    # static_graph: the legacy network keeps a block its forward never uses (for the checkpoint names);
    # DDP learns that from the first step instead of searching the graph for unused parameters every step.
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True
    )


def _dump_rank_weights(model: nn.Module, ctx: DistContext) -> None:
    folder = os.environ.get(distributed.DUMP_WEIGHTS_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, Path(folder) / f"rank{ctx.rank}.pt")


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    # Per-class IoU on one batch is noise; the per-iteration line keeps the figures the agent charts.
    return {k: v for k, v in metrics.items() if "/" not in k}


def validate(
    net: nn.Module,
    loader: DataLoader,
    compute_loss,
    mapping: ClassMapping,
    titles: list[str],
    device: torch.device,
    config: dict,
    real: int | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Loss (mean of the per-sample losses) and confusion-matrix metrics over the whole val split, and the absent classes.

    The loss is computed sample by sample so that it does not depend on how the split is batched or
    sharded; sums and counts are added over the ranks, so every rank returns the same figures.
    The first `real` samples of this rank's loader count (None: all); the rest is padding.
    """
    net.train(not config["validate_with_model_eval"])
    cm = torch.zeros(mapping.num_classes, mapping.num_classes, dtype=torch.int64, device=device)
    # [sum of per-sample losses, samples counted], kept on the device: no host sync per sample.
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    seen = 0
    with torch.no_grad():
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            logits = net(images)
            keep = len(images) if real is None else max(0, min(len(images), real - seen))
            seen += len(images)
            for i in range(keep):
                totals[0] += compute_loss(logits[i : i + 1], targets[i : i + 1]).double()
            totals[1] += keep
            # Padding samples are all neutral: they add nothing to the confusion matrix.
            cm += confusion_matrix(logits.argmax(1), targets, mapping.num_classes, NEUTRAL_INDEX)
    distributed.all_reduce_sum(totals)
    distributed.all_reduce_sum(cm)
    metrics, absent = batch_metrics(cm.cpu(), titles)
    metrics = {"loss": float(totals[0] / totals[1]), **metrics}
    return metrics, absent
