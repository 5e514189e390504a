"""`make bench-quality`: each network and starting point against the legacy recipe on real EM slices.

Each recipe trains on the train-tagged slices of ../shared/data/isbi2012-membranes (ISBI 2012, class
`membrane`) for a fixed time budget (time_budget_minutes: 10 for the networks, 30 for the legacy recipe),
infers on the val-tagged slices with its last checkpoint, and `sly-unet evaluate` scores the output.
Printed side by side: membrane Dice, the mean of membrane and cell (background) Dice, which is the ISBI
figure NVIDIA's DeepLearningExamples report (0.890), pixel error (1 - pixel accuracy, the challenge's
figure), the training steps done and the training images per second, with the command that reproduces
them; and the two-class Dice again with test-time flips (`"tta": true`, 4 passes as nnU-Net mirrors).

A recipe whose ImageNet weights are not on this machine (resnet18/34 and VGG16-BN are downloaded into
$TORCH_HOME/hub/checkpoints, which needs network access once) is reported as skipped, with the reason.
The data set is linked into build/, never copied into the repo; every run is seeded.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from plugin.demo import create_inference_task
from plugin.files import read_json, write_json
from plugin.format.project import link_or_copy, list_items

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "isbi2012-membranes"
PROJECT = "isbi2012"
CLASS = "membrane"
BACKGROUND = "bg"
# Every recipe: enough epochs that the time budget ends the run (its LR decay follows the budget), and
# one validation (and checkpoint) at the end only, since a validation costs a few steps on this CPU.
EPOCHS = 1000
COMMON = {"data_workers": {"train": 1, "val": 0}, "seed": 0, "epochs": EPOCHS, "val_every": EPOCHS}
NETWORK_MINUTES = 10
LEGACY_MINUTES = 30
# The legacy recipe, as the legacy plugin trained: the legacy network, whole images resized to 256, no
# augmentation, Adam with the plateau rule, batch 4.
LEGACY = {"network": {"arch": "unet_v2"}, "input_size": {"width": 256, "height": 256},
          "scale": {"mode": "resize", "factor": 1.0}, "augmentations": False, "batch_size": {"train": 4, "val": 4},
          "lr": 0.001, "lr_decreasing": {"patience": 3, "lr_divisor": 5}}
ENCODERS = ("efficientnet_lite0", "resnet18", "resnet34")


def recipes() -> dict[str, tuple[dict, float]]:
    """name -> (config keys over COMMON and the defaults, minutes of training)."""
    table: dict[str, tuple[dict, float]] = {
        "default": ({}, NETWORK_MINUTES),
        # The measurement behind the default scale.mode (crop): the default with whole images resized.
        "default-resize": ({"scale": {"mode": "resize", "factor": 1.0}}, NETWORK_MINUTES),
        # The measurements behind the default batch and input size (8 crops of 256²): twice the steps
        # at half the batch, and the same pixels a step in fewer, larger crops.
        "default-batch4": ({"batch_size": {"train": 4}}, NETWORK_MINUTES),
        "default-input384-batch4": ({"input_size": {"width": 384, "height": 384}, "batch_size": {"train": 4}},
                                    NETWORK_MINUTES),
    }
    for encoder in ENCODERS:
        for weights in ("imagenet", None):
            name = f"{encoder}-{weights or 'random'}"
            table[name] = ({"network": {"arch": "unet", "encoder": encoder, "encoder_weights": weights}},
                           NETWORK_MINUTES)
    table["unet_v2-random"] = ({"network": {"arch": "unet_v2"}}, NETWORK_MINUTES)
    table["legacy"] = (LEGACY, LEGACY_MINUTES)
    return table


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


def run_recipe(name: str, work: Path, data: Path, minutes: float | None = None, seed: int = 0) -> dict:
    """Train, infer on the val slices and evaluate one recipe: the evaluate report, the training steps
    done, the train images per second and the command line; {"skipped": reason} where a recipe's
    ImageNet weights cannot be had."""
    keys, budget = recipes()[name]
    root = work / name
    if root.exists():
        subprocess.run(["rm", "-rf", str(root)], check=True)
    config = {**COMMON, **keys, "seed": seed, "time_budget_minutes": minutes or budget}
    train = make_task(root / "train", data, config)
    started = time.monotonic()
    try:
        sly_unet("train", "--task-dir", str(train), log=root / "train.log")
    except SystemExit as failed:
        if "encoder_weights" in str(failed) and "download" in str(failed):
            return {"skipped": "its ImageNet weights are not cached here and cannot be downloaded"}
        raise
    train_seconds = time.monotonic() - started
    steps = training_steps(root / "train.log")
    batch = read_json(next((train / "results").iterdir()) / "config.json")["settings"]["batch_size"]["train"]
    best = max((train / "results").iterdir())  # one validation: the only checkpoint is the best one
    reports = {}
    for name, tta in (("plain", False), ("tta", True)):
        infer = create_inference_task(root / f"infer-{name}", best, train / "data" / PROJECT, "val")
        write_json(infer.config_path, {**read_json(infer.config_path), "mode": {"name": "full_image", "tta": tta}})
        sly_unet("infer", "--task-dir", str(infer.root), log=root / f"infer-{name}.log")
        reports[name] = root / f"val_report-{name}.json"
        sly_unet("evaluate", "--gt", str(infer.data_dir), "--pred", str(infer.results_dir),
                 "--out", str(reports[name]), log=root / f"evaluate-{name}.log")
    return {**read_json(reports["plain"]), "tta": read_json(reports["tta"]), "steps": steps,
            "images_per_s": steps * batch / train_seconds, "minutes": config["time_budget_minutes"]}


def two_class_dice(report: dict) -> tuple[float, float]:
    """(membrane Dice, mean of membrane and cell Dice) of an evaluate report."""
    classes = report["classes"]
    dice = classes[CLASS]["dice"]
    return dice, (dice + classes[BACKGROUND]["dice"]) / 2


def training_steps(log: Path) -> int:
    """The optimisation steps a run made: the last count of its "Model training" PROGRESS lines."""
    steps = 0
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if str(record.get("subtask", "")).startswith("Model training"):
            steps = int(record["current"])
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the isbi2012-membranes project")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench-quality")
    parser.add_argument("--recipes", default=",".join(recipes()), help="comma-separated: " + ", ".join(recipes()))
    parser.add_argument("--minutes", type=float, help="every recipe's time budget instead of its own (quick checks)")
    parser.add_argument("--seed", type=int, default=0, help="the runs' seed (init and sample order): for the spread")
    args = parser.parse_args()
    if not (args.data / "meta.json").is_file():
        raise SystemExit(f"{args.data}: no meta.json; the benchmark needs ../shared/data/isbi2012-membranes")
    print("reproduce: .venv/bin/python -m benchmarks.quality " + shlex.join(sys.argv[1:]), flush=True)
    rows = []
    for name in args.recipes.split(","):
        result = run_recipe(name, args.work, args.data, args.minutes, args.seed)
        rows.append((name, result))
        print(f"{name}: {'skipped: ' + result['skipped'] if 'skipped' in result else 'done'}", flush=True)
    print("\nval slices of isbi2012-membranes; Dice 2-class: mean of membrane and cell Dice")
    print(f"{'recipe':<26}{'min':>5}{'Dice':>8}{'Dice 2-class':>14}{'pixel error':>13}{'steps':>7}{'img/s':>7}"
          f"{'2-class, tta':>14}")
    for name, result in rows:
        if "skipped" in result:
            print(f"{name:<26}  skipped: {result['skipped']}")
            continue
        (dice, both), (_, both_tta) = two_class_dice(result), two_class_dice(result["tta"])
        print(f"{name:<26}{result['minutes']:>5g}{dice:>8.4f}{both:>14.4f}{1 - result['pixel_accuracy']:>13.4f}"
              f"{result['steps']:>7}{result['images_per_s']:>7.2f}{both_tta:>14.4f}")


if __name__ == "__main__":
    main()
