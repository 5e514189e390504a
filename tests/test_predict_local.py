"""The SDK's one-shot `predict` verb (`sly-unet predict INPUT --model DIR`, and the serve image's
`predict`): a Supervisely project in --output with the objects `sly-unet infer` predicts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from plugin.format.project import list_items
from plugin.inference.task import infer_task
from plugin.task_dir import TaskDir
from tests.conftest import REPO


def predict(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """The serve container's command with the verb `predict`, JSON logs on stdout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "entrypoints.serve", "predict", *args, "--log-format", "json"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def inferred(checkpoint, image_files, tmp_path_factory) -> tuple[Path, Path]:
    """(the input project, `sly-unet infer`'s output project of it with full_image)."""
    root = tmp_path_factory.mktemp("inferred")
    project = image_files[0].parent.parent.parent
    shutil.copytree(project, root / "data" / project.name)
    shutil.copytree(checkpoint, root / "model")
    (root / "task_config.json").write_text(json.dumps({"mode": {"name": "full_image"}}))
    return project, infer_task(TaskDir(root)).output_dir


def annotations(project: Path) -> dict[str, dict]:
    return {item.name: json.loads(item.ann_path.read_text()) for item in list_items(project)}


def test_a_project_is_written_as_infer_writes_it(checkpoint, inferred, tmp_path):
    project, want = inferred
    run = predict(str(project), "--model", str(checkpoint), "--device", "cpu", "--output", str(tmp_path / "out"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert annotations(tmp_path / "out") == annotations(want)
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == json.loads((want / "meta.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left beside it


def test_images_and_folders_become_a_project_of_predictions(checkpoint, inferred, image_files, tmp_path):
    _, want = inferred
    predicted = {name: [o for o in ann["objects"] if o["classTitle"].endswith("_unet")]
                 for name, ann in annotations(want).items()}
    assert any(predicted.values())
    folder = image_files[0].parent
    run = predict(str(folder), "--model", str(checkpoint), "--runtime", "PyTorch", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    out = tmp_path / "predictions"  # the default --output, in the working directory
    written = annotations(out)
    assert sorted(written) == sorted(p.name for p in folder.iterdir())
    assert {item.dataset for item in list_items(out)} == {folder.name}
    assert all(ann["objects"] == predicted[name] for name, ann in written.items())

    files = [str(p) for p in image_files[:2]]
    run = predict(*files, "--model", str(checkpoint), "--output", str(tmp_path / "two"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert {n: a["objects"] for n, a in annotations(tmp_path / "two").items()} == \
        {Path(f).name: predicted[Path(f).name] for f in files}


def test_bad_input_is_named(checkpoint, image_files, tmp_path):
    missing = predict(str(tmp_path / "nope.png"), "--model", str(checkpoint), "--output", str(tmp_path / "out"))
    assert missing.returncode == 1
    crash = [json.loads(line) for line in missing.stdout.splitlines() if "TASK_CRASHED" in line]
    assert len(crash) == 1 and "nope.png" in crash[0]["message"] and crash[0]["main_name"] == "UNET_V2_PREDICT"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / image_files[0].name).write_bytes(image_files[0].read_bytes())
    twice = predict(str(image_files[0]), str(tmp_path / "a" / image_files[0].name), "--model", str(checkpoint),
                    "--output", str(tmp_path / "out"))
    assert twice.returncode == 1 and "share the file name" in twice.stdout
    bad_mode = predict(str(image_files[0]), "--model", str(checkpoint), "--mode", '{"name": "roi", "colour": 1}',
                       "--output", str(tmp_path / "out"))
    assert bad_mode.returncode == 1 and "--mode.colour" in bad_mode.stdout
    assert not (tmp_path / "out").exists()
