"""The train task: task dir -> config -> project -> masks -> samples -> model -> the loop (loop.py).

`train_task` reads like that flow. With more than one process (gpu_devices, cpu_processes or
torchrun) every rank runs the same flow; see loop.py for what the ranks share.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import statistics
from functools import partial
from pathlib import Path

import torch
from torch import nn

from plugin import agent_log
from plugin.config.load import read_train_config
from plugin.config.schema import DEFAULT_NETWORK
from plugin.config.typed import LEGACY_NETWORK, NetworkChoice, NetworkSpec, Scale, TrainConfig
from plugin.errors import TaskError
from plugin.files import read_json, refuse_symlink
from plugin.format.classes import NEUTRAL_INDEX, ClassMapping, check_continue_training, create_mapping, titles_by_index
from plugin.format.images import read_image_size, set_max_image_pixels
from plugin.format.project import ProjectMeta, find_project, list_items, read_meta
from plugin.nn.devices import WorldPlan, plan_world
from plugin.nn.losses import resolve_class_weights
from plugin.nn.network import (
    check_input_size_fits,
    create_network,
    load_encoder_start,
    network_record,
    read_network_record,
)
from plugin.nn.weights import CONFIG_NAME, WEIGHTS_NAME, load_continue, load_state_dict, load_transfer
from plugin.plots import write_curves
from plugin.task_dir import TaskDir
from plugin.training import distributed, stop
from plugin.training.augment import create_augmenter
from plugin.training.checkpoints import CheckpointWriter
from plugin.training.data import (
    CorruptionBudget,
    SegmentationDataset,
    WholeImageDataset,
    create_loader,
    loader_workers,
    prepare_masks,
    split_items,
    val_shard,
)
from plugin.training.distributed import DistContext
from plugin.training.loop import Loop, TrainSummary
from plugin.training.mask_cache import MaskCache, load_masks
from plugin.training.sampler import EpochSampler
from plugin.training.state import Fingerprint, fingerprint, load_state, save_state

log = logging.getLogger(__name__)

# scale.factor auto keeps native resolution until the images' shorter side exceeds this many crop
# sides: past it, a native crop would show too little of a photo for its classes to be told apart.
AUTO_CROP_SPAN = 3


def train_task(task: TaskDir) -> TrainSummary:
    """Run the whole train task of a task dir, in one process or several; raises TaskError on bad input
    and Stopped after a stop signal (the resume state written)."""
    stop.install()
    try:
        distributed.quiet_other_ranks()
        if distributed.env_rank() == 0:
            refuse_output_links(task)
            agent_log.add_log_file(task.train_log_path)
        config = read_train_config(task.config_path)
        config = dataclasses.replace(config, network=resolve_network(config, task.model_dir))
        world = plan_world(list(config.gpu_devices), config.cpu_processes)
        if world.world_size > 1 and not distributed.under_torchrun():
            log.info(f"training with {world.world_size} processes ({world.backend})",
                     extra={"world_size": world.world_size, "backend": world.backend})
        return distributed.launch(world, train_rank, (task, config, world))
    finally:
        # What runs after training in this process (the demo's inference) gets Ctrl-C back.
        stop.uninstall()


def train_rank(ctx: DistContext, task: TaskDir, config: TrainConfig, world: WorldPlan) -> TrainSummary:
    """One process's part of the train task."""
    if ctx.is_main:
        agent_log.add_log_file(task.train_log_path)
    set_max_image_pixels(config.max_image_pixels)
    device = world.device(ctx.local_rank)
    project_dir, meta, mapping = read_project(task, config)
    items = list_items(project_dir)
    # Only rank 0 reads and writes the resume state; the others get what it read.
    run_fingerprint = fingerprint(config.raw, project_dir, items) if ctx.is_main else None
    resume = distributed.broadcast_from_main(read_resume_state(task, config, run_fingerprint) if ctx.is_main else None)
    # A resumed run takes its weights from the state; model/ only starts a new one.
    initial_weights = None if resume else read_initial_weights(task.model_dir, config.weights_init_type, mapping)
    # Before the masks, which can take minutes: a weights file that does not fit fails at once.
    torch.manual_seed(config.seed)
    model = create_network(config.network.spec, mapping.num_classes)
    if initial_weights is None and resume is None:
        load_encoder_start(model, config.network.spec, config.network.encoder_weights)
    apply_initial_weights(model, initial_weights, config.weights_init_type, task.model_dir / WEIGHTS_NAME)

    # The node's local rank 0 draws the masks; the others wait for this run's token, then map its files.
    token = distributed.broadcast_from_main(secrets.token_hex(8))
    cache = MaskCache(task.mask_cache_dir, builder=ctx.local_rank == 0, token=token)
    config, splits, train_sizes = split_and_scale(items, config)
    train_data, val_data = create_datasets(splits, meta, mapping, config, cache)
    titles = titles_by_index(mapping.title_to_idx)
    class_weights = resolve_class_weights(config.class_weights, titles, train_data.masks, NEUTRAL_INDEX)
    if config.class_weights == "auto" and ctx.is_main:
        by_title = dict(zip(titles, class_weights))
        log.info("class_weights auto (median frequency over the train masks): "
                 + ", ".join(f"{t} {w:.3g}" for t, w in by_title.items()), extra={"class_weights": by_title})
    # One sampler for every world size, so the global batch of step i holds the same samples whatever
    # the number of processes (rank r takes every world-th index of one seeded permutation).
    train_sampler = EpochSampler(len(train_data), ctx.rank, ctx.world_size, config.seed)
    val_indices, val_real = val_shard(len(val_data), ctx.rank, ctx.world_size)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    workers = {split: loader_workers(config.data_workers.of(split), split, per_node) for split in ("train", "val")}
    loaders = {
        "train": create_loader(train_data, config.batch_size.train, workers["train"], sampler=train_sampler),
        # Whole images of any size, one per batch: batch_size.val then counts the tiles per forward.
        "val": create_loader(
            val_data, 1 if isinstance(val_data, WholeImageDataset) else config.batch_size.val,
            workers["val"], sampler=val_indices,
        ),
    }

    writer = save = redraw = None
    if ctx.is_main:
        record = {"network": network_record(config.network.spec),
                  "presented_scale": presented_scale(config, train_sizes)}
        writer = CheckpointWriter(task.results_dir, task.checkpoint_staging_dir, config.keep_checkpoints, record)
        save = partial(save_state, task.state_path, fp=run_fingerprint)
        redraw = partial(write_progress, task.train_log_path, task.progress_path)

    summary = Loop(model, loaders, config, mapping, device, writer, ctx, val_real, class_weights, resume, save,
                   redraw).fit()
    if ctx.is_main and task.state_path.exists():
        # The run is complete: the next run on this task dir is a new one.
        task.state_path.unlink()
        task.state_path.parent.rmdir()
        log.info(f"training finished ({summary.end}); the resume state {task.state_path} is removed")
    return summary


