"""`sly-unet serve` as a real process on loopback, called with the client: every mode against `sly-unet
infer`, the confidence maps, every error status, the queue, loading, SIGTERM, a bounded load test."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from plugin.config.load import mode_defaults
from plugin.format.geometry import decode_bitmap
from plugin.format.project import list_items
from plugin.inference.client import Client, ServerError
from plugin.inference.predictor import load_predictor
from plugin.inference.task import infer_task
from plugin.synthetic import create_project
from plugin.task_dir import TaskDir
from tests.conftest import REPO
from tests.server_process import start_server

MODES = {
    "full_image": {"name": "full_image"},
    "roi": {"name": "roi", "bounds": {"left": "10%", "top": "5px", "right": "0px", "bottom": "20%"}, "save": True},
    "bboxes": {"name": "bboxes", "from_classes": ["box"], "padding": {"left": "10%", "top": "10%", "right": "2px",
                                                                      "bottom": "0px"}, "save": True},
    "sliding_window": {"name": "sliding_window", "window": {"width": 48, "height": 40}, "min_overlap": {"x": 8, "y": 8},
                       "batch_size": 4, "save": True},
}
# Four forwards one after the other (seconds here): long enough to hold the model thread while a test
# looks at the queue, which /health shows.
# 256 forwards of one 4x4 window each: a request that keeps the model busy for a few seconds.
SLOW = {"name": "sliding_window", "window": {"width": 4, "height": 4}, "min_overlap": {"x": 0, "y": 0},
        "batch_size": 1}
# As slow, but another mode: never in one batch with SLOW.
SLOW_OTHER = {**SLOW, "batch_size": 2}
LOAD_CLIENTS, LOAD_SECONDS = 8, 20


@pytest.fixture(scope="module")
def server(checkpoint):
    server = start_server(checkpoint)
    server.wait_ready()
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def expected(tmp_path_factory, checkpoint) -> dict[str, dict[Path, tuple[dict, list[dict]]]]:
    """mode -> image -> (its input annotation, the objects `sly-unet infer` added to it)."""
    out: dict = {}
    for name, mode in MODES.items():
        root = tmp_path_factory.mktemp(f"infer-{name}")
        create_project(root / "data" / "shapes", n_train=2, n_val=1, size=64, seed=5)
        (root / "model").mkdir()
        for f in checkpoint.iterdir():
            os.link(f, root / "model" / f.name)
        (root / "task_config.json").write_text(json.dumps({"mode": mode}))
        result = infer_task(TaskDir(root)).output_dir
        out[name] = {}
        for item in list_items(root / "data" / "shapes"):
            original = json.loads(item.ann_path.read_text())
            written = json.loads((result / item.dataset / "ann" / f"{item.name}.json").read_text())
            out[name][item.image_path] = (original, written["objects"][len(original["objects"]):])
    return out


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_answers_the_objects_infer_adds(server, expected, mode):
    client = Client(server.url)
    for image, (annotation, objects) in expected[mode].items():
        answer = client.predict(image, MODES[mode], annotation if mode == "bboxes" else None)
        assert answer["size"] == annotation["size"]
        assert answer["objects"] == objects, image
    assert any(objects for _, objects in expected[mode].values())  # the comparison compared something


def test_json_body_with_base64_image_and_annotation(server, expected):
    image, (annotation, objects) = next(iter(expected["bboxes"].items()))
    body = {"image": base64.b64encode(image.read_bytes()).decode(), "mode": MODES["bboxes"], "annotation": annotation}
    response = requests.post(server.url + "/model/inference", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["objects"] == objects


def test_confidence_maps_are_the_winning_probability_over_each_bitmap(server, checkpoint, expected):
    predictor = load_predictor(checkpoint, 0)
    for image in list(expected["full_image"])[:2]:
        answer = Client(server.url).predict(image, confidence=True)
        probs = predictor.regions([None], inputs=[predictor.network_input_of(image)], sizes=[(64, 64)])[0].numpy()
        winning = np.rint(probs.max(axis=0) * 255)
        assert answer["objects"]
        for obj in answer["objects"]:
            mask = decode_bitmap(obj["bitmap"]["data"])
            conf = obj["confidenceMap"]
            assert conf["origin"] == obj["bitmap"]["origin"]
            png = cv2.imdecode(np.frombuffer(base64.b64decode(conf["data"]), np.uint8), cv2.IMREAD_UNCHANGED)
            assert png.dtype == np.uint8 and png.shape == mask.shape
            x, y = conf["origin"]
            want = winning[y:y + mask.shape[0], x:x + mask.shape[1]]
            assert np.abs(png[mask].astype(int) - want[mask]).max() <= 1
            assert not png[~mask].any()


def test_model_info(server, checkpoint):
    info = Client(server.url).info()
    config = json.loads((checkpoint / "config.json").read_text())
    assert [c["title"] for c in info["classes"]] == ["bg", "blob", "box", "ring"]
    colors = {c["title"]: c["color"] for c in config["out_classes"]}
    assert all(c["color"] == colors[c["title"]] for c in info["classes"])
    assert info["input_size"] == {"width": 64, "height": 64}
    assert info["scale"] == {"mode": "resize", "factor": 1.0}
    assert info["architecture"] == config["network"] and info["architecture"]["encoder"] == "efficientnet_lite0"
    assert info["modes"] == mode_defaults() and set(info["modes"]) == set(MODES)
    assert info["version"] == __import__("plugin").__version__


def _bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 100))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + pixels + chunk(b"IEND", b"")


def test_bad_requests_get_json_errors(server, expected):
    client = Client(server.url, retries=0)
    image = next(iter(expected["full_image"]))

    def status(**kwargs) -> tuple[int, dict]:
        with pytest.raises(ServerError) as error:
            client.predict(**kwargs)
        return error.value.status, error.value.body

    code, body = status(image=b"this is not an image")
    assert code == 400 and body["where"] == "image" and "accepted format" in body["error"]
    code, body = status(image=_bomb_png(60000, 60000))
    assert code == 413 and "60000x60000" in body["error"]
    code, body = status(image=image, mode={"name": "roi", "bounds": {"left": "ten"}, "colour": 1})
    assert code == 422
    assert [p.split(":")[0] for p in body["problems"]] == ["mode.bounds.left", "mode.colour"]
    code, body = status(image=image, mode={"name": "bboxes"})
    assert code == 422 and body["where"] == "annotation"
    bad_base64 = requests.post(server.url + "/model/inference", json={"image": "%%%"}, timeout=10)
    assert bad_base64.status_code == 400 and bad_base64.json()["where"] == "image"
    not_found = requests.get(server.url + "/nope", timeout=10)
    assert not_found.status_code == 404 and not_found.json() == {"error": "Not Found"}
    assert Client(server.url).predict(image)["objects"] == expected["full_image"][image][1]  # still serving


def test_predict_command_and_a_client_without_torch(server, expected, tmp_path):
    image, (_, objects) = next(iter(expected["sliding_window"].items()))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "ann.json"
    run = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "predict", "--url", server.url, str(image), "--mode",
         json.dumps(MODES["sliding_window"]), "--output", str(out), "--log-format", "json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(out.read_text())["objects"] == objects
    probe = "import sys, plugin.cli, plugin.inference.client; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60).stdout.strip() == "False"


def test_load_8_clients_for_20_s(server, expected):
    images = list(expected["full_image"].items())
    deadline = time.monotonic() + LOAD_SECONDS

    def client_loop(k: int) -> int:
        client, done = Client(server.url, retries=0), 0
        while time.monotonic() < deadline:
            image, (_, objects) = images[(k + done) % len(images)]
            assert client.predict(image)["objects"] == objects
            done += 1
        return done

    with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        counts = list(pool.map(client_loop, range(LOAD_CLIENTS)))
    assert all(count > 0 for count in counts)


# One server with a queue of one and a small request limit: loading, a full queue, 413, then SIGTERM.
@pytest.fixture(scope="module")
def small_server(checkpoint):
    server = start_server(checkpoint, "--queue-size", "1", "--max-request-bytes", "100000")
    yield server
    server.stop()


def test_requests_while_the_model_loads_get_503_then_the_client_retries(checkpoint, expected):
    server = start_server(checkpoint)  # its own: the test must see it before the model has loaded
    try:
        image = next(iter(expected["full_image"]))
        health = requests.get(server.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "loading"
        early = requests.post(server.url + "/model/inference", files={"image": image.read_bytes()}, timeout=10)
        assert early.status_code == 503 and early.headers["Retry-After"] == "1"
        answer = Client(server.url, retries=120, max_wait=1).predict(image)
        assert answer["objects"] == expected["full_image"][image][1]
    finally:
        assert server.stop() == 0


def test_a_job_the_model_thread_could_not_batch_still_counts(checkpoint, expected):
    server = start_server(checkpoint, "--queue-size", "2")
    try:
        server.wait_ready()
        image = next(iter(expected["full_image"]))
        client = Client(server.url, retries=0)
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(client.predict, image, SLOW)
            server.wait_health(running=1, queued=0)
            second = pool.submit(client.predict, image, SLOW)
            server.wait_health(running=1, queued=1)
            third = pool.submit(client.predict, image, SLOW_OTHER)
            server.wait_health(running=1, queued=2)
            # The model thread takes the second next, and leaves the third, of another mode, waiting.
            first.result()
            server.wait_health(running=1, queued=1)
            fourth = pool.submit(client.predict, image)
            server.wait_health(running=1, queued=2)
            refused = requests.post(server.url + "/model/inference", files={"image": image.read_bytes()}, timeout=10)
            assert refused.status_code == 503 and refused.json()["status"] == "busy"
            assert second.result()["objects"] == first.result()["objects"]
            assert third.result()["size"] == fourth.result()["size"]
    finally:
        assert server.stop() == 0


def test_a_full_queue_answers_503_with_retry_after(small_server, expected):
    small_server.wait_ready()
    image = next(iter(expected["full_image"]))
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(Client(small_server.url, retries=0).predict, image, SLOW)
        small_server.wait_health(running=1, queued=0)
        queued = pool.submit(Client(small_server.url, retries=0).predict, image, SLOW)
        small_server.wait_health(running=1, queued=1)
        refused = requests.post(small_server.url + "/model/inference", files={"image": image.read_bytes()}, timeout=10)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["status"] == "busy"
        # The client waits as Retry-After says until there is room.
        retried = pool.submit(Client(small_server.url, retries=120, max_wait=1).predict, image)
        assert running.result()["objects"] == queued.result()["objects"]
        assert retried.result()["objects"] == expected["full_image"][image][1]


def test_a_request_over_the_byte_limit_gets_413(small_server):
    small_server.wait_ready()
    with pytest.raises(ServerError) as error:
        Client(small_server.url, retries=0).predict(b"\0" * 200_000)
    assert error.value.status == 413 and "100000" in error.value.body["error"]


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(small_server, expected):
    small_server.wait_ready()
    image = next(iter(expected["full_image"]))
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(Client(small_server.url, retries=0).predict, image, SLOW)
        small_server.wait_health(running=1)
        small_server.proc.send_signal(signal.SIGTERM)
        assert in_flight.result()["size"] == {"height": 64, "width": 64}
    assert small_server.proc.wait(timeout=60) == 0
    assert not [line for line in small_server.lines if line.get("level") in ("error", "fatal")]


@pytest.mark.parametrize("weights, said", [
    (None, "model.pt"),
    # A whole pickled module, as some legacy scripts saved models: refused unread, never unpickled.
    ("module", "not a plain state dict"),
])
def test_a_model_dir_without_usable_weights_crashes_at_start_up(tmp_path, checkpoint, weights, said):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    if weights == "module":
        import torch

        torch.save(torch.nn.Conv2d(3, 2, 1), tmp_path / "model" / "model.pt")
    server = start_server(tmp_path / "model")
    assert server.proc.wait(timeout=120) == 1
    time.sleep(0.2)  # the drain thread's last lines
    crash = [line for line in server.lines if line.get("event_type") == "EventType.TASK_CRASHED"]
    assert len(crash) == 1 and crash[0]["main_name"] == "UNET_V2_SERVICE" and said in crash[0]["message"]
    assert "model.pt" in crash[0]["message"]
    assert not any("ready" in line.get("message", "") for line in server.lines)


def test_a_port_in_use_is_named(checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "entrypoints.serve", "--model", str(checkpoint), "--host", "127.0.0.1", "--port",
             str(port), "--log-format", "json"],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 1
    crash = json.loads(proc.stdout.splitlines()[-1])
    assert crash["event_type"] == "EventType.TASK_CRASHED" and f"port {port}" in crash["message"]
