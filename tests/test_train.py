"""The train entrypoint end to end on real task dirs: outputs, log lines, weight init and config wiring."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from plugin.config.load import read_train_config
from plugin.config.typed import TrainConfig
from plugin.format.project import list_items
from plugin.synthetic import create_project
from plugin.training.task import image_sizes, presented_scale
from tests.conftest import ISBI, TINY_CONFIG, make_task, run_entrypoint

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_full_run_writes_checkpoints_and_agent_log(trained_task):
    root, run = trained_task
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.lines  # every stdout line is JSON
    for line in lines:
        assert isinstance(line["message"], str)
        assert line["level"] in {"debug", "info", "warn", "error", "fatal"}
        assert TIMESTAMP.match(line["timestamp"]), line["timestamp"]

    progress = [p for p in run.events("PROGRESS") if p["subtask"] == "Model training: "]
    assert progress[0]["current"] == 0 and progress[-1]["current"] == progress[-1]["total"] == 2  # 4 images / batch 2

    train_metrics = [m for m in run.events("METRICS") if m["type"] == "train"]
    assert [m["epoch"] for m in train_metrics] == [0.5, 1.0]
    assert all(isinstance(m["metrics"]["loss"], float) for m in train_metrics)
    val = [m for m in run.events("METRICS") if m["type"] == "val"]
    assert len(val) == 1 and val[0]["epoch"] == 1.0
    assert {"loss", "accuracy", "mean_iou"} <= set(val[0]["metrics"])

    checkpoints = run.events("CHECKPOINT")
    assert [c["id"] for c in checkpoints] == [0] and checkpoints[0]["subdir"] == "00000000"
    assert checkpoints[0]["best_now"] is True
    assert checkpoints[0]["optional"]["epoch"] == 1.0
    assert checkpoints[0]["optional"]["val_metrics"]["loss"] == val[0]["metrics"]["loss"]

    folder = root / "results" / "00000000"
    assert sorted(p.name for p in (root / "results").iterdir()) == ["00000000"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.pt"]
    assert checkpoints[0]["sizeb"] == sum(p.stat().st_size for p in folder.iterdir())
    assert (root / "tmp" / "train_log.jsonl").is_file()
    # The defaults: AdamW and poly, half an epoch (1 of the 2 iterations) of warmup.
    [optimizer] = [line for line in lines if "optimizer" in line]
    assert optimizer["optimizer"] == {"name": "adamw", "weight_decay": 0.01}
    assert optimizer["lr_schedule"]["name"] == "poly"
    assert (optimizer["warmup_iterations"], optimizer["iterations"]) == (1, 2)


def test_checkpoint_config_keeps_the_legacy_shape(trained_task):
    root, run = trained_task
    config = json.loads((root / "results" / "00000000" / "config.json").read_text())
    # The legacy keys, plus what the network and the training scale were (legacy tools ignore those).
    assert set(config) == {"settings", "out_classes", "class_title_to_idx", "network", "presented_scale"}
    assert config["network"]["arch"] == "unet" and config["network"]["encoder"] == "efficientnet_lite0"
    assert config["class_title_to_idx"] == {"bg": 0, "blob": 1, "box": 2, "ring": 3}  # neutral stays out
    assert [c["title"] for c in config["out_classes"]] == ["ring", "blob", "box", "bg"]
    assert all(c["shape"] == "bitmap" for c in config["out_classes"])
    assert config["settings"]["input_size"] == TINY_CONFIG["input_size"]
    assert config["settings"]["lr_decreasing"]["patience"] >= 1  # merged defaults are saved in full

    state = torch.load(root / "results" / "00000000" / "model.pt", weights_only=True)
    assert all(k.startswith("module.") for k in state)  # legacy DataParallel names
    assert state["module.last_conv.weight"].shape == (4, 16, 1, 1)


def test_continue_training_from_a_checkpoint(trained_task, tmp_path):
    root, _ = trained_task
    # lr_decreasing without lr_schedule: a legacy config, trained with the legacy rule.
    config = dict(TINY_CONFIG, weights_init_type="continue_training", lr_decreasing={"patience": 2, "lr_divisor": 5})
    task = make_task(tmp_path / "task", config)
    shutil.copytree(root / "results" / "00000000", task / "model")
    run = run_entrypoint("entrypoints.train", task)
    assert run.returncode == 0, run.stderr[-3000:]
    state = torch.load(task / "model" / "model.pt", weights_only=True)
    assert [line["loaded_tensors"] for line in run.lines if "loaded_tensors" in line] == [len(state)]
    # The legacy rules: the plateau schedule with Adam without weight decay (TINY_CONFIG sets the scale).
    assert [line["legacy"] for line in run.lines if "legacy" in line] == [
        {"lr_schedule": {"name": "plateau", "warmup_epochs": 0}, "optimizer": {"name": "adam", "weight_decay": 0}}]
    [optimizer] = [line for line in run.lines if "optimizer" in line]
    assert optimizer["optimizer"]["name"] == "adam" and optimizer["lr_schedule"]["name"] == "plateau"
    assert (task / "results" / "00000000" / "model.pt").is_file()


def test_continue_training_refuses_a_different_class_mapping(trained_task, tmp_path):
    root, _ = trained_task
    config = dict(TINY_CONFIG, weights_init_type="continue_training")
    task = make_task(tmp_path / "task", config)
    shutil.copytree(root / "results" / "00000000", task / "model")
    saved = json.loads((task / "model" / "config.json").read_text())
    saved["class_title_to_idx"] = {"bg": 0, "blob": 1, "box": 2, "cell": 3}
    (task / "model" / "config.json").write_text(json.dumps(saved))
    run = run_entrypoint("entrypoints.train", task)
    assert run.returncode == 1
    crash = run.events("TASK_CRASHED")[0]
    assert "cell" in crash["message"] and "ring" in crash["message"]
    assert not (task / "results").exists() or not any((task / "results").iterdir())


def test_transfer_learning_from_a_checkpoint_of_other_classes(trained_task, tmp_path):
    root, _ = trained_task
    task = make_task(tmp_path / "task", dict(TINY_CONFIG, class_weights="auto"))
    shutil.copytree(root / "results" / "00000000", task / "model")
    meta = json.loads((task / "data" / "shapes" / "meta.json").read_text())
    meta["classes"] = [c for c in meta["classes"] if c["title"] != "box"]
    (task / "data" / "shapes" / "meta.json").write_text(json.dumps(meta))
    for ann in (task / "data" / "shapes").glob("*/ann/*.json"):
        data = json.loads(ann.read_text())
        data["objects"] = [o for o in data["objects"] if o["classTitle"] != "box"]
        ann.write_text(json.dumps(data))
    run = run_entrypoint("entrypoints.train", task)
    assert run.returncode == 0, run.stderr[-3000:]
    [loaded] = [line["loaded_tensors"] for line in run.lines if "loaded_tensors" in line]
    assert loaded == len(torch.load(task / "model" / "model.pt", weights_only=True)) - 2  # not last_conv's two
    auto = [line for line in run.lines if "class_weights" in line]
    assert len(auto) == 1 and list(auto[0]["class_weights"]) == ["bg", "blob", "ring"]
    state = torch.load(task / "results" / "00000000" / "model.pt", weights_only=True)
    assert state["module.last_conv.weight"].shape == (3, 16, 1, 1)


def test_class_weights_of_the_wrong_length_name_the_class_order(tmp_path):
    task = make_task(tmp_path / "task", dict(TINY_CONFIG, class_weights=[1, 2]))
    run = run_entrypoint("entrypoints.train", task)
    assert run.returncode == 1
    crash = run.events("TASK_CRASHED")[0]["message"]
    assert "class_weights" in crash and "4 classes" in crash and "bg, blob, box, ring" in crash


@pytest.mark.skipif(not ISBI.is_dir(), reason="../shared/data/isbi2012-membranes is not beside the repo")
def test_a_few_iterations_on_the_isbi_membranes(tmp_path):
    task = tmp_path / "task"
    (task / "data").mkdir(parents=True)
    (task / "data" / "isbi").symlink_to(ISBI, target_is_directory=True)
    config = dict(TINY_CONFIG, batch_size={"train": 6, "val": 6}, val_every=1)
    (task / "task_config.json").write_text(json.dumps(config))
    run = run_entrypoint("entrypoints.train", task)
    assert run.returncode == 0, run.stderr[-3000:]
    val = [m for m in run.events("METRICS") if m["type"] == "val"][0]["metrics"]
    assert set(val) >= {"loss", "accuracy", "dice", "iou/bg", "iou/membrane", "mean_iou"}
    train_progress = [p for p in run.events("PROGRESS") if p["subtask"] == "Model training: "]
    assert train_progress[-1]["total"] == 3  # 18 train slices / batch 6
    assert [c["subdir"] for c in run.events("CHECKPOINT")] == ["00000000"]



def test_checkpoints_record_the_scale_training_presented(tmp_path):
    # Resize training of 96 px images at a 64 x 32 input: input / image side per axis (the median over
    # the train images). Crop training: the factor.
    sizes = image_sizes(list_items(create_project(tmp_path / "p", n_train=3, n_val=0, size=96, seed=0)))
    assert sizes == [(96, 96)] * 3
    (tmp_path / "task_config.json").write_text(json.dumps({"input_size": {"width": 64, "height": 32},
                                                           "scale": {"mode": "resize", "factor": 1.0}}))
    config = read_train_config(tmp_path / "task_config.json")
    assert presented_scale(config, sizes) == {"x": 64 / 96, "y": 32 / 96}
    crop = TrainConfig.from_dict({**config.raw, "scale": {"mode": "crop", "factor": 0.5}})
    assert presented_scale(crop, sizes) == {"x": 0.5, "y": 0.5}
