"""Inference benchmarks: whole inference tasks against a bare batched forward, and peak memory.

1. full_image on 1024x1024 images: images/s of the whole task (infer_task on a task dir, in-process,
   after a warm-up run) against a bare batched forward over the same network inputs, with the same
   model, precision and batch size; target: the whole run takes at most 1.15x the bare forward.
2. sliding_window on 1024x1024 images: the same comparison, the bare forward over the same windows.
3. Peak memory of a whole sliding_window run on one 4096x4096 image with a 5-class model, measured in
   a process that starts small (its own VmHWM at exit), beside /usr/bin/time -v's figure for the same
   run; target < 2 GB.

`.venv/bin/python -m benchmarks.inference` runs all three; `make bench` runs them from benchmarks/run.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks.peak_memory import measured_command, read_peak
from plugin import agent_log
from plugin.config.schema import DEFAULT_NETWORK
from plugin.format.images import read_image
from plugin.inference.predictor import Predictor, load_predictor
from plugin.inference.task import infer_task
from plugin.nn.network import create_network, network_record
from plugin.nn.tiling import network_inputs, pad_to, window_starts
from plugin.task_dir import TaskDir

REPO = Path(__file__).resolve().parent.parent
TARGET_RATIO = 1.15
NUM_CLASSES = 5



def make_task(root: Path, images: int, size: int, input_size: int, mode: dict, seed: int = 0) -> TaskDir:
    """A task dir: `images` smooth random size x size JPEGs without objects, a seeded model of the default network
    (no scale record: whole images resized to input_size) and `mode` as the inference config."""
    rng = np.random.default_rng(seed)
    shutil.rmtree(root, ignore_errors=True)
    project = root / "data" / "bench"
    for sub in ("img", "ann"):
        (project / "ds" / sub).mkdir(parents=True)
    (project / "meta.json").write_text(json.dumps({"classes": [], "tags": []}))
    for i in range(images):
        image = cv2.GaussianBlur(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), (0, 0), 3)
        cv2.imwrite(str(project / "ds" / "img" / f"im_{i:03d}.jpg"), image)
        ann = {"size": {"height": size, "width": size}, "tags": [], "objects": []}
        (project / "ds" / "ann" / f"im_{i:03d}.jpg.json").write_text(json.dumps(ann))
    torch.manual_seed(seed)
    model_dir = root / "model"
    model_dir.mkdir()
    torch.save(create_network(DEFAULT_NETWORK.spec, NUM_CLASSES).state_dict(), model_dir / "model.pt")
    titles = ["bg"] + [f"class_{i}" for i in range(1, NUM_CLASSES)]
    config = {
        "settings": {"input_size": {"width": input_size, "height": input_size}},
        "network": network_record(DEFAULT_NETWORK.spec),
        "class_title_to_idx": {t: i for i, t in enumerate(titles)},
        "out_classes": [{"title": t, "shape": "bitmap", "color": "#FF0000"} for t in titles],
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    (root / "task_config.json").write_text(json.dumps({"mode": mode}))
    return TaskDir(root)


class _EventTimes(logging.Handler):
    """When the task's PROGRESS counter starts and when MODEL_APPLIED is logged (perf_counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event_type", None)
        if event == agent_log.EVENT_PROGRESS and record.current == 0:
            self.times["start"] = time.perf_counter()
        elif event == agent_log.EVENT_MODEL_APPLIED:
            self.times["end"] = time.perf_counter()


@dataclass(frozen=True)
class Timing:
    wall: float  # seconds
    cpu: float  # CPU seconds of this process, every thread
    load: float = 0.0  # of `wall`: config and model load, before the first PROGRESS line


def timed_task(task: TaskDir) -> Timing:
    """The whole infer_task of `task`, its results removed first."""
    shutil.rmtree(task.results_dir, ignore_errors=True)
    events = logging.getLogger("plugin.events")
    handler = _EventTimes()
    events.addHandler(handler)
    try:
        start, cpu = time.perf_counter(), time.process_time()
        infer_task(task)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        events.removeHandler(handler)
    return Timing(wall, cpu, wall - (handler.times["end"] - handler.times["start"]))


