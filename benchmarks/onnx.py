"""onnxruntime against torch: CPU inference images/s on the same inputs with the same seeded model.

1. full_image on size x size images resized to the input, a batch per forward.
2. sliding_window on size x size images, windows per forward.

Each runs the whole inference task (infer_task, in-process, after a warm-up run) once per backend,
interleaved and best of --repeats, and beside it each network alone (Predictor.network) over the same
network inputs, so that the forward's share of the difference shows. The model is exported once per
task dir (`sly-unet export`'s code), which is timed too.

`.venv/bin/python -m benchmarks.onnx` runs both; `--only full_image` or `--only sliding_window` one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.inference import Timing, full_image_task, sliding_window_task, timed_task
from plugin import agent_log
from plugin.inference.export import export_onnx
from plugin.inference.predictor import Predictor, load_predictor
from plugin.task_dir import TaskDir

BACKENDS = ("torch", "onnxruntime")


def _network_alone(predictor: Predictor, inputs: torch.Tensor, batch: int) -> Timing:
    """The predictor's network alone over `inputs`, `batch` at a time."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for i in range(0, len(inputs), batch):
            predictor.network(inputs[i : i + batch])
    return Timing(time.perf_counter() - start, time.process_time() - cpu)


def _compare(name: str, task: TaskDir, inputs: torch.Tensor, batch: int, images: int, repeats: int,
             detail: str, command: str) -> dict[str, float]:
    """Whole task and network alone per backend, best of `repeats`; prints them, returns task images/s.

    Beside images/s of wall time, images per CPU second (every thread of this process): on a shared
    machine it moves less with the other processes' load.
    """
    start = time.perf_counter()
    export_onnx(task.model_dir, task.model_dir / "model.onnx")
    export_s = time.perf_counter() - start
    predictors = {b: load_predictor(task.model_dir, 0, backend=b) for b in BACKENDS}
    mode = json.loads(task.config_path.read_text())["mode"]  # make_task's
    configs = {b: json.dumps({"model": {"backend": b}, "mode": mode}) for b in BACKENDS}
    wholes: dict[str, list[Timing]] = {b: [] for b in BACKENDS}
    alone: dict[str, list[Timing]] = {b: [] for b in BACKENDS}
    for round_ in range(repeats + 1):  # round 0 warms up: allocators, kernels, page cache
        for backend in BACKENDS:
            task.config_path.write_text(configs[backend])
            whole = timed_task(task)
            network = _network_alone(predictors[backend], inputs, batch)
            if round_:
                wholes[backend].append(whole)
                alone[backend].append(network)

    def rate(timings: list[Timing]) -> tuple[float, float]:
        return images / min(t.wall for t in timings), images / min(t.cpu for t in timings)

    rates = {b: rate(wholes[b]) for b in BACKENDS}
    nets = {b: rate(alone[b]) for b in BACKENDS}
    print(f"{name}: {images} images of {detail}, CPU ({torch.get_num_threads()} torch threads), best of {repeats}:")
    for backend in BACKENDS:
        (whole, whole_cpu), (net, net_cpu) = rates[backend], nets[backend]
        print(f"  {backend:12s} whole task {whole:.3f} images/s ({whole_cpu:.3f} per CPU s), network alone "
              f"{net:.3f} images/s ({net_cpu:.3f} per CPU s); {predictors[backend].network.name}")
    ratio = {k: [v["onnxruntime"][i] / v["torch"][i] for i in (0, 1)] for k, v in (("whole", rates), ("net", nets))}
    print(f"  onnxruntime / torch: whole task {ratio['whole'][0]:.2f}x ({ratio['whole'][1]:.2f}x per CPU s), network "
          f"alone {ratio['net'][0]:.2f}x ({ratio['net'][1]:.2f}x per CPU s); export took {export_s:.1f} s")
    print(f"  reproduce: {command}")
    return {b: rates[b][0] for b in BACKENDS}


def bench_full_image(tmp: Path, images: int, size: int, batch: int, repeats: int) -> dict[str, float]:
    task, inputs = full_image_task(tmp, images, size, size, batch)
    command = (f".venv/bin/python -m benchmarks.onnx --only full_image --images {images} --size {size} "
               f"--batch {batch} --repeats {repeats}")
    return _compare("full_image", task, inputs, batch, images, repeats,
                    f"{size}x{size} at input {size}, {batch} per forward", command)


def bench_sliding_window(tmp: Path, images: int, size: int, window: int, overlap: int, input_size: int, batch: int,
                         repeats: int) -> dict[str, float]:
    task, inputs = sliding_window_task(tmp, images, size, window, overlap, input_size, batch)
    command = (f".venv/bin/python -m benchmarks.onnx --only sliding_window --sw-images {images} --sw-size {size} "
               f"--window {window} --overlap {overlap} --sw-input {input_size} --sw-batch {batch} --repeats {repeats}")
    detail = (f"{size}x{size}, {len(inputs) // images} windows each of {window} px (overlap {overlap}, input "
              f"{input_size}, {batch} per forward)")
    return _compare("sliding_window", task, inputs, batch, images, repeats, detail, command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("full_image", "sliding_window"), help="run one benchmark")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--images", type=int, default=8, help="full_image: images in the project")
    parser.add_argument("--size", type=int, default=256, help="full_image: image side, also the model input")
    parser.add_argument("--batch", type=int, default=4, help="full_image: images per forward")
    parser.add_argument("--sw-images", type=int, default=1, help="sliding_window: images in the project")
    parser.add_argument("--sw-size", type=int, default=1024, help="sliding_window: image side")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--sw-input", type=int, default=128, help="sliding_window: model input side")
    parser.add_argument("--sw-batch", type=int, default=8, help="sliding_window: windows per forward")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # The tasks' own log lines go to a file, not over the figures.
        with open(tmp / "agent.log", "w") as agent_lines:
            agent_log.setup("json", stream=agent_lines)
            if args.only in (None, "full_image"):
                bench_full_image(tmp, args.images, args.size, args.batch, args.repeats)
            if args.only in (None, "sliding_window"):
                bench_sliding_window(tmp, args.sw_images, args.sw_size, args.window, args.overlap, args.sw_input,
                                     args.sw_batch, args.repeats)


if __name__ == "__main__":
    main()
