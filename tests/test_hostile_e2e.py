"""Hostile and unusual input end to end, as a new user would try it: every accepted image format and a
symlinked image in training and inference; image, bitmap and declared-size bombs refused by every
command without allocating them; and no output written through a symbolic link.

One tiny training (64x64, 1 epoch) on a project holding every format serves as the model for the
inference runs, so the whole module costs one training (about 40 s here) and one inference on it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks.peak_memory import measured_command, read_peak
from plugin.errors import TaskError
from plugin.format.geometry import decode_bitmap
from plugin.format.images import DEFAULT_MAX_IMAGE_PIXELS, read_image
from plugin.format.masks import write_masks
from plugin.format.project import list_items
from plugin.inference.evaluate import run_evaluate
from plugin.synthetic import create_project
from tests.conftest import REPO, TINY_CONFIG, Run, make_task, run_entrypoint
from tests.test_hostile_images import (
    BITMAP_BOMB_SIDE,
    BOMB_SIDE,
    FORMATS,
    HUGE_SIDE,
    bitmap_bomb,
    png_bomb,
    write_plain,
)
from tests.test_infer import link_model

VARIANTS = [*FORMATS, "symlink"]
# A refusing process holds Python, torch and, in inference, the 244 MB model: 0.26 GB, 0.7 GB here.
# Decoding any of the bombs would take from 4.8 GB (the 40000^2 bitmap) to terabytes.
MAX_PEAK_BYTES = 1.5 * 2**30


def convert_project(project: Path, store: Path) -> dict[str, Path]:
    """Rewrite the project's images, in list order, one in each variant (the annotation renamed after the
    new file name); "symlink" moves the PNG into `store` and links it. Returns variant -> image path."""
    store.mkdir(parents=True, exist_ok=True)
    converted = {}
    for variant, item in zip(VARIANTS, list_items(project), strict=True):
        rgb = read_image(item.image_path)
        suffix, write, _ = FORMATS.get(variant, (".png", write_plain, 0))
        image = item.image_path.with_name(f"{item.image_path.stem}-{variant}{suffix}")
        item.image_path.unlink()
        if variant == "symlink":
            write(store / image.name, rgb)
            image.symlink_to(store / image.name)
        else:
            write(image, rgb)
        item.ann_path.rename(item.ann_path.with_name(f"{image.name}.json"))
        converted[variant] = image
    return converted


@pytest.fixture(scope="module")
def formats_task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], Run]:
    root = tmp_path_factory.mktemp("formats") / "task"
    make_task(root, n_train=len(VARIANTS) - 2, n_val=2)
    images = convert_project(root / "data" / "shapes", root.parent / "store")
    return root, images, run_entrypoint("entrypoints.train", root)


@pytest.fixture(scope="module")
def checkpoint(formats_task) -> Path:
    root, _, run = formats_task
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return root / "results" / "00000000"


def inference_task(root: Path, checkpoint: Path, project: Callable[[Path], object]) -> Path:
    """A task dir with the model, a full_image config and the project that project(data/shapes) writes."""
    project(root / "data" / "shapes")
    link_model(checkpoint, root / "model")
    (root / "task_config.json").write_text(json.dumps({"mode": {"name": "full_image"}}))
    return root


@pytest.fixture(scope="module")
def formats_inference(formats_task, checkpoint, tmp_path_factory) -> tuple[Path, dict[str, Path], Run]:
    """Inference with the module's model on a copy of the every-format project (symlinks kept)."""
    source = formats_task[0] / "data" / "shapes"
    root = tmp_path_factory.mktemp("formats_inference") / "task"
    inference_task(root, checkpoint, lambda data: shutil.copytree(source, data, symlinks=True))
    images = {variant: root / "data" / "shapes" / path.relative_to(source) for variant, path in formats_task[1].items()}
    return root, images, run_entrypoint("entrypoints.inference", root)