def _bare_forward(predictor: Predictor, inputs: torch.Tensor, batch: int) -> Timing:
    """The model's forward alone over `inputs` on its device, `batch` at a time, in the task's
    precision; the inputs are copied to the device beforehand."""
    network = predictor.network
    on_device = inputs.to(predictor.device)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for i in range(0, len(on_device), batch):
            network.precision.logits(network.model, on_device[i : i + batch])
    if predictor.device.type == "cuda":
        torch.cuda.synchronize(predictor.device)
    return Timing(time.perf_counter() - start, time.process_time() - cpu)


def _compare(name: str, task: TaskDir, inputs: torch.Tensor, batch: int, images: int, repeats: int,
             detail: str, command: str) -> float:
    """Whole task vs bare forward, best of `repeats` each, interleaved so that load from other processes
    skews both alike; prints the figures and returns the wall-clock ratio whole / bare.

    The CPU-time ratio is printed beside it: on a shared machine it moves less with the other
    processes' load, and where the forward itself fills every core (the CPU) it is the work the
    pipeline adds, which threads cannot hide there.
    """
    predictor = load_predictor(task.model_dir, 0)
    timed_task(task)  # warm-up: allocator, kernels for these batch shapes, page cache of the images
    _bare_forward(predictor, inputs[:batch], batch)
    wholes, bares = [], []
    for _ in range(repeats):
        wholes.append(timed_task(task))
        bares.append(_bare_forward(predictor, inputs, batch))
    whole, bare = min(wholes, key=lambda t: t.wall), min(bares, key=lambda t: t.wall)
    cpu_ratio = min(t.cpu for t in wholes) / min(t.cpu for t in bares)
    ratio = whole.wall / bare.wall
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    print(f"{name}: {images} images of {detail}: whole task {images / whole.wall:.3f} images/s ({whole.wall:.1f} s, "
          f"of which {whole.load:.1f} s config and model load), bare batched forward {images / bare.wall:.3f} "
          f"images/s ({bare.wall:.1f} s) -> whole / bare {ratio:.2f}x (target <= {TARGET_RATIO}x: {verdict}), "
          f"{(whole.wall - whole.load) / bare.wall:.2f}x without the model load; CPU time {cpu_ratio:.2f}x "
          f"({predictor.device.type}, {predictor.network.precision.name}, best of {repeats})")
    print(f"  reproduce: {command}")
    return ratio


def full_image_task(tmp: Path, images: int, size: int, input_size: int, batch: int) -> tuple[TaskDir, torch.Tensor]:
    """A full_image task dir of `images` size x size images, and the network inputs its images make."""
    task = make_task(tmp / "full_image", images, size, input_size, {"name": "full_image", "batch_size": batch})
    decoded = [read_image(path) for path in sorted(task.data_dir.glob("*/*/img/*"))]
    return task, network_inputs(decoded, (input_size, input_size))


def sliding_window_task(
    tmp: Path, images: int, size: int, window: int, overlap: int, input_size: int, batch: int
) -> tuple[TaskDir, torch.Tensor]:
    """A sliding_window task dir of `images` size x size images, and the network inputs of all their windows."""
    mode = {"name": "sliding_window", "window": {"width": window, "height": window},
            "min_overlap": {"x": overlap, "y": overlap}, "batch_size": batch}
    task = make_task(tmp / "sliding_window", images, size, input_size, mode)
    tiles = []
    for path in sorted(task.data_dir.glob("*/*/img/*")):
        image = pad_to(read_image(path), window, window)
        starts = window_starts(image.shape[0], window, window - overlap)
        tiles += [image[t : t + window, left : left + window] for t in starts for left in starts]
    return task, network_inputs(tiles, (input_size, input_size))


def bench_full_image(tmp: Path, images: int, size: int, input_size: int, batch: int, repeats: int) -> float:
    task, inputs = full_image_task(tmp, images, size, input_size, batch)
    command = (f".venv/bin/python -m benchmarks.inference --only full_image --images {images} --size {size} "
               f"--input {input_size} --batch {batch} --repeats {repeats}")
    detail = f"{size}x{size}, input {input_size}, {batch} images per forward"
    return _compare("full_image", task, inputs, batch, images, repeats, detail, command)


