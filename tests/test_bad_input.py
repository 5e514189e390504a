"""Bad task dirs: a clear error naming the file or key, exit 1, one crash line, and no checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
import torch

from plugin.config.typed import LEGACY_NETWORK, NetworkSpec
from plugin.nn.encoders import create_encoder
from plugin.nn.network import create_network, network_record
from tests.conftest import TINY_CONFIG, make_task, run_entrypoint


def first_ann(task: Path) -> Path:
    return sorted((task / "data" / "shapes").glob("*/ann/*.json"))[0]


def image_of(ann: Path) -> Path:
    return ann.parent.parent / "img" / ann.name[: -len(".json")]


def edit_ann(task: Path, change) -> Path:
    ann = first_ann(task)
    data = json.loads(ann.read_text())
    change(data)
    ann.write_text(json.dumps(data))
    return ann


def no_config(task: Path) -> str:
    (task / "task_config.json").unlink()
    return "task_config.json"


def broken_json(task: Path) -> str:
    (task / "task_config.json").write_text('{"epochs": 2,, }')
    return "task_config.json"


def schema_violation(task: Path) -> str:
    (task / "task_config.json").write_text(json.dumps(dict(TINY_CONFIG, input_size={"width": 250, "height": 64})))
    return "input_size.width: 250 is not a multiple of 16"


def no_project(task: Path) -> str:
    for path in sorted((task / "data").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    return "data"


def no_val_tag(task: Path) -> str:
    for ann in (task / "data" / "shapes").glob("*/ann/*.json"):
        data = json.loads(ann.read_text())
        data["tags"] = [{"name": "train", "value": None}]
        ann.write_text(json.dumps(data))
    return "'val'"


def image_without_annotation(task: Path) -> str:
    ann = first_ann(task)
    ann.unlink()
    return image_of(ann).name


def annotation_without_image(task: Path) -> str:
    ann = first_ann(task)
    image_of(ann).unlink()
    return ann.name


def unreadable_image(task: Path) -> str:
    image = image_of(first_ann(task))
    image.write_bytes(b"this is not an image")
    return image.name


def size_mismatch(task: Path) -> str:
    return edit_ann(task, lambda d: d.update(size={"height": 50, "width": 64})).name


def unknown_class(task: Path) -> str:
    ann = edit_ann(task, lambda d: d["objects"].append(dict(d["objects"][0], classTitle="zebra")))
    return ann.name


def malformed_geometry(task: Path) -> str:
    def change(data: dict) -> None:
        data["objects"].append({"classTitle": "box", "tags": [], "points": {"exterior": [[1, 2]], "interior": []}})

    return edit_ann(task, change).name


def write_config(task: Path, **keys) -> None:
    (task / "task_config.json").write_text(json.dumps(dict(TINY_CONFIG, **keys)))


def unknown_encoder(task: Path) -> str:
    write_config(task, network={"arch": "unet", "encoder": "resnet50"})
    return "network.encoder: 'resnet50' is not one of ['efficientnet_lite0', 'resnet18', 'resnet34']"


def unknown_arch(task: Path) -> str:
    write_config(task, network={"arch": "unet3"})
    return "invalid config (1 problem):\n  network.arch: 'unet3' is not one of ['unet', 'unet_v2']"


def encoder_with_unet_v2(task: Path) -> str:
    write_config(task, network={"arch": "unet_v2", "encoder": "resnet18"})
    return "network.encoder: unet_v2 has its own VGG16-BN encoder"


def missing_weights_file(task: Path) -> str:
    write_config(task, network={"encoder": "resnet18", "encoder_weights": str(task / "r18.pth")})
    return f"network.encoder_weights: no such weights file: '{task / 'r18.pth'}'"


def weights_of_another_encoder(task: Path) -> str:
    # resnet18's names and shapes, given to a resnet34: its extra blocks are missing.
    torch.save(create_encoder("resnet18").state_dict(), task / "r18.pth")
    write_config(task, network={"encoder": "resnet34", "encoder_weights": str(task / "r18.pth")})
    return f"{task / 'r18.pth'}: these weights are not resnet34's: 80 missing tensors (layer1.2.conv1.weight"


def input_size_off_the_network_stride(task: Path) -> str:
    # 80 is a multiple of 16 (the schema, and UNet v2) but not of 32 (the default network's encoder).
    write_config(task, input_size={"width": 80, "height": 64})
    return "input_size: width 80 must be multiples of 32 for the UNet on efficientnet_lite0 network"


def model_of_another_network(task: Path) -> str:
    (task / "model").mkdir()
    torch.save(create_network(NetworkSpec("unet", "resnet18"), 4).state_dict(), task / "model" / "model.pt")
    (task / "model" / "config.json").write_text(json.dumps({
        "class_title_to_idx": {"bg": 0, "blob": 1, "box": 2, "ring": 3}, "settings": {},
        "network": network_record(NetworkSpec("unet", "resnet18"))}))
    write_config(task, network={"arch": LEGACY_NETWORK.arch})
    return "network: the config asks for the UNet v2 (VGG16-BN) network, but model/ holds a UNet on resnet18"


CASES = [
    unknown_encoder,
    unknown_arch,
    encoder_with_unet_v2,
    missing_weights_file,
    weights_of_another_encoder,
    input_size_off_the_network_stride,
    model_of_another_network,
    no_config,
    broken_json,
    schema_violation,
    no_project,
    no_val_tag,
    image_without_annotation,
    annotation_without_image,
    unreadable_image,
    size_mismatch,
    unknown_class,
    malformed_geometry,
]


@pytest.mark.parametrize("break_task", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_fails_clearly(tmp_path, break_task):
    task = make_task(tmp_path / "task")
    (task / "results").mkdir()
    expected = break_task(task)
    run = run_entrypoint("entrypoints.train", task)
    assert run.returncode == 1, run.stdout[-2000:]
    crashes = run.events("TASK_CRASHED")
    assert len(crashes) == 1
    crash = crashes[0]
    assert crash["level"] == "fatal" and crash["main_name"] == "UNET_V2_TRAIN"
    assert expected in crash["message"], crash["message"]
    assert isinstance(crash["stack"], list) and crash["stack"]
    assert list((task / "results").iterdir()) == []


def undecodable_train_image(task: Path) -> Path:
    """A train image whose header reads (the masks are drawn) but whose pixels do not decode."""
    train_ann = next(
        a for a in sorted((task / "data" / "shapes").glob("*/ann/*.json")) if '"train"' in a.read_text()
    )
    image = image_of(train_ann)
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    return image


# One loader worker: the decode fails in a worker process, as in production.
WORKER_CONFIG = dict(TINY_CONFIG, epochs=3, data_workers={"train": 1, "val": 0})


def test_a_file_that_fails_to_decode_is_counted_once_across_epochs(tmp_path):
    task = make_task(tmp_path / "task", dict(WORKER_CONFIG, allow_corrupted_samples={"train": 1, "val": 0}))
    image = undecodable_train_image(task)
    run = run_entrypoint("entrypoints.train", task)
    assert run.returncode == 0, run.stdout[-3000:]
    warnings = [line for line in run.lines if line["level"] == "warn" and line.get("file") == str(image)]
    assert [(w["split"], w["skipped"], w["allowed"]) for w in warnings] == [("train", 1, 1)]
    assert [line["epoch"] for line in run.events("METRICS") if line["type"] == "val"] == [1.0, 2.0, 3.0]


def test_past_the_budget_the_crash_line_names_the_file_not_the_loader_worker(tmp_path):
    task = make_task(tmp_path / "task", dict(WORKER_CONFIG, allow_corrupted_samples={"train": 0, "val": 0}))
    image = undecodable_train_image(task)
    run = run_entrypoint("entrypoints.train", task)
    assert run.returncode == 1
    (crash,) = run.events("TASK_CRASHED")
    assert crash["message"].startswith(f"{image}: ") and "allow_corrupted_samples.train = 0" in crash["message"]
    assert "DataLoader worker" not in crash["message"] and "Traceback" not in crash["message"]


def test_missing_task_dir_names_the_mount(tmp_path):
    run = run_entrypoint("entrypoints.train", tmp_path / "nowhere")
    assert run.returncode == 1
    assert "nowhere" in run.events("TASK_CRASHED")[0]["message"]


def test_corrupted_images_are_skipped_within_the_budget(tmp_path):
    task = make_task(tmp_path / "task", dict(TINY_CONFIG, allow_corrupted_samples={"train": 1, "val": 0}))
    train_ann = next(
        a for a in sorted((task / "data" / "shapes").glob("*/ann/*.json")) if '"train"' in a.read_text()
    )
    image = image_of(train_ann)
    image.write_bytes(b"garbage")
    run = run_entrypoint("entrypoints.train", task)
    assert run.returncode == 0, run.stderr[-3000:]
    warnings = [line for line in run.lines if line["level"] == "warn" and image.name in json.dumps(line)]
    assert len(warnings) == 1
    assert (task / "results" / "00000000" / "model.pt").is_file()
    assert cv2.imread(str(image)) is None  # still the broken file: nothing was rewritten