def warnings_about(run: Run, path: Path) -> list[dict]:
    return [line for line in run.lines if line["level"] in ("warn", "error") and path.name in json.dumps(line)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_reads_every_format(formats_task, checkpoint, variant: str) -> None:
    _, images, run = formats_task
    image = images[variant]
    assert image.is_symlink() == (variant == "symlink")
    assert read_image(image).shape == (64, 64, 3)
    assert not warnings_about(run, image)
    assert (checkpoint / "model.pt").is_file()


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_reads_every_format(formats_inference, variant: str) -> None:
    root, images, run = formats_inference
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    image = images[variant]
    assert not warnings_about(run, image)
    dataset = image.parent.parent.name
    out = root / "results" / "shapes"
    written = out / dataset / "img" / image.name
    # The output holds the image file itself (a hard link), never a link back into the input.
    assert not written.is_symlink() and os.path.samefile(written, os.path.realpath(image))

    # The input's objects, then the predictions: bitmaps inside the image.
    source_objects = json.loads(image.parent.parent.joinpath("ann", f"{image.name}.json").read_text())["objects"]
    objects = json.loads((out / dataset / "ann" / f"{image.name}.json").read_text())["objects"]
    assert objects[: len(source_objects)] == source_objects
    for obj in objects[len(source_objects):]:
        assert obj["classTitle"].endswith("_unet")
        mask = decode_bitmap(obj["bitmap"]["data"])
        x, y = obj["bitmap"]["origin"]
        assert 0 <= x and 0 <= y and x + mask.shape[1] <= 64 and y + mask.shape[0] <= 64


# --- bombs: every command refuses them from their headers ----------------------------------------------

def image_bomb(project: Path) -> list[str]:
    image = list_items(project)[0].image_path
    image.write_bytes(png_bomb(BOMB_SIDE, BOMB_SIDE))
    return [image.name, f"{BOMB_SIDE}x{BOMB_SIDE}", f"over the limit of {DEFAULT_MAX_IMAGE_PIXELS} pixels"]


def edit_first_annotation(project: Path, change: Callable[[dict], None]) -> Path:
    ann = list_items(project)[0].ann_path
    doc = json.loads(ann.read_text())
    change(doc)
    ann.write_text(json.dumps(doc))
    return ann


def bitmap_bomb_object(project: Path) -> list[str]:
    bomb = {"classTitle": "blob", "tags": [], "geometryType": "bitmap",
            "bitmap": {"origin": [0, 0], "data": bitmap_bomb()}}
    ann = edit_first_annotation(project, lambda doc: doc["objects"].append(bomb))
    return [ann.name, f"{BITMAP_BOMB_SIDE}x{BITMAP_BOMB_SIDE}", "over the limit"]


def huge_declared_size(project: Path) -> list[str]:
    ann = edit_first_annotation(project, lambda doc: doc.update(size={"height": HUGE_SIDE, "width": HUGE_SIDE}))
    return [ann.name, f"{HUGE_SIDE}x{HUGE_SIDE}", "over the limit"]


BOMBS = {"image": image_bomb, "bitmap": bitmap_bomb_object, "declared_size": huge_declared_size}




def run_measured(args: list[str], logs: Path) -> tuple[Run, int]:
    """Run `python -m ...` (args from "-m" on) as the user would, and its own peak memory (bytes)."""
    assert args[0] == "-m", args
    env = {k: v for k, v in os.environ.items() if k != "SLY_TASK_DIR"}
    out, err, peak = logs.with_suffix(".out"), logs.with_suffix(".err"), logs.with_suffix(".peak")
    command = measured_command(args[1], args[2:], peak)
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=stdout, stderr=stderr, timeout=300)
    return Run(proc.returncode, out.read_text(), err.read_text()), read_peak(peak)


def train_command(root: Path, bomb: Callable[[Path], list[str]]) -> tuple[list[str], list[str], Path]:
    """(arguments, what the crash line must say, where nothing may be written)."""
    make_task(root)
    expected = bomb(root / "data" / "shapes")
    return ["-m", "entrypoints.train", "--task-dir", str(root)], expected, root / "results"


def infer_command(root: Path, bomb: Callable[[Path], list[str]], checkpoint: Path) -> tuple[list[str], list[str], Path]:
    expected: list[str] = []

    def project(data: Path) -> None:
        create_project(data, n_train=2, n_val=1, size=64, seed=1)
        expected.extend(bomb(data))

    inference_task(root, checkpoint, project)
    return ["-m", "entrypoints.inference", "--task-dir", str(root)], expected, root / "results"


def masks_command(root: Path, bomb: Callable[[Path], list[str]]) -> tuple[list[str], list[str], Path]:
    project = create_project(root / "project", n_train=2, n_val=1, size=64, seed=1)
    expected = bomb(project)
    return ["-m", "plugin.cli", "masks", "--project", str(project), "--out", str(root / "out")], expected, root / "out"


def gt_and_pred(root: Path, size: int = 64) -> tuple[Path, Path]:
    """A ground-truth project and a copy of it as the prediction (its meta with one <class>_unet class)."""
    gt = create_project(root / "gt", n_train=2, n_val=1, size=size, seed=1)
    pred = root / "pred"
    shutil.copytree(gt, pred)
    meta = json.loads((pred / "meta.json").read_text())
    meta["classes"].append({"title": "ring_unet", "shape": "bitmap", "color": "#E04040"})
    (pred / "meta.json").write_text(json.dumps(meta))
    return gt, pred


def evaluate_command(root: Path, bomb: Callable[[Path], list[str]]) -> tuple[list[str], list[str], Path]:
    gt, pred = gt_and_pred(root)
    expected = bomb(gt)
    args = ["-m", "plugin.cli", "evaluate", "--gt", str(gt), "--pred", str(pred), "--out", str(root / "metrics.json")]
    return args, expected, root / "metrics.json"


COMMANDS = {
    "train": ("UNET_V2_TRAIN", train_command),
    "infer": ("UNET_V2_INFERENCE", infer_command),
    "masks": ("UNET_V2_MASKS", masks_command),
    "evaluate": ("UNET_V2_EVALUATE", evaluate_command),
}


