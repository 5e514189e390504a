"""What the Supervisely SDK's serving clients (`sly.nn.inference.Session`, `ModelAPI`) ask a model server,
and our answers, without the HTTP: the routes in inference/serve_sdk.py call these.

Facts from supervisely 6.74.51 (`nn/inference/inference.py`, `session.py`, `nn/model/`):
- a request's inference settings are `state.settings`; the clients accept only the keys that
  /get_custom_inference_settings publishes, plus `classes`;
- each image's answer is `{"annotation": <annotation JSON>, "data": {}}`;
- `Session.get_deploy_info` builds a `DeployInfo` from exactly its twelve fields;
- async requests report their progress in `InferenceRequest.to_json`'s shape, and
  `pop_inference_results` hands the results made since the last pop.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import plugin
from plugin.config.load import mode_defaults
from plugin.errors import TaskError
from plugin.inference.serving import NotFound, TooManyRequests

# Settings that the SDK's clients put into state.settings for themselves, not for the model:
# ModelAPI.predict adds show_progress (and whatever plain kwargs it was given), detection apps conf
# and img_size. A semantic-segmentation model has no use for them; they are read and ignored.
CLIENT_KEYS = frozenset({"show_progress", "recursive", "upload_mode", "conf", "img_size", "sliding_window_mode",
                         "model_prediction_suffix"})
TASK_TYPE = "semantic segmentation"
# The stage names of the SDK's InferenceRequest.Stage, which its clients log and compare.
RUNNING, FINISHED, CANCELLED, ERROR = "Running inference...", "Finished", "Cancelled", "Error"


def published_settings(modes: dict[str, dict]) -> dict:
    """/get_custom_inference_settings of the modes' defaults (config.load.mode_defaults): full_image's
    mode config, then every other mode's keys as null (null: the chosen mode's own default), and
    `confidence`. So a client can send back any key of any mode, as `Session.update_inference_settings`
    requires."""
    settings = {**modes["full_image"], "confidence": False}
    for defaults in modes.values():
        for key in defaults:
            settings.setdefault(key, None)
    return settings


def settings_mode(settings: object, class_titles: list[str], batch_size: object = None) -> tuple[dict, bool]:
    """(the mode config, confidence maps on or off) of a request's state.settings.

    Null values take the chosen mode's default; a key of another mode is dropped while it holds its
    published value (the defaults sent back whole), and otherwise left for the schema to refuse.
    `classes` (model class titles, with or without the output suffix) becomes save_classes; the
    state's batch_size, the ModelAPI's, fills the mode's own where it has one."""
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise TaskError("must be a JSON object of inference settings", where="settings")
    confidence = settings.get("confidence", False)
    if not isinstance(confidence, bool):
        raise TaskError("must be true or false", where="settings.confidence")
    modes = mode_defaults()
    published = published_settings(modes)
    name = settings.get("name", "full_image")
    own = modes.get(name) if isinstance(name, str) else None
    mode: dict = {}
    for key, value in settings.items():
        if key in CLIENT_KEYS or key in ("confidence", "classes"):
            continue
        if own is not None and key not in own and key in published and value in (None, published[key]):
            continue
        if own is not None and key in own and value is None:
            continue
        mode[key] = value
    if settings.get("classes") is not None:
        model_classes = mode.get("model_classes") if isinstance(mode.get("model_classes"), dict) else {}
        suffix = model_classes.get("add_suffix", published["model_classes"]["add_suffix"])
        mode["model_classes"] = {**model_classes,
                                 "save_classes": _class_titles(settings["classes"], class_titles, suffix)}
    if batch_size is not None and own is not None and "batch_size" in own and "batch_size" not in mode:
        mode["batch_size"] = batch_size
    return mode, confidence


def _class_titles(classes: object, class_titles: list[str], suffix: object) -> list[str]:
    """The model's titles of `classes`: each given as the model names it, or as its output class
    (the title with the output suffix, as /get_output_classes_and_tags lists it)."""
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise TaskError("must be a list of class titles", where="settings.classes")
    by_output = {f"{t}{suffix}": t for t in class_titles[1:]} if isinstance(suffix, str) else {}
    unknown = [c for c in classes if c not in class_titles[1:] and c not in by_output]
    if unknown:
        raise TaskError(f"the model has no class {', '.join(map(repr, unknown))}; its classes are "
                        f"{', '.join(map(repr, class_titles[1:]))}", where="settings.classes")
    return [by_output.get(c, c) for c in classes]


def output_meta(class_titles: list[str], color_of: Callable[[str], str]) -> dict:
    """/get_output_classes_and_tags: the ProjectMeta of what the default settings predict, one bitmap
    class per model class but background, titled with the output suffix."""
    suffix = mode_defaults()["full_image"]["model_classes"]["add_suffix"]
    classes = [{"title": f"{title}{suffix}", "shape": "bitmap", "color": color_of(title), "geometry_config": {}}
               for title in class_titles[1:]]
    return {"classes": classes, "tags": [], "projectType": "images"}


@dataclass(frozen=True)
class Deployment:
    """What a server runs, for /get_session_info and /get_deploy_info."""

    model_name: str  # e.g. "UNet on efficientnet_lite0"
    checkpoint: str  # the model directory
    device: str  # "cpu", "cuda:0"
    runtime: str  # "PyTorch" or "ONNXRuntime", the SDK's names
    precision: str  # "fp32", "bf16", ...
    max_batch_size: int  # files per batch request


