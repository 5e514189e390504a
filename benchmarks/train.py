"""`make bench`, training part: how close an epoch of Loop.fit() comes to a bare loop over the same batches.

9. Train throughput: the time of a train epoch of Loop.fit() (loader, METRICS intervals, guard, PROGRESS
   included) against a bare loop of forward, loss, backward and optimizer step over the same batches
   already in memory; target <= 1.05 on the CPU. Also the share of the epoch the loop waits for the
   data loader.
10. On a CUDA device (`--device cuda`): the same for float32 against AMP, with and without
   channels_last (bare loop) and torch.compile; images/s for each.

Run alone: .venv/bin/python -m benchmarks.train [--device cuda --size 256 --images 512 --batch 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from plugin.config.schema import DEFAULT_NETWORK
from plugin.nn.network import create_network
from plugin.nn.precision import Precision, prepare_model, resolve_precision
from plugin.synthetic import create_project
from plugin.task_dir import TaskDir
from plugin.training.data import create_loader, loader_workers
from plugin.training.loop import Loop
from plugin.training.sampler import EpochSampler
from plugin.training.schedule import create_optimizer
from plugin.training.step import loss_fn
from plugin.training.task import read_datasets


class TimedLoader:
    """The train loader, counting the seconds Loop.fit() waits for each batch."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader, self.waited = loader, 0.0
        self.sampler, self.dataset = loader.sampler, loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        batches = iter(self.loader)
        while True:
            started = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.waited += time.perf_counter() - started
            yield batch


class EpochEnds(logging.Handler):
    """(wall-clock time, seconds waited for the loader) at each whole-epoch train METRICS line
    (log_every is set to one line per epoch)."""

    def __init__(self, loader: TimedLoader) -> None:
        super().__init__()
        self.loader = loader
        self.marks: list[tuple[float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "type", None) == "train" and float(getattr(record, "epoch", 0.5)).is_integer():
            self.marks.append((time.perf_counter(), self.loader.waited))


def make_task(root: Path, size: int, images: int, batch: int, workers: int | str, amp: str, compile_: bool) -> Path:
    create_project(root / "data" / "shapes", n_train=images, n_val=2, size=size, seed=0)
    config = {
        "input_size": {"width": size, "height": size}, "batch_size": {"train": batch, "val": batch},
        # Whole images resized: val batches of batch_size, as the loaders below are built (crop
        # training validates whole images one per batch, a loader this benchmark does not time).
        "scale": {"mode": "resize", "factor": 1.0},
        "data_workers": {"train": workers, "val": 0}, "epochs": 3, "val_every": 3, "amp": amp,
        "compile": compile_, "log_every": {"seconds": None, "iterations": 10**6},
    }
    (root / "task_config.json").write_text(json.dumps(config))
    return root


def time_fit(task: Path, device: torch.device) -> tuple[float, float, int]:
    """(seconds of the last train epoch of 3, seconds it waited for the loader, its images)."""
    config, mapping, train, val = read_datasets(TaskDir(task))
    workers = loader_workers(config.data_workers.train, "train", 1)
    sampler = EpochSampler(len(train), 0, 1, config.seed)
    loaders = {"train": TimedLoader(create_loader(train, config.batch_size.train, workers, sampler=sampler)),
               "val": create_loader(val, config.batch_size.val, 0)}
    ends = EpochEnds(loaders["train"])
    events = logging.getLogger("plugin.events")
    events.addHandler(ends)
    try:
        torch.manual_seed(0)
        Loop(create_network(DEFAULT_NETWORK.spec, mapping.num_classes), loaders, config, mapping, device,
             writer=None).fit()
    finally:
        events.removeHandler(ends)
    # The last epoch: loader workers and allocator warm, no validation inside it.
    (start, waited_before), (end, waited_after) = ends.marks[-2], ends.marks[-1]
    return end - start, waited_after - waited_before, len(train)


def time_bare(task: Path, device: torch.device, precision: Precision, compile_: bool) -> float:
    """Seconds of a bare loop over one epoch's batches held in memory: forward, loss, backward, step."""
    config, mapping, train, _ = read_datasets(TaskDir(task))
    loader = create_loader(train, config.batch_size.train, 0, sampler=EpochSampler(len(train), 0, 1, config.seed))
    batches = [(x.to(device), y.to(device)) for x, y in loader]
    torch.manual_seed(0)
    model = prepare_model(create_network(DEFAULT_NETWORK.spec, mapping.num_classes).to(device), precision)
    net = torch.compile(model) if compile_ else model
    optimizer = create_optimizer(model, config)
    compute_loss = loss_fn(config, mapping.num_classes)
    scaler = precision.grad_scaler()
    model.train()

    def epoch() -> None:
        for images, targets in batches:
            loss = compute_loss(precision.logits(net, images), targets)
            optimizer.zero_grad(set_to_none=True)
            (loss if scaler is None else scaler.scale(loss)).backward()
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
        _sync(device)

    epoch()  # warm-up: allocator, cuDNN's choice of kernels, compilation
    started = time.perf_counter()
    epoch()
    return time.perf_counter() - started


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train_throughput(tmp: Path, size: int, images: int, batch: int, workers: int | str, device: torch.device,
                           amp: str = "off", compile_: bool = False) -> float:
    task = make_task(tmp / f"train_{amp}_{int(compile_)}", size, images, batch, workers, amp, compile_)
    epoch_s, waited_s, count = time_fit(task, device)
    precision = resolve_precision(amp, device, training=True)
    bare_s = time_bare(task, device, precision, compile_)
    ratio = epoch_s / bare_s
    print(f"train throughput ({device.type}, amp {amp} = {precision.name}, compile {compile_}, {size}x{size}, "
          f"batch {batch}, {count} images, {loader_workers(workers, 'train', 1)} loader workers): epoch "
          f"{epoch_s:.2f} s ({count / epoch_s:.1f} images/s), bare loop {bare_s:.2f} s ({count / bare_s:.1f} "
          f"images/s) -> ratio {ratio:.3f} (target <= 1.05); waiting for the loader {waited_s / epoch_s:.1%} of the epoch")
    return ratio


def bench_gpu(tmp: Path, size: int, images: int, batch: int) -> None:
    """Images/s at `size` on CUDA: Loop.fit() against the bare loop, float32 against AMP, with and without compile;
    and the bare loop without channels_last."""
    device = torch.device("cuda")
    for amp in ("off", "auto"):
        for compile_ in (False, True):
            bench_train_throughput(tmp, size, images, batch, "auto", device, amp, compile_)
    task = make_task(tmp / "plain_layout", size, images, batch, "auto", "auto", False)
    for amp in ("off", "auto"):
        precision = resolve_precision(amp, device, training=True)
        plain = Precision(precision.device_type, precision.dtype, channels_last=False)
        seconds = time_bare(task, device, plain, False)
        print(f"bare loop without channels_last ({plain.name}): {images / seconds:.1f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--workers", default="auto")
    args = parser.parse_args()
    workers = args.workers if args.workers == "auto" else int(args.workers)
    print(f"reproduce: .venv/bin/python -m benchmarks.train --device {args.device} --size {args.size} "
          f"--images {args.images} --batch {args.batch} --workers {args.workers}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.device == "cuda":
            if not torch.cuda.is_available():
                raise SystemExit("--device cuda: this machine has no CUDA device")
            bench_gpu(Path(tmp), args.size, args.images, args.batch)
        else:
            bench_train_throughput(Path(tmp), args.size, args.images, args.batch, workers, torch.device("cpu"))


if __name__ == "__main__":
    main()
