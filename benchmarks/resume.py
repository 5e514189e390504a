"""`make bench`, resume part: what stopping and resuming a run costs.

6. The time from SIGTERM to the train entrypoint's exit, mid-step at 256x256 on the CPU with data
   loader workers running; target < 10 s (Docker's grace period before SIGKILL).
7. The size of the resume state (model, AdamW moments, counters, RNG states).
8. Writing it: seconds per write, and their share of an epoch of the demo task, which writes the
   state at each of its validations (every 2.5 epochs).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from plugin.config.load import read_train_config
from plugin.config.schema import DEFAULT_NETWORK
from plugin.demo import DEMO_CONFIG, create_demo_task
from plugin.nn.network import create_network
from plugin.synthetic import create_project
from plugin.training.schedule import create_optimizer
from plugin.training.state import Fingerprint, save_state

REPO = Path(__file__).resolve().parent.parent


def _train(task: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "SLY_TASK_DIR"}
    return subprocess.Popen(
        [sys.executable, "-m", "entrypoints.train", "--task-dir", str(task), "--log-format", "json"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )


def bench_stop(tmp: Path, size: int, repeats: int) -> tuple[float, int]:
    """Seconds from SIGTERM (two seconds into the second step) to exit, the worst of `repeats`; and
    the resume state's size in bytes."""
    # The default batch of 8, and epochs enough that the signal finds the run training (a step takes
    # about a second on this CPU in bfloat16, tens of seconds with the legacy network in float32).
    config = {"input_size": {"width": size, "height": size}, "batch_size": {"train": 8, "val": 8},
              "data_workers": {"train": 2, "val": 1}, "epochs": 100, "val_every": 100}
    times, state_size = [], 0
    for k in range(repeats):
        task = tmp / f"stop{k}"
        create_project(task / "data" / "shapes", n_train=16, n_val=2, size=size, seed=k)
        (task / "task_config.json").write_text(json.dumps(config))
        process = _train(task)
        for text in process.stdout:
            line = json.loads(text)
            if line.get("event_type") == "EventType.METRICS" and line["type"] == "train":
                break
        time.sleep(2.0)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.communicate()
        times.append(time.monotonic() - sent)
        if process.returncode != 128 + signal.SIGTERM:
            raise SystemExit(f"stop bench: the run exited {process.returncode}, not 143")
        state_size = (task / "tmp" / "resume" / "state.pt").stat().st_size
    worst = max(times)
    print(f"sigterm: exit {worst:.2f} s after SIGTERM at worst of {repeats} (runs: "
          f"{', '.join(f'{t:.2f}' for t in times)}), mid-step at {size}x{size}, batch 8, 2 loader workers; "
          f"target < 10 s (docker stop's grace period)")
    print(f"resume state: {state_size / 1e6:.0f} MB (model + AdamW moments + counters + RNG states)")
    return worst, state_size


def bench_state_write(tmp: Path, writes: int) -> float:
    """Median seconds of one resume-state write (synced), for the model and an optimizer that has stepped."""
    model = create_network(DEFAULT_NETWORK.spec, 4)
    config = read_train_config(_config_file(tmp))
    optimizer = create_optimizer(model, config)
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    durations = []
    for _ in range(writes):
        started = time.monotonic()
        save_state(tmp / "bench_state.pt", state, Fingerprint({}, {}))
        durations.append(time.monotonic() - started)
    return statistics.median(durations)


def bench_state_overhead(tmp: Path, writes: int) -> float:
    """The share of a demo-task epoch that the resume-state writes take."""
    write_s = bench_state_write(tmp, writes)
    task = create_demo_task(tmp / "demo")
    config = dict(DEMO_CONFIG, epochs=3)
    (task.config_path).write_text(json.dumps(config))
    process = _train(task.root)
    ends = []
    for text in process.stdout:
        line = json.loads(text)
        if line.get("event_type") == "EventType.METRICS" and line["type"] == "train" and line["epoch"] % 1 == 0:
            ends.append(_seconds(line["timestamp"]))
    process.wait()
    # The shortest epoch is one without a validation: training alone.
    epoch_s = min(b - a for a, b in zip(ends, ends[1:]))
    per_epoch = 1 / DEMO_CONFIG["val_every"]
    share = per_epoch * write_s / epoch_s
    print(f"resume state writes: {write_s:.2f} s each (median of {writes}), {per_epoch:g} per demo epoch of "
          f"{epoch_s:.1f} s: {100 * share:.1f}% of an epoch")
    return share


def _config_file(tmp: Path) -> Path:
    path = tmp / "config.json"
    path.write_text("{}")
    return path


def _seconds(timestamp: str) -> float:
    return dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()
