"""The Supervisely SDK's own clients, unmodified, against `sly-unet serve`: `Session(api, session_url=...)`
and `ModelAPI(url=...)` of supervisely 6.74.51, run by its venv (build/sdk-venv: `make sdk-venv`) in
tests/sdk_clients.py. Every annotation they return equals what POST /model/inference answers.

Marked `sdk`: `make test-sdk` runs these (it builds the SDK venv once), `make test` the rest.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from plugin.format.geometry import decode_bitmap
from tests.conftest import REPO
from tests.server_process import start_server
from tests.test_serve_sdk import ours

SDK_PYTHON = REPO / "build" / "sdk-venv" / "bin" / "python"

pytestmark = pytest.mark.sdk


def pixels(annotation: dict) -> dict:
    """An annotation as what it says: its size and, per class, the pixels its bitmaps cover. The SDK
    re-encodes bitmaps (cropped to their content) and adds its own keys (ids, logins, times)."""
    height, width = annotation["size"]["height"], annotation["size"]["width"]
    covered: dict = {}
    for obj in annotation["objects"]:
        assert obj["geometryType"] == "bitmap"
        mask = decode_bitmap(obj["bitmap"]["data"])
        x, y = obj["bitmap"]["origin"]
        canvas = covered.setdefault(obj["classTitle"], np.zeros((height, width), bool))
        canvas[y:y + mask.shape[0], x:x + mask.shape[1]] |= mask
    return {"size": (height, width), **{title: np.packbits(c).tobytes() for title, c in covered.items()}}


@pytest.fixture(scope="module")
def answers(checkpoint, image_files, tmp_path_factory):
    """(what the SDK's clients returned, the server) for `image_files`."""
    assert SDK_PYTHON.exists(), f"no SDK venv at {SDK_PYTHON.parent.parent}: run `make sdk-venv`"
    server = start_server(checkpoint)
    server.wait_ready()
    out = tmp_path_factory.mktemp("sdk") / "answers.json"
    run = subprocess.run([str(SDK_PYTHON), str(REPO / "tests" / "sdk_clients.py"), server.url, str(out),
                          *map(str, image_files)], capture_output=True, text=True, timeout=600, cwd=REPO)
    try:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        yield json.loads(out.read_text()), server
    finally:
        assert server.stop() == 0


def test_session_reads_the_model(answers):
    result, _ = answers
    assert result["session_info"]["task type"] == "semantic segmentation"
    assert [c["title"] for c in result["model_meta"]["classes"]] == ["blob_unet", "box_unet", "ring_unet"]
    assert result["default_settings"]["name"] == "full_image"
    assert result["deploy_info"]["model_name"] == "UNet on efficientnet_lite0"


def test_session_annotations_equal_model_inference(answers, image_files):
    result, server = answers
    assert pixels(result["image_path"]) == pixels(ours(server, image_files[0]))
    assert result["image_path"]["objects"]  # something was compared
    assert [pixels(a) for a in result["image_paths"]] == [pixels(ours(server, image)) for image in image_files]
    sliding = {"name": "sliding_window", "window": {"width": 40, "height": 40}, "tta": True}
    assert pixels(result["image_path_sliding_window"]) == pixels(ours(server, image_files[0], sliding))
    kept = result["classes"][0].removesuffix("_unet")
    assert pixels(result["image_path_classes"]) == pixels(ours(server, image_files[0],
                                                                {"model_classes": {"save_classes": [kept]}}))


def test_model_api_reads_the_model_and_predicts(answers, image_files):
    result, server = answers
    assert result["model_info"]["task_type"] == "semantic segmentation"
    assert result["model_classes"] == ["blob_unet", "box_unet", "ring_unet"]
    assert result["model_settings"]["name"] == "full_image"
    assert result["model_is_deployed"] is True
    want = pixels(ours(server, image_files[0]))
    assert [pixels(a) for a in result["predict_one"]] == [pixels(a) for a in result["predict_list"]] == [want]
    folder = sorted(image for image in image_files if image.parent == image_files[0].parent)
    assert {name: pixels(a) for name, a in result["predict_dir"].items()} == \
        {image.name: pixels(ours(server, image)) for image in folder}