def split_and_scale(items: list, config: TrainConfig) -> tuple[TrainConfig, dict[str, list], list[tuple[int, int]]]:
    """(the config with its scale resolved, the items by split, the train images' (height, width)).

    The sizes are read (image headers) only where something needs them: the auto factor, and the
    presented scale of resize training; crops at a given factor need none."""
    splits = split_items(items, config.train_tag, config.val_tag)
    given_factor = config.scale.crops and config.scale.factor is not None
    train_sizes = [] if given_factor else image_sizes(splits["train"])
    return resolve_scale(config, train_sizes), splits, train_sizes


def image_sizes(items: list) -> list[tuple[int, int]]:
    """(height, width) of each item's image, from its header; an unreadable one is left out here (the
    corruption budget counts it when its sample is drawn)."""
    sizes = []
    for item in items:
        try:
            sizes.append(read_image_size(item.image_path))
        except TaskError:
            continue
    return sizes


def resolve_scale(config: TrainConfig, train_sizes: list[tuple[int, int]]) -> TrainConfig:
    """The config with a number for scale.factor, in its typed and raw forms (the checkpoint records
    the number): "auto" is native resolution unless the train images' median shorter side is over
    AUTO_CROP_SPAN times the input's shorter side, then the scale that brings it to that."""
    scale = config.scale
    if scale.crops and scale.factor is None:
        short = statistics.median(min(size) for size in train_sizes) if train_sizes else 0
        span = AUTO_CROP_SPAN * min(config.input_size)
        factor = round(span / short, 4) if short > span else 1.0
        scale = Scale("crop", factor)
        how = "at native resolution" if factor == 1.0 else (
            f"at scale {factor:g}, so that a {min(config.input_size)} px crop spans 1/{AUTO_CROP_SPAN} of it")
        log.info(f"scale.factor auto: the train images' median shorter side is {short:g} px; crops {how}",
                 extra={"scale": {"mode": "crop", "factor": factor}})
    raw = {**config.raw, "scale": {"mode": scale.mode, "factor": scale.factor}}
    return dataclasses.replace(config, scale=scale, raw=raw)


