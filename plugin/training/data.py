"""Samples for training: split a project by tags, cache the class masks, load and normalise images.

Masks are rasterized once, at the size training uses (the input size, or the image at the crop
scale), and kept as a uint8 array per image (mask_cache.py keeps them on disk, memory-mapped): the
legacy trainer redrew every annotation in every epoch, which cost more than the forward pass at
small input sizes. Images are decoded per sample, so memory stays bounded by the masks alone.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from plugin.config.typed import RESIZE, Scale
from plugin.errors import TaskError
from plugin.format.classes import NEUTRAL_INDEX, ClassMapping
from plugin.format.images import read_image_size
from plugin.format.masks import rasterize
from plugin.format.project import Annotation, Item, ProjectMeta, check_image_size, read_annotation, read_image_tags
from plugin.nn.preprocess import PAD_COLOR, normalize, read_resized, resize_mask
from plugin.parallel import available_cores
from plugin.training.augment import Augmenter, sample_seed
from plugin.training.crops import crop_origin, cut, foreground_pixels

log = logging.getLogger(__name__)

# Second random stream of a sample's seed: the crop's draws, apart from the augmentation's.
CROP_STREAM = 1
# Third: which sample replaces one whose image does not decode.
REPLACEMENT_STREAM = 2


def split_items(items: Sequence[Item], train_tag: str, val_tag: str) -> dict[str, list[Item]]:
    """Items by split. An image carrying both tags is in both splits; one with neither is unused."""
    splits: dict[str, list[Item]] = {"train": [], "val": []}
    unused = 0
    for item in items:
        tags = read_image_tags(item.ann_path)
        if train_tag in tags:
            splits["train"].append(item)
        if val_tag in tags:
            splits["val"].append(item)
        if train_tag not in tags and val_tag not in tags:
            unused += 1
    if unused:
        log.info(
            f"{unused} of {len(items)} images carry neither the '{train_tag}' nor the '{val_tag}' tag; they are not used",
            extra={"unused_images": unused},
        )
    for split, tag in (("train", train_tag), ("val", val_tag)):
        if not splits[split]:
            raise TaskError(
                f"no image carries the tag '{tag}', so the {split} split is empty; tag some images "
                f"'{tag}' or change the tag's name",
                where=f"dataset_tags.{split}",
            )
    return splits


@dataclass
class CorruptionBudget:
    """Shared count of skipped samples of one split, so the limit holds across loader workers."""

    split: str
    allowed: int
    counter: multiprocessing.sharedctypes.Synchronized  # type: ignore[name-defined]

    @classmethod
    def create(cls, split: str, allowed: int) -> CorruptionBudget:
        return cls(split, allowed, multiprocessing.Value("i", 0))

    def spend(self, where: object, error: Exception) -> None:
        """Count one corrupted sample: warn while the budget lasts, then raise."""
        with self.counter.get_lock():
            self.counter.value += 1
            used = self.counter.value
        if used > self.allowed:
            # A TaskError's own text: `where` names the file once, not twice.
            text = error.message if isinstance(error, TaskError) else str(error)
            raise TaskError(
                f"{text}; more than allow_corrupted_samples.{self.split} = {self.allowed} corrupted samples "
                f"in the {self.split} split",
                where=where,
            ) from error
        log.warning(
            f"skipping a corrupted sample ({used} of {self.allowed} allowed in the {self.split} split): {error}",
            extra={"file": str(where), "split": self.split, "skipped": used, "allowed": self.allowed},
        )


def prepare_masks(
    items: Sequence[Item],
    meta: ProjectMeta,
    mapping: ClassMapping,
    size: tuple[int, int] | float,
    budget: CorruptionBudget,
    on_item: Callable[[], None] | None = None,
) -> tuple[list[Item], list[np.ndarray]]:
    """Rasterize every item's annotation once: resized to `size` (width, height), or, for a number,
    to the image's own size times that factor (1.0: native resolution).

    Checks each annotation against its image's oriented size (EXIF applied, as decoding does), so
    that a size mismatch or an unreadable image is found before training starts. Corrupted items
    are dropped within the budget. (Training goes through mask_cache.py, which draws the same masks
    once per task and keeps them on disk.)
    """
    kept: list[Item] = []
    masks: list[np.ndarray] = []
    for item in items:
        try:
            ann = read_annotation(item.ann_path, meta)
            height, width = read_image_size(item.image_path)
            check_image_size(item, ann, height, width)
            mask = training_mask(ann, mapping, mask_target(size, height, width))
        except TaskError as exc:
            budget.spend(exc.where or item.ann_path, exc)
        else:
            kept.append(item)
            masks.append(mask)
        if on_item is not None:
            on_item()
    return kept, masks


def mask_target(size: tuple[int, int] | float, height: int, width: int) -> tuple[int, int]:
    """(width, height) of an image's training mask: `size`, or for a number the image's size times it."""
    if isinstance(size, tuple):
        return size
    return max(1, round(width * size)), max(1, round(height * size))


def training_mask(ann: Annotation, mapping: ClassMapping, target: tuple[int, int]) -> np.ndarray:
    """The annotation's class mask at `target` (width, height), nearest-neighbour resized."""
    labels = rasterize(ann, mapping)
    return labels if target == (ann.width, ann.height) else resize_mask(labels, *target)