def bench_sliding_window(tmp: Path, images: int, size: int, window: int, overlap: int, input_size: int, batch: int,
                         repeats: int) -> float:
    task, inputs = sliding_window_task(tmp, images, size, window, overlap, input_size, batch)
    command = (f".venv/bin/python -m benchmarks.inference --only sliding_window --sw-images {images} --size {size} "
               f"--window {window} --overlap {overlap} --sw-input {input_size} --sw-batch {batch} --repeats {repeats}")
    detail = (f"{size}x{size}, {len(inputs) // images} windows each of {window} px (overlap {overlap}, "
              f"input {input_size}, {batch} windows per forward)")
    return _compare("sliding_window", task, inputs, batch, images, repeats, detail, command)


def bench_inference_memory(tmp: Path, size: int, window: int, input_size: int) -> float:
    """Peak memory (GiB) of a whole sliding_window run on one size x size image, in a process of its own."""
    mode = {"name": "sliding_window", "window": {"width": window, "height": window},
            "min_overlap": {"x": 64, "y": 64}, "batch_size": 8}
    task = make_task(tmp / "memory", 1, size, input_size, mode, seed=1)
    peak_file, log_path = tmp / "memory.peak", tmp / "memory.log"
    args = ["--task-dir", str(task.root), "--log-format", "json"]
    # /usr/bin/time is a small process: the peak it reports for its child is the child's own.
    command = ["/usr/bin/time", "-v", *measured_command("entrypoints.inference", args, peak_file)]
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.run(command, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - start
    output = log_path.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"inference failed: {output[-3000:]}")
    peak = read_peak(peak_file) / 2**30
    time_kib = re.search(r"Maximum resident set size \(kbytes\): (\d+)", output)
    cross = f"{int(time_kib.group(1)) / 2**20:.2f} GiB" if time_kib else "not reported"
    print(f"inference peak memory: {peak:.2f} GiB (VmHWM of the inference process) for a whole sliding_window run "
          f"on one {size}x{size} image, {NUM_CLASSES} classes, window {window}, input {input_size}, batch 8 "
          f"({elapsed:.0f} s; target < 2 GB); /usr/bin/time -v on the same run: {cross}")
    print(f"  reproduce: .venv/bin/python -m benchmarks.inference --only memory --memory-size {size} "
          f"--memory-window {window} --memory-input {input_size} [--work DIR: keeps the task dir {task.root.name}/]")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("full_image", "sliding_window", "memory"), help="run one benchmark")
    parser.add_argument("--size", type=int, default=1024, help="image side for full_image and sliding_window")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--images", type=int, default=12, help="full_image: images in the project")
    parser.add_argument("--input", type=int, default=256, help="full_image: model input side")
    parser.add_argument("--batch", type=int, default=4, help="full_image: images per forward")
    parser.add_argument("--sw-images", type=int, default=2, help="sliding_window: images in the project")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--sw-input", type=int, default=128, help="sliding_window: model input side")
    parser.add_argument("--sw-batch", type=int, default=8, help="sliding_window: windows per forward")
    parser.add_argument("--memory-size", type=int, default=4096)
    parser.add_argument("--memory-window", type=int, default=512)
    parser.add_argument("--memory-input", type=int, default=128)
    parser.add_argument("--work", type=Path, help="keep the task dirs here (default: a temporary folder), e.g. to "
                        "rerun one with /usr/bin/time -v .venv/bin/python -m entrypoints.inference --task-dir DIR")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name) if args.work is None else args.work
        tmp.mkdir(parents=True, exist_ok=True)
        # The tasks' own log lines go to a file, as the agent's would go to its pipe, not over the figures.
        with open(tmp / "agent.log", "w") as agent_lines:
            agent_log.setup("json", stream=agent_lines)
            run(args, tmp)


def run(args: argparse.Namespace, tmp: Path) -> None:
    """The benchmarks that --only selects (all without it), their task dirs under `tmp`."""
    if args.only in (None, "full_image"):
        bench_full_image(tmp, args.images, args.size, args.input, args.batch, args.repeats)
    if args.only in (None, "sliding_window"):
        bench_sliding_window(tmp, args.sw_images, args.size, args.window, args.overlap, args.sw_input,
                             args.sw_batch, args.repeats)
    if args.only in (None, "memory"):
        bench_inference_memory(tmp, args.memory_size, args.memory_window, args.memory_input)

if __name__ == "__main__":
    main()