def presented_scale(config: TrainConfig, train_sizes: list[tuple[int, int]]) -> dict[str, float]:
    """The scale (x, y) at which training showed the network its images, recorded in each checkpoint so
    that sliding_window shows it images at that scale too: the crop factor, or for whole images resized
    to the input, the median of input side / image side over the train images."""
    if config.scale.crops:
        return {"x": config.scale.factor, "y": config.scale.factor}
    width, height = config.input_size
    return {"x": float(statistics.median(width / w for _h, w in train_sizes)),
            "y": float(statistics.median(height / h for h, _w in train_sizes))}


def write_progress(log_path: Path, out_path: Path) -> None:
    """Redraw the training curves of the run's log; a picture that cannot be drawn is a warning, never
    the end of a training run."""
    try:
        write_curves(log_path, out_path)
    except Exception as error:  # noqa: BLE001 - the picture is a convenience; the run and its checkpoints come first
        log.warning(f"the training curves {out_path} could not be drawn ({agent_log.crash_message(error)}); "
                    "training goes on", extra={"progress_png": str(out_path)})


def refuse_output_links(task: TaskDir) -> None:
    """Training writes below results/ and tmp/ only: a symbolic link on the way would send it elsewhere."""
    for path in (task.results_dir, task.tmp_dir, task.train_log_path, task.checkpoint_staging_dir,
                 task.state_path.parent, task.state_path):
        refuse_symlink(path)


def resolve_network(config: TrainConfig, model_dir: Path) -> NetworkChoice:
    """The config's network section; without one, the network of the checkpoint in model/ (so that a
    legacy config with a legacy model trains as it did), else DEFAULT_NETWORK. TaskError when model/
    holds another network than the config asks for, or the input size does not fit the network."""
    saved = model_network(model_dir)
    if config.network is not None:
        choice, source = config.network, "the config"
        if saved is not None and saved != choice.spec:
            raise TaskError(
                f"the config asks for the {choice.spec.describe()} network, but model/ holds a {saved.describe()} "
                f"checkpoint ({model_dir / WEIGHTS_NAME}), whose weights cannot go into it: leave network out of "
                "the config to train model/'s network, or start without model/",
                where="network",
            )
    elif saved is not None:
        choice, source = NetworkChoice(saved, None), "model/"
    else:
        choice = DEFAULT_NETWORK
        source = "the default"
    check_input_size_fits(choice.spec, config.input_size)
    log.info(f"network: {choice.spec.describe()} (from {source})",
             extra={"network": {"arch": choice.spec.arch, "encoder": choice.spec.encoder,
                                "encoder_weights": choice.encoder_weights}})
    return choice


def model_network(model_dir: Path) -> NetworkSpec | None:
    """The network of the checkpoint in model/, None without model.pt; weights without a config.json
    are the legacy network's, as the legacy platform supplied them."""
    if not (model_dir / WEIGHTS_NAME).is_file():
        return None
    config_path = model_dir / CONFIG_NAME
    if not config_path.is_file():
        return LEGACY_NETWORK
    return read_network_record(read_json(config_path), config_path)


def read_resume_state(task: TaskDir, config: TrainConfig, run_fingerprint: Fingerprint) -> dict | None:
    """The resume state to continue from, or None for a fresh run (resume never, no state, another run's)."""
    if not config.resume:
        if task.state_path.exists():
            log.info(f"resume is never: the resume state {task.state_path} is ignored, and replaced at the "
                     "first checkpoint", extra={"file": str(task.state_path), "state_ignored": True})
        return None
    return load_state(task.state_path, run_fingerprint)