class SegmentationDataset(Dataset):
    """(image float32 (3, H, W), target int64 (H, W)) pairs at the input size, targets from the mask cache.

    With a resize scale (the legacy rule) a sample is the whole image resized; with a crop scale, a
    random input-size crop of the image scaled like its cached mask, `foreground` of them centred
    on a pixel of a class other than background, padded pixels neutral. An index from len(self) on
    is padding (see val_shard): a zero image whose target is all neutral, so it counts in no loss
    and no metric. Sample i of epoch e draws its crop and augmentation from the seed
    sample_seed(seed, e, i), whichever worker loads it.
    """

    def __init__(
        self,
        items: Sequence[Item],
        masks: Sequence[np.ndarray],
        input_size: tuple[int, int],
        budget: CorruptionBudget,
        augment: Augmenter | None = None,
        seed: int = 0,
        scale: Scale = RESIZE,
        foreground: float = 0.0,
    ) -> None:
        self.items = list(items)
        self.masks = list(masks)
        self.width, self.height = input_size
        self.budget = budget
        self.augment = augment
        self.seed = seed
        self.scale = scale
        self.foreground = foreground
        rng = np.random.default_rng(seed)
        self.foreground_pixels = [foreground_pixels(m, rng) for m in self.masks] if scale.crops and foreground else []
        # Items whose image failed to decode, shared with the loader workers (created before they fork):
        # the budget counts each file once, and a known bad file is never decoded again.
        self._undecodable = multiprocessing.Array("b", len(self.items))
        # Shared memory, not an attribute: persistent loader workers keep the dataset copy they forked
        # with, and must still see the epoch. The main process sets it before the epoch's iterator
        # hands any index to a worker, so every sample of the epoch reads the new value.
        self._epoch = multiprocessing.Value("q", 0, lock=False)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next samples belong to (their augmentation depends on it)."""
        self._epoch.value = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index >= len(self.items):
            image = torch.zeros(3, self.height, self.width)
            return image, torch.full((self.height, self.width), NEUTRAL_INDEX, dtype=torch.int64)
        image, mask = self.sample(index)
        return normalize(image), torch.from_numpy(mask.astype(np.int64))

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 (H, W, 3), class mask uint8 (H, W)) of a real index, augmented when the dataset augments."""
        seed = sample_seed(self.seed, self._epoch.value, index)
        # A file can pass the header check and still fail to decode; replace it by another sample
        # while the split's budget allows, as the legacy trainer did, drawn from the sample's seed so
        # that runs repeat.
        for attempt in range(100):
            item, mask = self.items[index], self.masks[index]
            if not self._undecodable[index]:
                try:
                    # At the cached mask's size: the input size (resize), the image x scale.factor (crop),
                    # or the image's own (whole-image validation, which never decodes reduced).
                    image = read_resized(item.image_path, mask.shape[1], mask.shape[0])
                except TaskError as exc:
                    self._count_undecodable(index, exc)
                else:
                    if self.scale.crops:
                        image, mask = self._crop(index, image, mask, np.random.default_rng([seed, CROP_STREAM]))
                    if self.augment is None:
                        return image, mask
                    return self.augment(image, mask, seed)
            index = int(np.random.default_rng([seed, REPLACEMENT_STREAM, attempt]).integers(len(self.items)))
        raise TaskError("no readable sample found after 100 tries", where=f"{self.budget.split} split")

    def _count_undecodable(self, index: int, error: TaskError) -> None:
        """Spend the budget on the item's file the first time any worker finds it undecodable."""
        with self._undecodable.get_lock():
            first = not self._undecodable[index]
            self._undecodable[index] = 1
        if first:
            self.budget.spend(self.items[index].image_path, error)


    def _crop(
        self, index: int, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        centre = None
        pixels = self.foreground_pixels[index] if self.foreground_pixels else ()
        if pixels and rng.random() < self.foreground:
            # A class first, then one of its pixels, so that a rare class is drawn as often as a common one.
            of_class = pixels[rng.integers(len(pixels))]
            centre = of_class[rng.integers(len(of_class))]
        rows, cols = mask.shape
        top = crop_origin(rows, self.height, None if centre is None else int(centre[0]), rng)
        left = crop_origin(cols, self.width, None if centre is None else int(centre[1]), rng)
        return (
            cut(image, top, left, self.height, self.width, PAD_COLOR),
            cut(mask, top, left, self.height, self.width, NEUTRAL_INDEX),
        )


class WholeImageDataset(SegmentationDataset):
    """(RGB uint8 (H, W, 3), target int64 (H, W)) of whole images, masks at the images' own size, for
    validating crop training by the tiled prediction that inference makes (one image per batch).
    An index from len(self) on is padding: one pixel, neutral."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index >= len(self.items):
            return torch.zeros((1, 1, 3), dtype=torch.uint8), torch.full((1, 1), NEUTRAL_INDEX, dtype=torch.int64)
        image, mask = self.sample(index)
        return torch.from_numpy(image), torch.from_numpy(mask.astype(np.int64))


# data_workers "auto" caps: beyond 8 workers a process's loader stops scaling (timm and nnU-Net use
# 4 to 12); the val loader runs a small share of the time.
AUTO_WORKER_CAP = {"train": 8, "val": 4}


def loader_workers(setting: int | str, split: str, processes_per_node: int) -> int:
    """Loader workers of a data_workers value: a count as given; "auto", the cores this process may
    run on shared among the node's training processes, at least 1 and at most AUTO_WORKER_CAP."""
    if setting != "auto":
        return int(setting)
    return max(1, min(AUTO_WORKER_CAP[split], available_cores() // max(1, processes_per_node)))


# Batches each loader worker keeps ready (torch's default, set here because throughput rests on it):
# 2 x workers batches queue up while the step runs, enough to ride out a slow sample or two.
PREFETCH_BATCHES = 2


def _limit_worker_threads(_worker_id: int) -> None:
    # Each loader worker is one process per core already; torch's own thread pool inside it would
    # oversubscribe the cores.
    torch.set_num_threads(1)


def batches(loader: Iterable) -> Iterable:
    """The loader's batches. A TaskError raised in a loader worker comes out as itself: DataLoader
    re-raises it as "Caught TaskError in DataLoader worker process N. Original Traceback ...", which
    would make the crash line a traceback instead of the message naming the file."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except TaskError as exc:
            raise unwrap_worker_error(exc) from None
        yield batch


_WORKER_ERROR = re.compile(r"\ACaught \w+ in DataLoader worker process \d+\.")
# The traceback's last exception line (after any cause): "plugin.errors.TaskError: <where>: <message>".
_EXCEPTION_LINE = re.compile(rf"{re.escape(TaskError.__module__)}\.\w+: ")


def unwrap_worker_error(error: TaskError) -> TaskError:
    """The TaskError a loader worker raised, from DataLoader's re-raised copy (others unchanged)."""
    if not _WORKER_ERROR.match(error.message):
        return error
    lines = error.message.splitlines()
    starts = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)]
    if not starts:
        return error
    return TaskError(_EXCEPTION_LINE.sub("", "\n".join(lines[starts[-1]:]), count=1).strip())


def val_shard(size: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """Rank's validation indices and how many of them are real samples.

    Every sample is in exactly one shard (indices rank, rank + world, ...). The shorter shards are
    padded up to the longest with indices >= size (the dataset's padding samples), so every rank
    runs as many batches: with SyncBatchNorm in train mode a rank with a batch less would hang the others.
    """
    shard = list(range(rank, size, world_size))
    longest = -(-size // world_size)
    return shard + [size] * (longest - len(shard)), len(shard)


def create_loader(
    dataset: SegmentationDataset,
    batch_size: int,
    workers: int,
    shuffle: bool = False,
    sampler: Iterable[int] | None = None,
) -> DataLoader:
    """A DataLoader over the dataset, batch_size images per process; `sampler` (indices) replaces shuffle."""
    # One OpenCV thread per process keeps workers from oversubscribing the cores. It must be set here,
    # in the parent, before the workers fork: OpenCV's thread pool does not survive fork, and a worker
    # that changes the thread count after the parent used the pool hangs for good.
    cv2.setNumThreads(1)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        worker_init_fn=_limit_worker_threads if workers > 0 else None,
        # Workers live across epochs: starting them anew each epoch would stall the first batches while
        # each one starts (and, outside fork, is sent the dataset with its mask cache).
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )
