"""The training loop: forward, loss, backward, step; validation and a checkpoint when the planner says so.

With several processes every rank runs this loop on its share of each batch under
DistributedDataParallel. The figures that drive the run (train metrics, validation loss and
confusion matrix) are summed over the ranks, so every rank takes the same decisions and rank 0 logs
what a single process would; only rank 0 writes files.
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
from plugin.format.classes import NEUTRAL_INDEX, ClassMapping, titles_by_index
from plugin.nn.losses import segmentation_loss
from plugin.nn.metrics import confusion_matrix, summarize
from plugin.nn.tiling import crop_probabilities, predict_tiled, training_window
from plugin.settings import TrainConfig
from plugin.training import distributed
from plugin.training.checkpoints import CheckpointWriter, checkpoint_config
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


def loss_fn(config: TrainConfig, num_classes: int, class_weights: list[float] | None = None):
    """(logits, target) -> the configured loss, neutral ignored, with the resolved class weights."""
    per_class = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)

    def compute(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return segmentation_loss(
            logits, target, num_classes, NEUTRAL_INDEX, config.bce_weight, config.dice_weight, per_class
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
    config: TrainConfig,
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
    net = wrap_model(model, device, ctx, config.sync_batchnorm)
    optimizer = build_optimizer(net, config)
    compute_loss = loss_fn(config, mapping.num_classes, class_weights)
    titles = titles_by_index(mapping.title_to_idx)
    iters = len(loaders["train"])
    epochs = config.epochs
    planner = EvalPlanner(config.val_every, iters, epochs)
    schedule = lr_schedule(config, iters)
    lr_policy = plateau_policy(config)
    if ctx.is_main:
        log.info(
            f"optimizer {config.optimizer} (weight decay {config.weight_decay:g}), "
            f"lr {config.lr:g} with the {schedule.name} schedule after {schedule.warmup_steps} warmup "
            f"iterations of {schedule.total_steps}",
            extra={"optimizer": config.raw["optimizer"], "lr_schedule": config.raw["lr_schedule"]},
        )
    ckpt_config = checkpoint_config(config.raw, mapping)
    eval_batchnorm = config.validate_with_model_eval
    if not eval_batchnorm and config.scale.crops and ctx.world_size > 1:
        # Ranks tile val images of different sizes into different numbers of forwards; in train mode
        # SyncBatchNorm would wait for forwards that other ranks never make.
        eval_batchnorm = True
        if ctx.is_main:
            log.warning("validate_with_model_eval false is ignored: tiled validation of crop training "
                        "with several processes needs BatchNorm in eval mode")
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
                    net, loaders["val"], compute_loss, mapping, titles, device, config, val_real, eval_batchnorm
                )
                agent_log.log_metrics("val", epoch_float, val_metrics, absent_classes=absent)
                path = writer.save(ckpt_config, model, epoch_float, val_metrics) if writer is not None else None
                if path is not None:
                    saved.append(path)
                if best is None or val_metrics["loss"] < best[1]["loss"]:
                    best = (path, val_metrics)
                if lr_policy is not None and lr_policy.step(val_metrics["loss"]):
                    lr = config.lr * lr_policy.scale
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
    config: TrainConfig,
    real: int | None = None,
    eval_batchnorm: bool = True,
) -> tuple[dict[str, float], list[str]]:
    """Loss (mean of the per-sample losses) and confusion-matrix metrics over the whole val split, and the absent classes.

    The loss is computed sample by sample so that it does not depend on how the split is batched or
    sharded; sums and counts are added over the ranks, so every rank returns the same figures.
    The first `real` samples of this rank's loader count (None: all); the rest is padding.
    `eval_batchnorm` False keeps BatchNorm in train mode (validate_with_model_eval false).
    """
    net.train(not eval_batchnorm)
    cm = torch.zeros(mapping.num_classes, mapping.num_classes, dtype=torch.int64, device=device)
    # [sum of per-sample losses, samples counted], kept on the device: no host sync per sample.
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    seen = 0
    if config.scale.crops:
        predict = _tiled_logits(net, config, mapping.num_classes, device)
    else:
        def predict(images: torch.Tensor) -> torch.Tensor:
            return net(images.to(device, non_blocking=True))
    with torch.no_grad():
        for images, targets in loader:
            targets = targets.to(device, non_blocking=True)
            logits = predict(images)
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


def _tiled_logits(net: nn.Module, config: TrainConfig, num_classes: int, device: torch.device):
    """(1, H, W, 3) uint8 whole image -> (1, C, H, W) log-probabilities by the tiled, Gaussian-blended
    prediction that inference makes for a crop-trained model (Predictor.region, without TTA)."""
    window = training_window(config.input_size, config.scale.factor)
    overlap = (window[0] // 2, window[1] // 2)

    def tiles_probs(tiles: list) -> torch.Tensor:
        return crop_probabilities(net, tiles, config.input_size, device)

    def predict(images: torch.Tensor) -> torch.Tensor:
        image = images[0].numpy()
        probs, _ = predict_tiled(tiles_probs, image, window, overlap, config.batch_size.val, num_classes, device)
        # Log-probabilities are logits whose softmax is the blended probabilities, so the loss and the
        # argmax see exactly the prediction inference writes.
        return probs.to(device).clamp_min(1e-8).log()[None]

    return predict