def read_project(task: TaskDir, config: TrainConfig) -> tuple[Path, ProjectMeta, ClassMapping]:
    """The task dir's project folder, its meta and the class mapping the config's special classes give."""
    project_dir = find_project(task.data_dir)
    meta = read_meta(project_dir)
    return project_dir, meta, create_mapping(meta, config.background, config.neutral)


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
        log.info("no model/ weights in the task dir: the network starts from network.encoder_weights (its "
                 "encoder) and a random initialisation")
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
        log.info("continue_training: every weight of the model was loaded", extra={"loaded_tensors": len(state_dict)})
    else:
        loaded = load_transfer(model, state_dict, where=where)
        log.info(
            f"transfer_learning: loaded {len(loaded)} weight tensors; last_conv starts from a random initialisation",
            extra={"loaded_tensors": len(loaded)},
        )


def read_splits(task: TaskDir) -> tuple[TrainConfig, ProjectMeta, ClassMapping, dict[str, list]]:
    """A task dir's config (scale resolved), project meta, class mapping and items by split, read as
    train_rank reads them: for tools that build samples outside a run."""
    config = read_train_config(task.config_path)
    project_dir, meta, mapping = read_project(task, config)
    config, splits, _sizes = split_and_scale(list_items(project_dir), config)
    return config, meta, mapping, splits


def read_datasets(task: TaskDir) -> tuple[TrainConfig, ClassMapping, SegmentationDataset, SegmentationDataset]:
    """A task dir's config (scale resolved), class mapping, and train and val samples, built as
    train_rank builds them but without a mask cache: for benchmarks and tests that drive the Loop."""
    config, meta, mapping, splits = read_splits(task)
    return (config, mapping, *create_datasets(splits, meta, mapping, config))


def create_datasets(
    splits: dict[str, list], meta: ProjectMeta, mapping: ClassMapping, config: TrainConfig,
    cache: MaskCache | None = None,
) -> tuple[SegmentationDataset, SegmentationDataset]:
    """The train and val samples of a project's items split by the config's tags (split_items), with
    the scale resolved (resolve_scale)."""
    return tuple(create_dataset(split, splits[split], meta, mapping, config, cache) for split in ("train", "val"))


def create_dataset(
    split: str, items: list, meta: ProjectMeta, mapping: ClassMapping, config: TrainConfig,
    cache: MaskCache | None = None,
) -> SegmentationDataset:
    """The split's samples, their masks from the task's mask cache (drawn in this process without one).
    Crop training validates on whole images at their own size (WholeImageDataset), predicted tile by
    tile as inference will; everything else is sampled at the training scale."""
    size, scale = config.input_size, config.scale
    if scale.factor is None:
        raise ValueError("scale.factor auto: resolve_scale gives the datasets a number")
    whole = split == "val" and scale.crops
    budget = CorruptionBudget.create(split, config.allow_corrupted_samples.of(split))
    progress = agent_log.Progress(f"Preparing {split} masks: ", len(items))

    def on_item() -> None:
        progress.tick()
        stop.check()  # rasterizing a large project takes minutes: a stop need not wait for it

    # Crop training keeps masks at the crop scale, its validation at the images' own size.
    mask_size = (1.0 if whole else scale.factor) if scale.crops else size
    if cache is None:
        kept, masks = prepare_masks(items, meta, mapping, mask_size, budget, on_item=on_item)
    else:
        kept, masks = load_masks(items, meta, mapping, mask_size, budget, cache, split, on_item=on_item)
    if not kept:
        raise TaskError(f"every sample of the {split} split is corrupted", where=f"dataset_tags.{split}")
    if whole:
        return WholeImageDataset(kept, masks, size, budget)
    if scale.crops:
        _warn_small_images(masks, size, scale)
    augment = create_augmenter(config.augmentations) if split == "train" else None
    return SegmentationDataset(kept, masks, size, budget, augment, config.seed, scale, config.foreground_oversampling)


def _warn_small_images(masks: list, size: tuple[int, int], scale: Scale) -> None:
    small = [m.shape for m in masks if m.shape[0] < size[1] or m.shape[1] < size[0]]
    if not small:
        return
    rows, cols = min(small, key=lambda shape: shape[0] * shape[1])
    share = "every train image is" if len(small) == len(masks) else f"{len(small)} of {len(masks)} train images are"
    log.warning(
        f"{share} smaller than the {size[0]}x{size[1]} input_size crop at scale {scale.factor:g} (the smallest "
        f"is {cols}x{rows}); their crops are padded with neutral pixels, which count in no loss. A smaller "
        "input_size, or scale.mode resize, wastes less compute on padding",
        extra={"small_images": len(small), "images": len(masks)},
    )