@pytest.mark.parametrize("bomb", BOMBS)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_bombs_without_allocating_them(tmp_path, request, command: str, bomb: str) -> None:
    main_name, prepare = COMMANDS[command]
    if command == "infer":  # only inference waits for the module's training, for its model
        prepare = functools.partial(prepare, checkpoint=request.getfixturevalue("checkpoint"))
    args, expected, output = prepare(tmp_path / "task", BOMBS[bomb])
    run, peak = run_measured([*args, "--log-format", "json"], tmp_path / "run")
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    crashes = run.events("TASK_CRASHED")
    assert len(crashes) == 1 and crashes[0]["main_name"] == main_name
    for part in expected:
        assert part in crashes[0]["message"], crashes[0]["message"]
    assert peak < MAX_PEAK_BYTES, f"peak memory {peak / 2**30:.2f} GiB"
    assert not output.exists() or not any(p.is_file() for p in output.rglob("*"))


@pytest.mark.parametrize("command", ["masks", "evaluate"])
def test_the_pixel_limit_is_an_option_of_masks_and_evaluate(tmp_path, command: str) -> None:
    args, _, _ = COMMANDS[command][1](tmp_path / "task", lambda project: [])

    def run_with(limit: int) -> Run:
        return run_measured([*args, "--max-image-pixels", str(limit), "--log-format", "json"], tmp_path / "run")[0]

    refused = run_with(64 * 64 - 1)
    assert refused.returncode == 1
    message = refused.events("TASK_CRASHED")[0]["message"]
    assert "is 64x64 (width x height) = 4096 pixels, over the limit of 4095 pixels" in message
    assert run_with(64 * 64).returncode == 0


def test_the_pixel_limit_is_a_config_key_of_train_and_inference(tmp_path, checkpoint) -> None:
    over = "is 64x64 (width x height) = 4096 pixels, over the limit of 4095 pixels (max_image_pixels"
    train = make_task(tmp_path / "train", dict(TINY_CONFIG, max_image_pixels=64 * 64 - 1))
    refused = run_entrypoint("entrypoints.train", train)
    assert refused.returncode == 1 and over in refused.events("TASK_CRASHED")[0]["message"]

    infer = inference_task(tmp_path / "infer", checkpoint, lambda data: create_project(data, 2, 1, size=64, seed=1))
    (infer / "task_config.json").write_text(json.dumps({"mode": {"name": "full_image"}, "max_image_pixels": 4095}))
    refused = run_entrypoint("entrypoints.inference", infer)
    assert refused.returncode == 1 and over in refused.events("TASK_CRASHED")[0]["message"]


# --- nothing is written through a symbolic link ----------------------------------------------------------

def link_to_elsewhere(path: Path, elsewhere: Path) -> None:
    elsewhere.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(elsewhere, target_is_directory=True)


@pytest.mark.parametrize("entrypoint, linked", [
    *[("train", linked) for linked in ("results", "tmp", "tmp/checkpoints", "tmp/resume")],
    *[("inference", linked) for linked in ("results", "tmp", "results/shapes", "tmp/shapes.partial")],
])
def test_train_and_inference_refuse_symlinked_outputs(tmp_path, entrypoint: str, linked: str) -> None:
    # Neither needs a model: output paths are checked before anything is trained or loaded.
    root = make_task(tmp_path / "task", n_train=2, n_val=1)
    if entrypoint == "inference":
        (root / "task_config.json").write_text(json.dumps({"mode": {"name": "full_image"}}))
    elsewhere = tmp_path / "elsewhere"
    link_to_elsewhere(root / linked, elsewhere)
    run = run_entrypoint(f"entrypoints.{entrypoint}", root)
    assert run.returncode == 1
    message = run.events("TASK_CRASHED")[0]["message"]
    assert message.startswith(f"{root / linked}: the output path is a symbolic link"), message
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("linked", ["", "shapes_a", "shapes_a/img_0000.png.png"])
def test_masks_refuses_symlinked_outputs(tmp_path, linked: str) -> None:
    project = create_project(tmp_path / "project", n_train=2, n_val=1, size=16, seed=1)
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    target = out / linked
    if target.suffix == ".png":
        elsewhere.mkdir()
        (elsewhere / "victim.png").write_bytes(b"keep")
        target.parent.mkdir(parents=True)
        target.symlink_to(elsewhere / "victim.png")
    else:
        link_to_elsewhere(target, elsewhere)
    with pytest.raises(TaskError, match="symbolic link") as info:
        write_masks(project, out, "bg", "neutral")
    assert info.value.where == str(target)
    assert [p.read_bytes() for p in elsewhere.iterdir()] in ([], [b"keep"])


def test_evaluate_refuses_a_symlinked_report(tmp_path, capsys) -> None:
    gt, pred = gt_and_pred(tmp_path, size=16)
    (tmp_path / "victim.json").write_text("keep")
    (tmp_path / "metrics.json").symlink_to(tmp_path / "victim.json")
    with pytest.raises(TaskError, match="symbolic link") as info:
        run_evaluate(gt, pred, "_unet", tmp_path / "metrics.json", "bg", "neutral")
    assert info.value.where == str(tmp_path / "metrics.json")
    assert (tmp_path / "victim.json").read_text() == "keep"
    assert "mean IoU" in capsys.readouterr().out  # the scores were computed; only the report was refused