def session_info(deployment: Deployment, class_titles: list[str]) -> dict:
    """/get_session_info, with the keys the SDK's Inference.get_info reports for a segmentation model."""
    return {
        "app_name": "sly-unet",
        "session_id": None,
        "model_name": deployment.model_name,
        "checkpoint_name": deployment.checkpoint,
        "number_of_classes": len(class_titles),
        "classes": list(class_titles),
        "task type": TASK_TYPE,
        # sliding_window is one of our modes: the server tiles, the client sends whole images.
        "sliding_window_support": "basic",
        "videos_support": False,
        "async_video_inference_support": False,
        "tracking_on_videos_support": False,
        "async_image_inference_support": True,
        "tracking_algorithms": [],
        "batch_inference_support": True,
        "max_batch_size": deployment.max_batch_size,
        "device": deployment.device,
        "runtime": deployment.runtime,
        "version": plugin.__version__,
    }


def deploy_info(deployment: Deployment) -> dict:
    """/get_deploy_info: exactly DeployInfo's fields, which Session.get_deploy_info passes to it."""
    return {
        "checkpoint_name": deployment.checkpoint,
        "model_name": deployment.model_name,
        "architecture": "sly-unet",
        "checkpoint_url": None,
        "custom_checkpoint_path": deployment.checkpoint,
        "model_source": "Custom models",
        "task_type": TASK_TYPE,
        "device": deployment.device,
        "runtime": deployment.runtime,
        "model_precision": deployment.precision,
        "hardware": deployment.device,
        "deploy_params": {"device": deployment.device, "runtime": deployment.runtime},
    }


def image_result(annotation: dict, name: str | None = None) -> dict:
    """One image's answer, as the SDK's servers give it (Prediction.from_json reads `annotation`)."""
    result = {"annotation": annotation, "data": {}}
    if name:
        result["name"] = name
    return result


@dataclass
class AsyncRequest:
    """One /inference_batch_async request: its images, progress and the results not yet popped."""

    uuid: str
    total: int
    done: int = 0
    pending: list[dict] = field(default_factory=list)
    exception: dict | None = None
    stopped: bool = False
    finished: bool = False
    created_at: float = field(default_factory=time.time)
    touched: float = field(default_factory=time.monotonic)

    def status(self) -> dict:
        """InferenceRequest.to_json's shape (what get_inference_progress and pop_inference_results hold)."""
        stage = ERROR if self.exception else CANCELLED if self.stopped and self.finished else \
            FINISHED if self.finished else RUNNING
        return {
            "uuid": self.uuid,
            "stage": stage,
            "progress": {"message": RUNNING, "status": RUNNING, "current": self.done, "total": self.total,
                         "is_size": False},
            "pending_results": len(self.pending),
            "final_result": self.finished,
            "exception": self.exception,
            "is_inferring": not self.finished,
            "stopped": self.stopped,
            "paused": False,
            "finished": self.finished,
            "created_at": self.created_at,
        }


class AsyncRequests:
    """The async requests a server holds: at most `limit`, each dropped `ttl` seconds after a client
    last asked about it (stopped first if it still runs), or on clear_inference_request. Each runs in
    a thread of its own and checks its stop flag between images."""

    def __init__(self, limit: int, ttl: float) -> None:
        self.limit, self.ttl = limit, ttl
        self._requests: dict[str, AsyncRequest] = {}
        # Every request's thread, cleared or not, until it ends: the server waits for them on its way out.
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self, total: int, run: Callable[[AsyncRequest, threading.Lock], None]) -> AsyncRequest:
        """A new request, `run(request, lock)` started for it; TooManyRequests when `limit` are held."""
        with self._lock:
            self._expire()
            if len(self._requests) >= self.limit:
                raise TooManyRequests(
                    f"the server holds {self.limit} async requests (--max-async-requests); pop their results "
                    "and clear them (clear_inference_request), or wait until they expire", where="state")
            request = AsyncRequest(uuid.uuid4().hex, total)
            self._requests[request.uuid] = request
            thread = threading.Thread(target=run, args=(request, self._lock), name=f"async-{request.uuid[:8]}",
                                      daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return request

    def close(self, timeout: float) -> None:
        """Stop every request and wait (at most `timeout` s) for their threads to end their image in
        the model: a process that exits in the middle of a forward can abort."""
        with self._lock:
            for request in self._requests.values():
                request.stopped = True
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def status(self, request_uuid: object) -> dict:
        with self._lock:
            return self._get(request_uuid).status()

    def pop(self, request_uuid: object) -> dict:
        """The status with the results made since the last pop, which the request no longer holds."""
        with self._lock:
            request = self._get(request_uuid)
            status = request.status()
            status["pending_results"], request.pending = request.pending, []
            return status

    def stop(self, request_uuid: object) -> None:
        with self._lock:
            self._get(request_uuid).stopped = True

    def clear(self, request_uuid: object) -> None:
        with self._lock:
            request = self._get(request_uuid)
            request.stopped = True
            del self._requests[request.uuid]

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._requests)

    def _get(self, request_uuid: object) -> AsyncRequest:
        self._expire()
        if not isinstance(request_uuid, str) or not request_uuid:
            raise TaskError("the body needs state.inference_request_uuid, as /inference_batch_async answered it",
                            where="state.inference_request_uuid")
        request = self._requests.get(request_uuid)
        if request is None:
            raise NotFound(f"no inference request {request_uuid!r} (never started, cleared, or idle for over "
                                 f"{self.ttl:g} s)", where="state.inference_request_uuid")
        request.touched = time.monotonic()
        return request

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, r in self._requests.items() if now - r.touched > self.ttl]:
            self._requests.pop(key).stopped = True
