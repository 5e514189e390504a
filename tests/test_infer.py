"""The inference entrypoint end to end: a model trained in the test session, every mode, the output project."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from plugin.config.typed import tta_flips
from plugin.format.geometry import Bitmap, bitmap_to_json, decode_bitmap
from plugin.format.images import read_image
from plugin.format.project import list_items, read_annotation, read_meta
from plugin.inference import modes
from plugin.inference.evaluate import evaluate_projects
from plugin.inference.predictor import load_predictor
from plugin.synthetic import create_project
from tests.conftest import REPO, Run, run_entrypoint

MODES = {
    "full_image": {"name": "full_image"},
    "roi": {"name": "roi", "bounds": {"left": "10%", "top": "5px", "right": "0px", "bottom": "20%"}, "save": True},
    "bboxes": {"name": "bboxes", "from_classes": ["box"], "padding": {"left": "10%", "top": "10%", "right": "2px", "bottom": "0px"}, "save": True},
    "sliding_window": {"name": "sliding_window", "window": {"width": 48, "height": 40}, "min_overlap": {"x": 8, "y": 8}, "batch_size": 4, "save": True},
}


def link_model(checkpoint: Path, model_dir: Path) -> None:
    # Hard links: the 244 MB weights need not be copied for every test.
    model_dir.mkdir(parents=True)
    for f in checkpoint.iterdir():
        os.link(f, model_dir / f.name)


def create_inference_task(root: Path, checkpoint: Path, config: dict, size: int = 64) -> Path:
    create_project(root / "data" / "shapes", n_train=3, n_val=2, size=size, seed=5)
    link_model(checkpoint, root / "model")
    (root / "task_config.json").write_text(json.dumps(config))
    return root


def run_infer(task: Path) -> Run:
    return run_entrypoint("entrypoints.inference", task)


@pytest.mark.parametrize("mode", MODES, ids=list(MODES))
def test_every_mode_writes_a_project_that_reloads(tmp_path, checkpoint, mode):
    task = create_inference_task(tmp_path / "task", checkpoint, {"model": {"gpu_device": 0}, "mode": MODES[mode]})
    run = run_infer(task)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert len(run.events("MODEL_APPLIED")) == 1
    progress = [p for p in run.events("PROGRESS") if p["subtask"] == "Model applying: "]
    assert [p["current"] for p in progress] == [0, 1, 2, 3, 4, 5]

    out = task / "results" / "shapes"
    assert sorted(p.name for p in (task / "results").iterdir()) == ["shapes"]
    meta = read_meta(out)
    titles = [c.title for c in meta.classes]
    assert titles[:4] == ["ring", "blob", "box", "neutral"]  # the input classes first, unchanged
    assert {"ring_unet", "blob_unet", "box_unet"} <= set(titles)
    assert "bg_unet" not in titles and "neutral_unet" not in titles
    source = task / "data" / "shapes"
    items = list_items(out)
    assert [(i.dataset, i.name) for i in items] == [(i.dataset, i.name) for i in list_items(source)]
    predicted = 0
    for item in items:
        assert item.image_path.read_bytes() == (source / item.dataset / "img" / item.name).read_bytes()
        original = json.loads((source / item.dataset / "ann" / f"{item.name}.json").read_text())
        written = json.loads(item.ann_path.read_text())
        assert written["objects"][: len(original["objects"])] == original["objects"]
        assert written["tags"] == original["tags"]
        ann = read_annotation(item.ann_path, meta)  # reloads with the project's own reader
        for obj in written["objects"][len(original["objects"]) :]:
            if obj["classTitle"].endswith("_unet"):
                predicted += 1
                assert obj["geometryType"] == "bitmap"
                mask = decode_bitmap(obj["bitmap"]["data"])
                origin = tuple(obj["bitmap"]["origin"])
                assert bitmap_to_json(Bitmap(origin, mask))["bitmap"] == obj["bitmap"]  # encoder round trip
        assert (ann.height, ann.width) == (64, 64)
    assert predicted > 0


def test_saved_boxes_follow_the_mode(tmp_path, checkpoint):
    task = create_inference_task(tmp_path / "task", checkpoint, {"mode": MODES["bboxes"]})
    run = run_infer(task)
    assert run.returncode == 0, run.stdout[-3000:]
    out = task / "results" / "shapes"
    assert "box_input_bbox" in [c.title for c in read_meta(out).classes]
    for item in list_items(out):
        written = json.loads(item.ann_path.read_text())
        boxes = [o for o in written["objects"] if o["classTitle"] == "box"]
        saved = [o for o in written["objects"] if o["classTitle"] == "box_input_bbox"]
        assert len(saved) == len(boxes)


def test_probabilities_are_saved_as_the_spec_says(tmp_path, checkpoint):
    config = {"mode": {"name": "full_image", "save_probabilities": True, "model_classes": {"save_classes": ["ring", "box"]}}}
    task = create_inference_task(tmp_path / "task", checkpoint, config)
    run = run_infer(task)
    assert run.returncode == 0, run.stdout[-3000:]
    out = task / "results" / "shapes"
    titles = [c.title for c in read_meta(out).classes]
    assert "ring_unet" in titles and "box_unet" in titles and "blob_unet" not in titles
    item = list_items(out)[0]
    doc = json.loads(item.ann_path.read_text())
    big = doc["customBigData"]
    assert [c["title"] for c in big["probabilityClasses"]] == ["box_unet", "ring_unet"]
    assert all(c["shape"] == "multichannelBitmap" for c in big["probabilityClasses"])
    label = big["probabilityLabels"][0]
    assert label["geometryType"] == "multichannelBitmap" and label["multichannelBitmap"]["origin"] == [0, 0]
    probs = np.load(io.BytesIO(zlib.decompress(base64.b64decode(label["multichannelBitmap"]["data"]))))
    assert probs.shape == (64, 64, 1) and probs.dtype == np.float32
    assert probs.min() >= 0 and probs.max() <= 1
    assert all(o["classTitle"] in ("ring", "blob", "box", "neutral", "ring_unet", "box_unet") for o in doc["objects"])


def test_tta_saves_the_averaged_probabilities(tmp_path, checkpoint):
    mode = {
        "name": "sliding_window", "window": {"width": 48, "height": 40}, "batch_size": 4,
        "tta": True, "save_probabilities": True, "model_classes": {"save_classes": ["ring"]},
    }
    task = create_inference_task(tmp_path / "task", checkpoint, {"mode": mode})
    run = run_infer(task)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    item = list_items(task / "results" / "shapes")[0]
    label = json.loads(item.ann_path.read_text())["customBigData"]["probabilityLabels"][0]
    saved = np.load(io.BytesIO(zlib.decompress(base64.b64decode(label["multichannelBitmap"]["data"]))))[:, :, 0]

    image = read_image(task / "data" / "shapes" / item.dataset / "img" / item.name)
    mirrored = load_predictor(task / "model", 0, tta_flips(True))
    plain = load_predictor(task / "model", 0)
    ring = plain.class_titles.index("ring")
    # (24, 20): the default min_overlap, half the window.
    expected, untouched = (modes.sliding_window(p, image, (48, 40), (24, 20), 4).probs[ring] for p in (mirrored, plain))
    assert np.allclose(saved, expected, atol=1e-5)
    assert not np.allclose(saved, untouched, atol=1e-4)


def test_evaluate_scores_the_output_project(tmp_path, checkpoint):
    task = create_inference_task(tmp_path / "task", checkpoint, {"mode": {"name": "full_image"}})
    assert run_infer(task).returncode == 0
    out_json = tmp_path / "metrics.json"
    run = run_entrypoint_cli("evaluate", "--gt", str(task / "data"), "--pred", str(task / "results"), "--out", str(out_json))
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out_json.read_text())
    assert report == evaluate_projects(task / "data", task / "results")
    assert report["images"] == 5 and 0 <= report["mean_iou"] <= 1
    assert "mean IoU" in run.stdout


def run_entrypoint_cli(*args: str) -> Run:
    proc = subprocess.run([sys.executable, "-m", "plugin.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    return Run(proc.returncode, proc.stdout, proc.stderr)


BAD = {
    "no model/": (lambda t: shutil.rmtree(t / "model"), "config.json"),
    "no model.pt": (lambda t: (t / "model" / "model.pt").unlink(), "model.pt"),
    "no config.json": (lambda t: (t / "model" / "config.json").unlink(), "config.json"),
    "class count disagrees": (
        lambda t: _edit_json(t / "model" / "config.json", lambda c: c["class_title_to_idx"].update(extra=4)),
        "predicts 4",
    ),
    "weights are not a state dict": (
        lambda t: ((t / "model" / "model.pt").unlink(), torch.save({"model": Path("x")}, t / "model" / "model.pt")),
        "model.pt",
    ),
    "unknown mode": (lambda t: _config(t, {"mode": {"name": "tiles"}}), "tiles"),
    "bounds do not parse": (
        lambda t: _config(t, {"mode": {"name": "roi", "bounds": {"left": "10 %"}}}),
        "mode.bounds.left",
    ),
    "padding does not parse": (
        lambda t: _config(t, {"mode": {"name": "bboxes", "padding": {"top": "5pt"}}}),
        "mode.padding.top",
    ),
    "window too large": (
        lambda t: _config(t, {"mode": {"name": "sliding_window", "window": {"width": 100000, "height": 64}}}),
        "mode.window.width",
    ),
    "window not positive": (
        lambda t: _config(t, {"mode": {"name": "sliding_window", "window": {"width": 64, "height": 0}}}),
        "mode.window.height",
    ),
    "unknown save class": (
        lambda t: _config(t, {"mode": {"name": "full_image", "model_classes": {"save_classes": ["zebra"]}}}),
        "zebra",
    ),
    "output class clashes": (
        lambda t: _edit_json(
            t / "data" / "shapes" / "meta.json",
            lambda m: m["classes"].append({"title": "ring_unet", "shape": "bitmap", "color": "#000000"}),
        ),
        "ring_unet",
    ),
    "unreadable image": (
        lambda t: sorted((t / "data" / "shapes").glob("*/img/*"))[0].write_bytes(b"not an image"),
        "img_0000.png",
    ),
}


def _config(task: Path, config: dict) -> None:
    (task / "task_config.json").write_text(json.dumps(config))


def _edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.unlink()  # model/ files are hard links to the shared checkpoint: replace, never write through
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_fails_without_an_output_project(tmp_path, checkpoint, case):
    task = create_inference_task(tmp_path / "task", checkpoint, {"mode": {"name": "full_image"}})
    breaker, expected = BAD[case]
    breaker(task)
    run = run_infer(task)
    assert run.returncode == 1, run.stdout[-2000:]
    crashes = run.events("TASK_CRASHED")
    assert len(crashes) == 1 and crashes[0]["main_name"] == "UNET_V2_INFERENCE"
    assert expected in crashes[0]["message"], crashes[0]["message"]
    assert not (task / "results").exists() or list((task / "results").iterdir()) == []
    assert not run.events("MODEL_APPLIED")


def test_unreadable_images_are_skipped_when_allowed(tmp_path, checkpoint):
    task = create_inference_task(tmp_path / "task", checkpoint, {"mode": {"name": "full_image"}, "allow_corrupted_images": 1})
    broken = sorted((task / "data" / "shapes").glob("*/img/*"))[0]
    broken.write_bytes(b"not an image")
    run = run_infer(task)
    assert run.returncode == 0, run.stdout[-3000:]
    warnings = [line for line in run.lines if line["level"] == "warn" and broken.name in json.dumps(line)]
    assert len(warnings) == 1
    assert len(list_items(task / "results" / "shapes")) == 4
