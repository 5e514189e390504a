"""`make bench-quality`: the default training recipe against the legacy one on real EM slices.

Each recipe trains on the train-tagged slices of ../shared/data/isbi2012-membranes (ISBI 2012, class
`membrane`) for the same number of epochs, infers on the val-tagged slices with its best checkpoint,
and `sly-unet evaluate` scores the output. Printed side by side: membrane Dice, membrane IoU and
pixel error (1 - pixel accuracy, the ISBI challenge's figure), with the command that reproduces them.

The data set is linked into build/, never copied into the repo; every run is seeded.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from plugin.demo import make_inference_task
from plugin.format.project import link_or_copy, list_items
from plugin.jsonfile import read_json, write_json

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "isbi2012-membranes"
PROJECT = "isbi2012"
CLASS = "membrane"
# What both recipes share: input 256, batch 4, one validation (and checkpoint) at the end only, since a
# validation costs as much as a few training steps on this CPU.
COMMON = {
    "input_size": {"width": 256, "height": 256},
    "batch_size": {"train": 4, "val": 4},
    "data_workers": {"train": 1, "val": 0},
    "lr": 0.001,
    "seed": 0,
}
# The legacy recipe, as the legacy plugin trained: whole image resized, no augmentation, Adam with the
# plateau rule. The default recipe is whatever the defaults say; "crop" is the default with native-scale
# crops, the measurement behind the default scale.mode.
RECIPES = {
    "default": {},
    "legacy": {"scale": {"mode": "resize", "factor": 1.0}, "augmentations": False,
               "lr_decreasing": {"patience": 3, "lr_divisor": 5}},
    "crop": {"scale": {"mode": "crop", "factor": 1.0}},
}


def make_task(root: Path, data: Path, config: dict) -> Path:
    """A train task dir whose project links the slices of `data` (images and annotations)."""
    project = root / "data" / PROJECT
    write_json(project / "meta.json", read_json(data / "meta.json"))
    for item in list_items(data):
        link_or_copy(item.image_path, project / item.dataset / "img" / item.name)
        link_or_copy(item.ann_path, project / item.dataset / "ann" / item.ann_path.name)
    write_json(root / "task_config.json", config)
    return root


def sly_unet(*args: str, log: Path) -> None:
    """Run the CLI in a child process, its JSON log to `log`; a failure stops the benchmark with the log's tail."""
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "plugin.cli", *args, "--log-format", "json"],
                              cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-5:]
        raise SystemExit(f"sly-unet {args[0]} failed ({log}):\n" + "\n".join(tail))


def run_recipe(name: str, work: Path, data: Path, epochs: int) -> dict:
    """Train, infer on the val slices and evaluate one recipe; the evaluate report plus the train time."""
    root = work / name
    if root.exists():
        subprocess.run(["rm", "-rf", str(root)], check=True)
    config = {**COMMON, **RECIPES[name], "epochs": epochs, "val_every": epochs}
    train = make_task(root / "train", data, config)
    started = time.monotonic()
    sly_unet("train", "--task-dir", str(train), log=root / "train.log")
    train_minutes = (time.monotonic() - started) / 60
    best = max((train / "results").iterdir())  # one validation: the only checkpoint is the best one
    infer = make_inference_task(root / "infer", best, train / "data" / PROJECT, "val")
    sly_unet("infer", "--task-dir", str(infer.root), log=root / "infer.log")
    report_path = root / "val_report.json"
    sly_unet("evaluate", "--gt", str(infer.data_dir), "--pred", str(infer.results_dir),
             "--out", str(report_path), log=root / "evaluate.log")
    return {**read_json(report_path), "train_minutes": train_minutes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the isbi2012-membranes project")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench-quality")
    # 25 epochs of 18 slices (5 steps of 4 crops or images each) fit 30 minutes of training per recipe on
    # 2 CPU cores: a step of 4 samples at 256x256 takes about 14 s there.
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--recipes", default="default,legacy", help="comma-separated: " + ", ".join(RECIPES))
    args = parser.parse_args()
    if not (args.data / "meta.json").is_file():
        raise SystemExit(f"{args.data}: no meta.json; the benchmark needs ../shared/data/isbi2012-membranes")
    print("reproduce: .venv/bin/python -m benchmarks.quality " + shlex.join(sys.argv[1:]), flush=True)
    rows = []
    for name in args.recipes.split(","):
        report = run_recipe(name, args.work, args.data, args.epochs)
        scores = report["classes"][CLASS]
        rows.append((name, scores["dice"], scores["iou"], 1 - report["pixel_accuracy"], report["train_minutes"]))
        print(f"{name}: done", flush=True)
    print(f"\nval slices of isbi2012-membranes, {args.epochs} epochs each")
    print(f"{'recipe':<10}{'Dice':>8}{'IoU':>8}{'pixel error':>13}{'train min':>11}")
    for name, dice, iou, error, minutes in rows:
        print(f"{name:<10}{dice:>8.4f}{iou:>8.4f}{error:>13.4f}{minutes:>11.1f}")


if __name__ == "__main__":
    main()
