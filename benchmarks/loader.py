"""Loader samples/s per worker process, with the default augmentations, in both scale modes:

(a) 1024x1024 JPEG -> 256x256, scale resize;
(b) 512x512 PNG -> 256x256 crops, scale crop 1.0, foreground_oversampling 0.33;

each with the reduced JPEG decode (read_resized) and with a full decode + resize_image, so the gain
shows ((b) decodes in full either way: its two figures tell the noise of the machine).

Per worker process means what one DataLoader worker sustains on a core of its own: the dataset's
__getitem__ (decode, resize, crop, augment, normalise) run serially in this process with one OpenCV
and one torch thread, as create_loader sets up its workers, counted against the CPU time it takes, so
that other processes on a shared machine do not lower it (the wall-clock rate is printed beside it).
The same sample indices and epochs, so the same augmentations, are timed for both decodes; rounds
alternate between them and the median round counts. A 1-worker create_loader run adds what collation
and the hand-over to the main process cost: its samples per CPU second of the worker process.

    .venv/bin/python -m benchmarks.loader [--images 8] [--samples 48] [--rounds 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from plugin.config.schema import TRAIN_DEFAULTS
from plugin.config.typed import RESIZE, Scale, parse_steps
from plugin.files import write_json
from plugin.format.classes import create_mapping
from plugin.format.images import read_image
from plugin.format.project import list_items, read_meta
from plugin.nn.preprocess import resize_image
from plugin.synthetic import CLASSES, MAKERS, natural_image
from plugin.training import data
from plugin.training.augment import create_augmenter
from plugin.training.data import CorruptionBudget, SegmentationDataset, create_loader, prepare_masks


@dataclass(frozen=True)
class Scenario:
    name: str
    image_size: int
    suffix: str
    input_size: int
    scale: Scale
    foreground: float


SCENARIOS = (
    Scenario("(a) 1024x1024 JPEG -> 256x256 resize", 1024, ".jpg", 256, RESIZE, 0.0),
    Scenario("(b) 512x512 PNG -> 256x256 crops (scale 1.0, foreground 0.33)", 512, ".png", 256, Scale("crop", 1.0), 0.33),
)


def make_photo_project(root: Path, images: int, size: int, suffix: str, quality: int = 90) -> Path:
    """`images` train images of size x size (photograph-like content; JPEG at `quality` with OpenCV's
    4:2:0 chroma, or PNG), each with a ring, a blob and a box."""
    rng = np.random.default_rng(size)
    (root / "ds" / "img").mkdir(parents=True)
    write_json(root / "meta.json", {"classes": CLASSES, "tags": []})
    for i in range(images):
        name = f"im_{i:03d}{suffix}"
        bgr = cv2.cvtColor(natural_image(size, size, seed=i), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(root / "ds" / "img" / name), bgr, [cv2.IMWRITE_JPEG_QUALITY, quality] if suffix == ".jpg" else [])
        objects = [{"classTitle": title, "tags": [], **MAKERS[title](rng, size)} for title in ("ring", "blob", "box")]
        ann = {"size": {"height": size, "width": size}, "tags": [{"name": "train", "value": None}], "objects": objects}
        write_json(root / "ds" / "ann" / f"{name}.json", ann)
    return root


def scenario_dataset(project: Path, scenario: Scenario) -> SegmentationDataset:
    """The train dataset that create_dataset makes for the scenario, with the default augmentations."""
    meta = read_meta(project)
    mapping = create_mapping(meta, "bg", "neutral")
    budget = CorruptionBudget.create("train", 0)
    size = (scenario.input_size, scenario.input_size)
    mask_size = scenario.scale.factor if scenario.scale.crops else size
    kept, masks = prepare_masks(list_items(project), meta, mapping, mask_size, budget)
    augment = create_augmenter(parse_steps(TRAIN_DEFAULTS["augmentations"]))
    return SegmentationDataset(kept, masks, size, budget, augment, 0, scenario.scale, scenario.foreground)


def _full_decode(path: Path, width: int, height: int) -> np.ndarray:
    return resize_image(read_image(path), width, height)


@contextmanager
def decoding(reduced: bool) -> Iterator[None]:
    """Samples decode as training does (reduced), or as before it (full decode + resize_image). The
    dataset's module attribute is swapped: forked loader workers inherit it, and training has no switch."""
    original = data.read_resized
    data.read_resized = original if reduced else _full_decode
    try:
        yield
    finally:
        data.read_resized = original


