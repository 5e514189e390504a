"""The inference pipeline on real task dirs with a seeded model: batched full_image, bf16 autocast, errors, stops."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from plugin.config.typed import LEGACY_NETWORK
from plugin.errors import TaskError
from plugin.format.project import list_items
from plugin.inference import modes
from plugin.inference.predictor import load_predictor
from plugin.inference.task import infer_task
from plugin.nn.network import create_network
from plugin.synthetic import create_project
from plugin.task_dir import TaskDir
from tests.conftest import REPO

MAPPING = {"bg": 0, "blob": 1, "box": 2, "ring": 3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A seeded, untrained model; its 32 px input keeps the forwards short on a CPU."""
    torch.manual_seed(0)
    model = create_network(LEGACY_NETWORK, len(MAPPING))
    root = tmp_path_factory.mktemp("seeded") / "model"
    root.mkdir()
    torch.save(model.state_dict(), root / "model.pt")
    config = {"settings": {"input_size": {"width": 32, "height": 32}}, "class_title_to_idx": MAPPING, "out_classes": []}
    (root / "config.json").write_text(json.dumps(config))
    return root


def make_task(root: Path, model_dir: Path, config: dict) -> TaskDir:
    """Five 64 px images in two datasets and two 80x72 ones in a third, listed first, so that batches mix sizes."""
    project = create_project(root / "data" / "shapes", n_train=3, n_val=2, size=64, seed=5)
    other = create_project(root / "other", n_train=3, n_val=0, size=80, seed=6)
    shutil.move(str(other / "shapes_a"), project / "big")
    for item in list_items(project):
        if item.dataset == "big":
            image = cv2.imread(str(item.image_path), cv2.IMREAD_UNCHANGED)
            cv2.imwrite(str(item.image_path), image[:72])  # 80 wide, 72 high; the objects need not fit
            doc = json.loads(item.ann_path.read_text())
            doc["size"] = {"height": 72, "width": 80}
            item.ann_path.write_text(json.dumps(doc))
    (root / "model").mkdir()
    for f in model_dir.iterdir():
        os.link(f, root / "model" / f.name)
    (root / "task_config.json").write_text(json.dumps(config))
    return TaskDir(root)


def written(out: Path) -> dict[str, dict]:
    return {f"{i.dataset}/{i.name}": json.loads(i.ann_path.read_text()) for i in list_items(out)}


def saved_probabilities(doc: dict) -> list[np.ndarray]:
    return [
        np.load(io.BytesIO(zlib.decompress(base64.b64decode(label["multichannelBitmap"]["data"]))))
        for label in doc["customBigData"]["probabilityLabels"]
    ]


def test_batched_full_image_writes_what_per_image_prediction_does(tmp_path, model_dir):
    outputs = {}
    for batch_size in (1, 3):
        mode = {"name": "full_image", "batch_size": batch_size, "save_probabilities": True}
        task = make_task(tmp_path / f"batch{batch_size}", model_dir, {"mode": mode})
        summary = infer_task(task)
        assert (summary.images, summary.skipped) == (7, 0)
        outputs[batch_size] = written(summary.output_dir)
    single, batched = outputs[1], outputs[3]
    assert list(single) == list(batched) and len(single) == 7
    for name, doc in single.items():
        other = batched[name]
        assert other["objects"] == doc["objects"], name  # bitmaps decoded to the same class map
        for a, b in zip(saved_probabilities(doc), saved_probabilities(other)):
            assert a.shape == b.shape and np.allclose(a, b, atol=1e-5), name
        assert doc["size"] == other["size"]
    assert any(obj["classTitle"].endswith("_unet") for doc in single.values() for obj in doc["objects"])


def test_bf16_autocast_predicts_close_to_float32(model_dir):
    plain = load_predictor(model_dir, 0, amp="off")
    bf16 = load_predictor(model_dir, 0, amp="bf16")
    assert plain.network.precision.dtype is None and bf16.network.precision.dtype == torch.bfloat16
    image = np.random.default_rng(0).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    image[:40, :30] = (200, 40, 40)
    reference, autocast = (modes.full_image(p, image) for p in (plain, bf16))
    assert autocast.probs.dtype == np.float32 and np.isfinite(autocast.probs).all()
    assert np.allclose(autocast.probs.sum(axis=0), 1, atol=1e-5)  # the softmax ran in float32
    error = np.abs(autocast.probs - reference.probs).max()
    assert error < 0.05
    # The seeded model's classes are close to ties in places: its argmax may flip only where float32's
    # two best classes are closer than twice the error.
    best, second = np.sort(reference.probs, axis=0)[-2:][::-1]
    same = autocast.class_map() == reference.class_map()
    assert same.mean() > 0.9 and same[best - second > 2 * error].all()
    assert not np.array_equal(autocast.probs, reference.probs)  # the forward did run in bfloat16


def test_a_corrupt_image_in_a_batch_fails_as_the_plain_loop_did(tmp_path, model_dir):
    mode = {"name": "full_image", "batch_size": 3}
    task = make_task(tmp_path / "task", model_dir, {"mode": mode, "allow_corrupted_images": 1})
    items = list_items(task.data_dir / "shapes")
    for k in (1, 3):  # the first is allowed, the second is not, with a batch of two waiting before it
        items[k].image_path.write_bytes(b"not an image")
    with pytest.raises(TaskError) as raised:
        infer_task(task)
    assert "(allow_corrupted_images is 1)" in raised.value.message
    assert raised.value.where == str(items[3].image_path)
    assert not task.results_dir.exists() or not list(task.results_dir.iterdir())
    # Every image before the failing one was predicted and written, and none after it.
    staging = task.tmp_dir / "shapes.partial"
    done = sorted(f"{p.parent.parent.name}/{p.name}" for p in staging.glob("*/ann/*.json"))
    assert done == sorted(f"{items[k].dataset}/{items[k].name}.json" for k in (0, 2))


def test_ctrl_c_ends_a_run_at_once(tmp_path, model_dir):
    task = make_task(tmp_path / "task", model_dir, {"mode": {"name": "full_image", "batch_size": 1}})
    env = {k: v for k, v in os.environ.items() if k != "SLY_TASK_DIR"}
    command = [sys.executable, "-m", "entrypoints.inference", "--task-dir", str(task.root), "--log-format", "json"]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if json.loads(line).get("current") == 1:  # read and write threads are busy by now
                break
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        proc.wait(timeout=30)
        assert time.monotonic() - start < 10
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert not task.results_dir.exists() or not list(task.results_dir.iterdir())
