"""`make demo`: a synthetic task dir, a short CPU training run on it, and where to find the results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from plugin.errors import TaskError
from plugin.synthetic import make_project
from plugin.task_dir import TaskDir
from plugin.train import TrainSummary, train_task

# Sized for about two minutes on two CPU cores: 64x64 inputs, 48 training images, 12 epochs.
DEMO_CONFIG = {
    "input_size": {"width": 64, "height": 64},
    "batch_size": {"train": 8, "val": 8},
    "data_workers": {"train": 1, "val": 0},
    "epochs": 12,
    "val_every": 3,
    "lr": 0.002,
    "lr_decreasing": {"patience": 2, "lr_divisor": 5},
    "gpu_devices": [0],
}
# Four model classes (bg, ring, blob, box): guessing scores a mean IoU far below this.
MIN_MEAN_IOU = 0.5


def make_demo_task(root: Path, seed: int = 0) -> TaskDir:
    """A fresh task dir: task_config.json, data/<project>/ and empty results/ and tmp/."""
    if root.exists():
        shutil.rmtree(root)
    task = TaskDir(root)
    make_project(task.data_dir / "synthetic_shapes", n_train=48, n_val=12, size=96, seed=seed)
    task.config_path.write_text(json.dumps(DEMO_CONFIG, indent=4))
    return task


def run_demo(out_dir: Path) -> TrainSummary:
    task = make_demo_task(out_dir / "task")
    summary = train_task(task)
    miou = summary.final_val_metrics["mean_iou"]
    print(
        "\nDemo finished.\n"
        f"  task dir:        {task.root}\n"
        f"  checkpoints:     {task.results_dir} ({len(summary.checkpoints)} folders; best: {summary.best_checkpoint.name})\n"
        f"  agent log:       {task.tmp_dir / 'train_log.jsonl'}\n"
        f"  final val mIoU:  {miou:.3f} (accuracy {summary.final_val_metrics['accuracy']:.3f})",
        flush=True,
    )
    if miou < MIN_MEAN_IOU:
        raise TaskError(f"the demo model reached a val mean IoU of only {miou:.3f}; expected at least {MIN_MEAN_IOU}")
    return summary