def _plan(dataset: SegmentationDataset, samples: int) -> list[tuple[int, int]]:
    """(epoch, index) of `samples` samples: whole epochs in order, so every image counts alike."""
    return [(k // len(dataset), k % len(dataset)) for k in range(samples)]


def time_getitem(dataset: SegmentationDataset, plan: list[tuple[int, int]]) -> tuple[float, float]:
    """(samples per CPU second, samples per wall-clock second) of dataset[index] over the plan, in this process."""
    cpu, wall = time.process_time(), time.perf_counter()
    for epoch, index in plan:
        dataset.set_epoch(epoch)
        dataset[index]
    return len(plan) / (time.process_time() - cpu), len(plan) / (time.perf_counter() - wall)


def time_decode(dataset: SegmentationDataset, plan: list[tuple[int, int]]) -> float:
    """CPU milliseconds per sample of the decode and resize alone."""
    cpu = time.process_time()
    for _epoch, index in plan:
        mask = dataset.masks[index]
        data.read_resized(dataset.items[index].image_path, mask.shape[1], mask.shape[0])
    return 1000 * (time.process_time() - cpu) / len(plan)


def time_one_worker_loader(dataset: SegmentationDataset, samples: int, batch: int) -> float:
    """Samples per CPU second of the worker process of a 1-worker create_loader, its start included."""
    epochs = -(-samples // len(dataset))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    loader = create_loader(dataset, batch, 1, sampler=range(len(dataset)))
    seen = 0
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        seen += sum(len(images) for images, _targets in loader)
    # The persistent worker is joined when its loader goes; only then does its CPU time count here.
    del loader
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seen / (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)


def bench_scenario(root: Path, scenario: Scenario, images: int, samples: int, rounds: int, batch: int) -> dict:
    """Median per-worker figures of one scenario, for reduced and full decoding."""
    project = make_photo_project(root / scenario.suffix.strip("."), images, scenario.image_size, scenario.suffix)
    dataset = scenario_dataset(project, scenario)
    plan = _plan(dataset, samples)
    figures: dict[str, dict[str, list[float]]] = {
        mode: {"getitem": [], "wall": [], "decode": [], "loader": []} for mode in ("reduced", "full")
    }
    with decoding(True):
        time_getitem(dataset, plan[: len(dataset)])  # warm-up: page cache, albumentations, allocator
    for _ in range(rounds):
        for mode, by_key in figures.items():
            with decoding(mode == "reduced"):
                cpu_rate, wall_rate = time_getitem(dataset, plan)
                by_key["getitem"].append(cpu_rate)
                by_key["wall"].append(wall_rate)
                by_key["decode"].append(time_decode(dataset, plan))
                by_key["loader"].append(time_one_worker_loader(dataset, samples, batch))
    return {mode: {key: float(np.median(values)) for key, values in by_key.items()} for mode, by_key in figures.items()}


def report(scenario: Scenario, figures: dict) -> str:
    reduced, full = figures["reduced"], figures["full"]
    return (
        f"loader per worker process, {scenario.name}, default augmentations: {reduced['getitem']:.1f} samples/s "
        f"with the reduced decode, {full['getitem']:.1f} with a full decode ({reduced['getitem'] / full['getitem']:.2f}x) "
        f"[wall clock {reduced['wall']:.1f} vs {full['wall']:.1f}]; decode + resize alone {reduced['decode']:.1f} vs "
        f"{full['decode']:.1f} ms/sample; a 1-worker DataLoader: {reduced['loader']:.1f} vs {full['loader']:.1f} "
        "samples per worker CPU second"
    )


@contextmanager
def one_thread() -> Iterator[None]:
    """One OpenCV and one torch thread, as create_loader gives its workers; the counts before are restored
    (create_loader leaves OpenCV at one thread itself)."""
    opencv, torch_threads = cv2.getNumThreads(), torch.get_num_threads()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(opencv)
        torch.set_num_threads(torch_threads)


def bench_loader_per_worker(root: Path, images: int, samples: int, rounds: int, batch: int) -> None:
    """Print the figures of both scenarios and the machine's load (callable from benchmarks/run.py)."""
    load = os.getloadavg()[0]
    with one_thread():
        for scenario in SCENARIOS:
            print(report(scenario, bench_scenario(root, scenario, images, samples, rounds, batch)))
    # CPU time shields the figures from other processes' load far better than the wall clock, not
    # wholly: a core shared by hyper-threads or caches shared with a busy neighbour still slow them.
    print(f"(load average {load:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="images per scenario")
    parser.add_argument("--samples", type=int, default=48, help="samples timed per round and measure")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median counts")
    parser.add_argument("--batch", type=int, default=8, help="batch of the 1-worker DataLoader")
    args = parser.parse_args()
    print(f"reproduce: .venv/bin/python -m benchmarks.loader --images {args.images} --samples {args.samples} "
          f"--rounds {args.rounds} --batch {args.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        bench_loader_per_worker(Path(tmp), args.images, args.samples, args.rounds, args.batch)


if __name__ == "__main__":
    main()
