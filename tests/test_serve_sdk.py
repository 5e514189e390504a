"""The Supervisely SDK's serving routes of `sly-unet serve`, called with plain `requests` as the SDK's
Session and ModelAPI call them (tests/test_sdk_clients.py runs the SDK itself): the JSON shapes they
read, every annotation equal to POST /model/inference's, the async life cycle, bounds and bad input."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from plugin.config.load import mode_defaults
from tests.server_process import start_server
from tests.test_serve import SLOW

SLIDING = {"name": "sliding_window", "window": {"width": 40, "height": 40}, "min_overlap": {"x": 8, "y": 8},
           "batch_size": 3, "tta": True}


@pytest.fixture(scope="module")
def server(checkpoint):
    server = start_server(checkpoint, "--allow-url-fetch", "--max-async-requests", "4", "--device", "cpu",
                          "--runtime", "PyTorch", verb="deploy")
    server.wait_ready()
    yield server
    assert server.stop() == 0


def ours(server, image: Path, mode: dict | None = None, confidence: bool = False) -> dict:
    """POST /model/inference's annotation: what every SDK route must answer for the same image and mode."""
    data = {"mode": json.dumps(mode or {"name": "full_image"}), "confidence": json.dumps(confidence)}
    response = requests.post(server.url + "/model/inference", files={"image": image.read_bytes()}, data=data,
                             timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def post(server, route: str, **kwargs) -> requests.Response:
    return requests.post(server.url + route, timeout=120, **kwargs)


def sdk_body(**state) -> dict:
    return {"state": state, "context": {}, "api_token": "x" * 128}


def upload(image_files: list[Path], settings: dict | None = None, field: str = "settings", **state) -> list:
    """The SDK's multipart form: each image in `files`, the state JSON in a form field `settings` or `state`."""
    parts = [("files", (image.name, image.read_bytes(), "image/png")) for image in image_files]
    return parts + [(field, (None, json.dumps({"settings": settings or {}, **state}), "text/plain"))]


def test_health_routes(server):
    for route in ("/livez", "/is_alive"):
        assert requests.get(server.url + route, timeout=10).json() == {"running": True}
    assert requests.get(server.url + "/is_ready", timeout=10).json() == {"status": "ready"}
    assert post(server, "/is_ready").json() == {"status": "ready"}
    assert post(server, "/is_deployed").json() == {"deployed": True}


def test_session_info_meta_settings_and_deploy_info(server, checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    titles = [t for t, _ in sorted(config["class_title_to_idx"].items(), key=lambda kv: kv[1])]
    info = post(server, "/get_session_info", json=sdk_body()).json()
    assert info["task type"] == "semantic segmentation"
    assert info["number_of_classes"] == len(titles) == 4 and info["classes"] == titles
    assert info["batch_inference_support"] is True and info["async_image_inference_support"] is True
    assert info["sliding_window_support"] == "basic" and info["max_batch_size"] == 64
    assert info["device"] == "cpu" and info["runtime"] == "PyTorch"

    meta = post(server, "/get_output_classes_and_tags", json=sdk_body()).json()
    assert post(server, "/get_model_meta", json=sdk_body()).json() == meta
    colors = {c["title"]: c["color"] for c in config["out_classes"]}
    assert meta["classes"] == [{"title": f"{t}_unet", "shape": "bitmap", "color": colors[t], "geometry_config": {}}
                               for t in titles[1:]]
    assert meta["tags"] == []

    settings = post(server, "/get_custom_inference_settings", json={}).json()["settings"]
    assert {k: settings[k] for k in mode_defaults()["full_image"]} == mode_defaults()["full_image"]
    every_key = {key for mode in mode_defaults().values() for key in mode}
    assert set(settings) == every_key | {"confidence"} and settings["confidence"] is False
    assert settings["window"] is None and settings["bounds"] is None  # another mode's: its own default

    deploy = post(server, "/get_deploy_info", json={}).json()
    # Session.get_deploy_info builds DeployInfo(**deploy): exactly its twelve fields.
    assert set(deploy) == {"checkpoint_name", "model_name", "architecture", "checkpoint_url", "custom_checkpoint_path",
                           "model_source", "task_type", "device", "runtime", "model_precision", "hardware",
                           "deploy_params"}
    assert deploy["model_name"] == "UNet on efficientnet_lite0" and deploy["runtime"] == "PyTorch"


def test_inference_image_equals_model_inference(server, image_files):
    image = image_files[0]
    answer = post(server, "/inference_image", files=upload([image]))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"annotation": ours(server, image), "data": {}}
    assert answer.json()["annotation"]["objects"]  # the comparison compared objects

    # Settings: a mode with its keys, the state in a `state` field, or sent as a file part.
    windowed = post(server, "/inference_image", files=upload([image], SLIDING, field="state"))
    assert windowed.json()["annotation"] == ours(server, image, SLIDING)
    as_file = upload([image])[:1] + [("settings", ("settings.json", json.dumps({"settings": SLIDING}), "application/json"))]
    assert post(server, "/inference_image", files=as_file).json()["annotation"] == ours(server, image, SLIDING)
    confident = post(server, "/inference_image", files=upload([image], {"confidence": True})).json()
    assert confident["annotation"] == ours(server, image, confidence=True)
    assert all("confidenceMap" in obj for obj in confident["annotation"]["objects"])


def test_model_inference_reads_json_parts_sent_as_files(server, image_files):
    # curl -F mode=@mode.json, or requests' files={"mode": ("mode.json", ...)}: a file part, not a field.
    image = image_files[0]
    annotation = {"description": "", "size": {"height": 64, "width": 64}, "tags": [], "objects": []}
    parts = {"image": (image.name, image.read_bytes()), "mode": ("mode.json", json.dumps(SLIDING)),
             "annotation": ("ann.json", json.dumps(annotation).encode())}
    answer = post(server, "/model/inference", files=parts)
    assert answer.status_code == 200, answer.text
    assert answer.json() == ours(server, image, SLIDING)
    two = post(server, "/model/inference", files=[("image", image.read_bytes()), ("image", image.read_bytes())])
    assert two.status_code == 400 and two.json()["where"] == "image"


def test_the_published_defaults_sent_back_with_another_mode(server, image_files):
    # Session.update_inference_settings: the published settings, one mode's keys changed.
    settings = post(server, "/get_custom_inference_settings", json={}).json()["settings"]
    settings.update(name="sliding_window", window=SLIDING["window"], min_overlap=SLIDING["min_overlap"],
                    tta=True, batch_size=3)
    answer = post(server, "/inference_image", files=upload([image_files[1]], settings))
    assert answer.status_code == 200, answer.text
    assert answer.json()["annotation"] == ours(server, image_files[1], SLIDING)
    roi = {**post(server, "/get_custom_inference_settings", json={}).json()["settings"], "name": "roi"}
    answer = post(server, "/inference_image", files=upload([image_files[1]], roi))
    assert answer.status_code == 200, answer.text
    assert answer.json()["annotation"] == ours(server, image_files[1], {"name": "roi"})


def test_classes_setting_keeps_those_classes(server, image_files):
    meta = post(server, "/get_output_classes_and_tags", json={}).json()
    output_title = meta["classes"][0]["title"]  # as ModelAPI.get_classes lists it, with the suffix
    model_title = output_title.removesuffix("_unet")
    want = ours(server, image_files[0], {"name": "full_image", "model_classes": {"save_classes": [model_title]}})
    for given in (output_title, model_title):
        answer = post(server, "/inference_image", files=upload([image_files[0]], {"classes": [given]})).json()
        assert answer["annotation"] == want
    assert {obj["classTitle"] for obj in want["objects"]} <= {output_title}


def test_inference_batch_answers_each_image_in_order(server, image_files):
    answer = post(server, "/inference_batch", files=upload(image_files, {"name": "full_image", "batch_size": 2}))
    assert answer.status_code == 200, answer.text
    assert [r["annotation"] for r in answer.json()] == [ours(server, image) for image in image_files]
    assert [r["name"] for r in answer.json()] == [image.name for image in image_files]


def wait_finished(server, request_uuid: str, timeout: float = 120) -> list[dict]:
    """Pop results until the request is finished, as ModelAPI's iterator does; every result popped."""
    results, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        popped = post(server, "/pop_inference_results", json=sdk_body(inference_request_uuid=request_uuid)).json()
        assert popped["exception"] is None, popped
        results += popped["pending_results"]
        if popped["finished"]:
            return results
        time.sleep(0.05)
    raise AssertionError("the async request never finished")


def test_async_batch_life_cycle(server, image_files):
    started = post(server, "/inference_batch_async", files=upload(image_files, field="state", batch_size=2))
    assert started.status_code == 200, started.text
    request_uuid = started.json()["inference_request_uuid"]
    assert started.json()["message"] == "Scheduled inference task."
    results = wait_finished(server, request_uuid)
    assert [r["annotation"] for r in results] == [ours(server, image) for image in image_files]

    body = sdk_body(inference_request_uuid=request_uuid)
    progress = post(server, "/get_inference_progress", json=body).json()
    assert progress["progress"]["current"] == progress["progress"]["total"] == len(image_files)
    assert progress["finished"] is True and progress["is_inferring"] is False and progress["stage"] == "Finished"
    assert progress["pending_results"] == 0  # popped already
    assert post(server, "/pop_inference_results", json=body).json()["pending_results"] == []
    assert post(server, "/get_inference_result", json=body).status_code == 200
    assert post(server, "/clear_inference_request", json=body).json() == {"success": True}
    gone = post(server, "/get_inference_progress", json=body)
    assert gone.status_code == 404 and request_uuid in gone.json()["error"]


def test_stop_is_honoured_between_image_files(server, image_files):
    slow = [image_files[0]] * 6
    started = post(server, "/inference_batch_async", files=upload(slow, SLOW)).json()
    body = sdk_body(inference_request_uuid=started["inference_request_uuid"])
    deadline = time.monotonic() + 120
    while post(server, "/get_inference_progress", json=body).json()["progress"]["current"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert post(server, "/stop_inference", json=body).json()["success"] is True
    results = wait_finished(server, started["inference_request_uuid"])
    progress = post(server, "/get_inference_progress", json=body).json()
    assert progress["stopped"] is True and progress["stage"] == "Cancelled"
    assert 1 <= len(results) == progress["progress"]["current"] < len(slow)
    assert results[0]["annotation"] == ours(server, image_files[0], SLOW)
    post(server, "/clear_inference_request", json=body)


class Files(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def file_server(image_files, tmp_path_factory):
    directory = tmp_path_factory.mktemp("served")
    (directory / "image.png").write_bytes(image_files[2].read_bytes())
    (directory / "notes.txt").write_text("not an image")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Files, directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_inference_image_url(server, image_files, file_server):
    answer = post(server, "/inference_image_url", json=sdk_body(image_url=f"{file_server}/image.png", settings={}))
    assert answer.status_code == 200, answer.text
    assert answer.json()["annotation"] == ours(server, image_files[2])


def test_bad_requests_get_json_errors_and_the_server_stays_up(server, image_files, file_server):
    def error(route: str, status: int, **kwargs) -> dict:
        response = post(server, route, **kwargs)
        assert response.status_code == status, (route, response.text)
        return response.json()

    assert error("/inference_image", 400, files=[("settings", (None, "{}", "text/plain"))])["where"] == "files"
    assert error("/inference_image", 400, files=upload(image_files[:2]))["where"] == "files"
    bad_state = upload(image_files[:1])[:1] + [("state", (None, "{not json", "text/plain"))]
    assert error("/inference_image", 400, files=bad_state)["where"] == "state"
    unknown = error("/inference_image", 422, files=upload(image_files[:1], {"name": "roi", "colour": 1}))
    assert [p.split(":")[0] for p in unknown["problems"]] == ["settings.colour"]
    assert error("/inference_image", 422, files=upload(image_files[:1], {"classes": ["nope"]}))["where"] == "settings.classes"
    # ModelAPI.predict(input=[a, b]) in SDK 6.74.51 sends the paths as the files' contents.
    paths = [("files", (f"image_{i}.png", str(p), "image/png")) for i, p in enumerate(image_files[:2])]
    named = error("/inference_batch", 400, files=paths + [("state", (None, "{}", "text/plain"))])
    assert named["where"] == "files[0]" and "image_0.png" in named["error"]
    assert error("/get_inference_progress", 404, json=sdk_body(inference_request_uuid="f" * 32))["where"] == \
        "state.inference_request_uuid"
    assert error("/pop_inference_results", 400, json=sdk_body())["where"] == "state.inference_request_uuid"
    not_image = error("/inference_image_url", 400, json=sdk_body(image_url=f"{file_server}/notes.txt"))
    assert not_image["where"] == "image"
    missing = error("/inference_image_url", 400, json=sdk_body(image_url=f"{file_server}/missing.png"))
    assert "404" in missing["error"]
    assert error("/inference_image_url", 400, json=sdk_body(image_url="file:///etc/passwd"))["where"] == "state.image_url"
    from tests.test_serve import _bomb_png
    bomb = [("files", ("bomb.png", _bomb_png(60000, 60000), "image/png")), ("settings", (None, "{}", "text/plain"))]
    assert "60000x60000" in error("/inference_image", 413, files=bomb)["error"]
    assert post(server, "/inference_image", files=upload(image_files[:1])).json()["annotation"] == ours(server, image_files[0])


def test_async_load_4_clients(server, image_files):
    def client(k: int) -> None:
        for round_ in range(3):
            batch = image_files[(k + round_) % len(image_files):] or image_files
            started = post(server, "/inference_batch_async", files=upload(batch))
            if started.status_code == 429:  # the cap of 4 held requests: the ModelAPI client retries
                time.sleep(0.5)
                continue
            request_uuid = started.json()["inference_request_uuid"]
            results = wait_finished(server, request_uuid)
            assert [r["annotation"] for r in results] == [by_name[image.name] for image in batch]
            post(server, "/clear_inference_request", json=sdk_body(inference_request_uuid=request_uuid))
            done.append(len(batch))

    by_name = {image.name: ours(server, image) for image in image_files}
    held = post(server, "/get_status", json={}).json()["async_requests"]
    done: list[int] = []
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(client, range(4)))
    assert len(done) >= 4  # most rounds got a place
    assert post(server, "/get_status", json={}).json()["async_requests"] == held  # each cleared


def test_a_server_without_url_fetch_refuses_it(checkpoint, image_files):
    server = start_server(checkpoint, "--max-async-requests", "1")
    try:
        server.wait_ready()
        refused = post(server, "/inference_image_url", json=sdk_body(image_url="http://127.0.0.1:9/x.png"))
        assert refused.status_code == 403 and "--allow-url-fetch" in refused.json()["error"]
        held = post(server, "/inference_batch_async", files=upload([image_files[0]] * 3, SLOW)).json()
        over = post(server, "/inference_batch_async", files=upload(image_files[:1]))
        assert over.status_code == 429 and "--max-async-requests" in over.json()["error"]
        post(server, "/clear_inference_request", json=sdk_body(inference_request_uuid=held["inference_request_uuid"]))
        assert post(server, "/inference_batch_async", files=upload(image_files[:1])).status_code == 200
    finally:
        assert server.stop() == 0
