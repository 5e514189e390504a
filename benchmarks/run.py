"""`make bench`: the performance targets, printed as ratios with how to reproduce them.

1. Mask rasterization rate (annotations/s) on images up to 1,200 px with up to 12 objects; target >= 2,000/s.
2. Data loader sample rate against the rate one training step consumes samples (256x256, batch 12,
   CPU); target ratio >= 10.
3-4. Whole inference tasks (full_image, sliding_window) on 1024x1024 images against a bare batched
   forward, target <= 1.15x; peak memory of a sliding_window run on one 4096x4096 image, target < 2 GB
   (benchmarks/inference.py).
5. Data-parallel training: the step time of 1 process against 2 gloo processes on this machine (the
   same batch per process), and the share of the 2-process step spent in the gradient all-reduce.
6-8. Stopping and resuming: SIGTERM to exit at 256x256, the resume state's size, and the share of a
   demo epoch its writes take (benchmarks/resume.py).
9. Loader samples/s per worker process, reduced against full JPEG decode (benchmarks/loader.py).
10. Train throughput: a Loop.fit() epoch against a bare loop over the same batches, target <= 1.05; on
   CUDA also fp32 against AMP, channels_last and compile (benchmarks/train.py).
The masks command against the SDK and the mask cache figures run next (`make bench` runs
benchmarks/masks.py after this module).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist

from benchmarks import inference, loader, resume, train
from benchmarks.masks import bench_rasterize
from plugin.config.schema import DEFAULT_NETWORK
from plugin.format.classes import NEUTRAL_INDEX, create_mapping
from plugin.format.geometry import encode_bitmap
from plugin.format.project import list_items, read_meta
from plugin.nn.devices import WorldPlan
from plugin.nn.losses import segmentation_loss
from plugin.nn.network import create_network
from plugin.training import distributed
from plugin.training.data import CorruptionBudget, SegmentationDataset, create_loader, prepare_masks

CLASSES = [
    {"title": "poly", "shape": "polygon", "color": "#FF0000"},
    {"title": "rect", "shape": "rectangle", "color": "#00FF00"},
    {"title": "mask", "shape": "bitmap", "color": "#0000FF"},
    {"title": "neutral", "shape": "polygon", "color": "#FFFF00"},
]


def _objects(rng: np.random.Generator, width: int, height: int, count: int) -> list[dict]:
    objects = []
    for k in range(count):
        kind = ("poly", "rect", "mask", "neutral")[k % 4]
        x, y = rng.uniform(-0.1, 0.9) * width, rng.uniform(-0.1, 0.9) * height
        w, h = rng.uniform(0.05, 0.4) * width, rng.uniform(0.05, 0.4) * height
        if kind == "rect":
            points = {"exterior": [[int(x), int(y)], [int(x + w), int(y + h)]], "interior": []}
            objects.append({"classTitle": kind, "tags": [], "geometryType": "rectangle", "points": points})
        elif kind == "mask":
            mask = np.zeros((int(h) + 1, int(w) + 1), np.uint8)
            cv2.ellipse(mask, (int(w / 2), int(h / 2)), (int(w / 2), int(h / 2)), 0, 0, 360, 1, -1)
            bitmap = encode_bitmap(mask.astype(bool), (int(x), int(y)))
            objects.append({"classTitle": kind, "tags": [], "geometryType": "bitmap", "bitmap": bitmap})
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, 24))
            radius = rng.uniform(0.5, 1.0, 24)
            exterior = [[x + w * r * np.cos(a), y + h * r * np.sin(a)] for a, r in zip(angles, radius)]
            hole = [[x + 0.2 * w * np.cos(a), y + 0.2 * h * np.sin(a)] for a in angles[::3]]
            points = {"exterior": exterior, "interior": [hole]}
            objects.append({"classTitle": kind, "tags": [], "geometryType": "polygon", "points": points})
    return objects


def make_bench_project(root: Path, images: int, seed: int = 0) -> Path:
    """Images of 600..1200 px per side, 1..12 objects each, half tagged train and half val."""
    rng = np.random.default_rng(seed)
    (root / "ds" / "img").mkdir(parents=True)
    (root / "ds" / "ann").mkdir(parents=True)
    (root / "meta.json").write_text(json.dumps({"classes": CLASSES, "tags": []}))
    for i in range(images):
        width, height = (int(v) for v in rng.integers(600, 1201, 2))
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = cv2.GaussianBlur(image, (0, 0), 3)
        name = f"im_{i:03d}.jpg"
        cv2.imwrite(str(root / "ds" / "img" / name), image)
        ann = {
            "size": {"height": height, "width": width},
            "tags": [{"name": "train" if i % 2 == 0 else "val", "value": None}],
            "objects": _objects(rng, width, height, int(rng.integers(1, 13))),
        }
        (root / "ds" / "ann" / f"{name}.json").write_text(json.dumps(ann))
    return root


def bench_loader_vs_step(project: Path, size: int, batch: int, workers: int, steps: int) -> float:
    meta = read_meta(project)
    mapping = create_mapping(meta, "bg", "neutral")
    items = list_items(project)
    budget = CorruptionBudget.create("train", 0)
    kept, masks = prepare_masks(items, meta, mapping, (size, size), budget)
    loader = create_loader(SegmentationDataset(kept, masks, (size, size), budget), batch, workers, shuffle=True)

    seen, start = 0, time.perf_counter()
    for _epoch in range(2):
        for images, _targets in loader:
            seen += len(images)
    load_rate = seen / (time.perf_counter() - start)

    model = create_network(DEFAULT_NETWORK.spec, mapping.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, targets = next(iter(loader))
    model.train()
    timings = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = segmentation_loss(model(images), targets, mapping.num_classes, NEUTRAL_INDEX, 1.0, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        timings.append(time.perf_counter() - start)
    step_rate = batch / float(np.median(timings[1:]))  # the first step warms up the allocator
    ratio = load_rate / step_rate
    print(f"loader: {load_rate:.1f} samples/s ({workers} workers, {len(kept)} images of 600-1200 px, {size}x{size}, batch {batch}); "
          f"training step: {step_rate:.2f} samples/s -> ratio {ratio:.1f}x (target >= 10x)")
    return ratio


def _timed_allreduce(state: dict, bucket):  # no annotations: DDP compares them to its own types, and ours are strings
    # DDP's own hook is asynchronous and overlaps the backward pass; this one waits for each all-reduce
    # so its time can be measured: the share it reports is an upper bound of what the overlap leaves.
    start = time.perf_counter()
    buffer = bucket.buffer()
    dist.all_reduce(buffer)
    buffer.div_(dist.get_world_size())
    state["seconds"] += time.perf_counter() - start
    future = torch.futures.Future()
    future.set_result(buffer)
    return future


def _ddp_rank(ctx: distributed.DistContext, size: int, batch: int, steps: int) -> tuple[float, float]:
    """(median step seconds, median all-reduce seconds per step) of this rank."""
    torch.manual_seed(ctx.rank)
    images, targets = torch.randn(batch, 3, size, size), torch.randint(0, 4, (batch, size, size))
    torch.manual_seed(0)
    model = create_network(DEFAULT_NETWORK.spec, 4)
    net = distributed.wrap_model(model, torch.device("cpu"), ctx, sync_batchnorm=False)
    comm = {"seconds": 0.0}
    if ctx.world_size > 1:
        net.register_comm_hook(comm, _timed_allreduce)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    step_times, comm_times = [], []
    for _ in range(steps + 1):
        distributed.barrier()
        comm["seconds"] = 0.0
        start = time.perf_counter()
        loss = segmentation_loss(net(images), targets, 4, NEUTRAL_INDEX, 1.0, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_times.append(time.perf_counter() - start)
        comm_times.append(comm["seconds"])
    # The first step warms up the allocator (and lets DDP learn the static graph).
    return float(np.median(step_times[1:])), float(np.median(comm_times[1:]))


def bench_ddp(size: int, batch: int, steps: int) -> float:
    one, _ = distributed.launch(WorldPlan(1, ()), _ddp_rank, (size, batch, steps))
    two, comm = distributed.launch(WorldPlan(2, ()), _ddp_rank, (size, batch, steps))
    share = comm / two
    print(f"ddp ({os.cpu_count()} cores, {size}x{size}, batch {batch} per process, median of {steps} steps): "
          f"1 process {one:.2f} s/step ({batch / one:.2f} images/s); 2 gloo processes {two:.2f} s/step "
          f"({2 * batch / two:.2f} images/s, {one * 2 / two:.2f}x the throughput); gradient all-reduce "
          f"{comm:.2f} s = {share:.0%} of the 2-process step (timed synchronously: no overlap with backward)")
    return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--window", type=int, default=256, help="sliding_window window side")
    parser.add_argument("--infer-input", type=int, default=128, help="model input side for the inference benchmarks")
    parser.add_argument("--ddp-size", type=int, default=128, help="input side for the data-parallel benchmark")
    parser.add_argument("--ddp-batch", type=int, default=2, help="batch per process for the data-parallel benchmark")
    parser.add_argument("--ddp-steps", type=int, default=5)
    parser.add_argument("--only-ddp", action="store_true", help="run the data-parallel benchmark alone")
    parser.add_argument("--stop-repeats", type=int, default=2, help="SIGTERM runs of the stop benchmark")
    parser.add_argument("--only-resume", action="store_true", help="run the stop and resume benchmarks alone")
    args = parser.parse_args()
    if args.only_ddp:
        print(f"reproduce: .venv/bin/python -m benchmarks.run --only-ddp --ddp-size {args.ddp_size} "
              f"--ddp-batch {args.ddp_batch} --ddp-steps {args.ddp_steps}")
        bench_ddp(args.ddp_size, args.ddp_batch, args.ddp_steps)
        return
    if args.only_resume:
        print(f"reproduce: .venv/bin/python -m benchmarks.run --only-resume --stop-repeats {args.stop_repeats}")
        _bench_resume(args)
        return
    print(f"reproduce: .venv/bin/python -m benchmarks.run --images {args.images} --repeats {args.repeats} "
          f"--size {args.size} --batch {args.batch} --workers {args.workers} --steps {args.steps} "
          f"--window {args.window} --infer-input {args.infer_input} --ddp-size {args.ddp_size} "
          f"--ddp-batch {args.ddp_batch} --ddp-steps {args.ddp_steps} --stop-repeats {args.stop_repeats}  "
          "(or: make bench)")
    with tempfile.TemporaryDirectory() as tmp:
        project = make_bench_project(Path(tmp) / "bench", args.images)
        bench_rasterize(project, args.repeats)
        bench_loader_vs_step(project, args.size, args.batch, args.workers, args.steps)
        inference.bench_full_image(Path(tmp), 12, 1024, 256, 4, repeats=2)
        inference.bench_sliding_window(Path(tmp), 2, 1024, args.window, 32, args.infer_input, 8, repeats=2)
        inference.bench_inference_memory(Path(tmp), 4096, 512, args.infer_input)
        loader.bench_loader_per_worker(Path(tmp), 8, 48, 3, 8)
        train.bench_train_throughput(Path(tmp), 96, 32, 4, "auto", torch.device("cpu"))
        if torch.cuda.is_available():
            train.bench_gpu(Path(tmp), 256, 512, 32)
        else:
            print("GPU figures (train images/s fp32 vs AMP, channels_last, compile): skipped, no CUDA device here; "
                  "on one: .venv/bin/python -m benchmarks.train --device cuda --size 256 --images 512 --batch 32")
    bench_ddp(args.ddp_size, args.ddp_batch, args.ddp_steps)
    _bench_resume(args)


def _bench_resume(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        resume.bench_stop(Path(tmp), 256, args.stop_repeats)
        resume.bench_state_overhead(Path(tmp), writes=3)


if __name__ == "__main__":
    main()
