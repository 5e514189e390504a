"""The model server's model: one thread runs it, one batch at a time, fed by a bounded queue.

A request is prepared (decoded, checked, planned) and its answer encoded in the server's request
threads; the model thread only predicts, so it never waits for a decoder or an encoder. Concurrent
full_image requests of the same mode share a forward, as the inference task batches a project's
images: an image's output does not depend on what it is batched with (Predictor.regions). Each job
carries its own image, plan and future, so requests never see each other's data.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

import plugin
from plugin.config.load import mode_defaults
from plugin.config.typed import MATCH_ALL, Mode
from plugin.errors import TaskError
from plugin.format.images import UPLOAD
from plugin.format.project import ObjClass, ProjectMeta, parse_annotation
from plugin.inference import modes
from plugin.inference.apply import batching, plan_output, predict
from plugin.inference.items import OutputPlan, ReadItem, decode, predicted_annotation
from plugin.inference.predictor import Predictor
from plugin.nn.network import network_record

log = logging.getLogger(__name__)

# What errors about the request's annotation name.
ANNOTATION = "annotation"


@dataclass(frozen=True)
class Job:
    """One request, ready for the model."""

    mode: Mode  # sliding_window: window and overlap resolved
    read: ReadItem
    plan: OutputPlan


class QueueFull(Exception):
    """Every place in the queue is taken: the server answers 503 with Retry-After."""


def prepare(predictor: Predictor, mode: Mode, image: bytes, annotation: dict | None, confidence: bool) -> Job:
    """Decode the image as `sly-unet infer` does for `mode`, check the annotation against it and plan
    the output; TaskError naming "image" (UPLOAD), "annotation..." or "mode..." at fault."""
    _, prepare_input = batching(mode, predictor)
    pixels, inputs, (height, width) = decode(image, prepare_input)
    if mode.name == "bboxes" and annotation is None:
        raise TaskError("bboxes predicts inside the input objects: send the image's annotation", where=ANNOTATION)
    meta = _request_meta(annotation or {}, mode)
    labels = []
    if annotation is not None:
        ann = parse_annotation(annotation, meta, Path(ANNOTATION))
        if (ann.height, ann.width) != (height, width):
            raise TaskError(
                f"the annotation says the image is {ann.width}x{ann.height} (width x height), but it is "
                f"{width}x{height}",
                where=f"{ANNOTATION}.size",
            )
        labels = ann.labels
    if mode.name == "sliding_window":
        window, overlap = modes.window_plan(predictor, mode.window, mode.min_overlap)
        mode = replace(mode, window=window, min_overlap=overlap)
    plan = replace(plan_output(mode, predictor, meta), confidence=confidence)
    labels = [label for label in labels if label.class_title in plan.bbox_sources]
    doc = {"description": "", "size": {"height": height, "width": width}, "tags": [], "objects": []}
    return Job(mode, ReadItem(None, pixels, (height, width), doc, labels, inputs), plan)


def answer(job: Job, prediction: modes.Prediction) -> dict:
    """The response: the annotation of `size` holding the objects `sly-unet infer` adds to the image."""
    return predicted_annotation(job.read.doc, prediction, job.plan)


async def predict_request(model: ModelQueue, mode: Mode, image: bytes, annotation: dict | None,
                          confidence: bool) -> dict:
    """A request's annotation, its decoding and encoding in a worker thread; QueueFull at once when the
    queue has no place. Every route that predicts one image answers through this."""
    job = await asyncio.to_thread(prepare, model.predictor, mode, image, annotation, confidence)
    prediction = await asyncio.wrap_future(model.submit(job))
    return await asyncio.to_thread(answer, job, prediction)


def predict_files(model: ModelQueue, mode: Mode, files: list[tuple[str, bytes]], confidence: bool,
                  on_result: Callable[[int, dict], None], stopped: Callable[[], bool] = lambda: False,
                  wait: float = 60.0) -> None:
    """Predict each (name, bytes) file in turn, calling on_result(index, annotation) in their order:
    up to a forward's worth of them waits in the queue at once, so that the model thread batches them,
    and no new one is sent once `stopped()`. Blocking, for a worker thread. A TaskError names the file
    (files[i]) when the file itself is at fault; QueueFull when the queue stays full for `wait` s."""
    window = max(1, batching(mode, model.predictor)[0])
    sent: deque[tuple[int, Job, Future]] = deque()

    def finish_first() -> None:
        index, job, future = sent.popleft()
        on_result(index, answer(job, future.result()))

    for index, (name, data) in enumerate(files):
        if stopped():
            break
        try:
            job = prepare(model.predictor, mode, data, None, confidence)
        except TaskError as exc:
            if exc.where != UPLOAD:
                raise
            raise type(exc)(f"{name or 'the file'}: {exc.message}", where=f"files[{index}]") from exc
        sent.append((index, job, model.submit(job, wait=wait)))
        while len(sent) >= window:
            finish_first()
    while sent:
        finish_first()


def model_info(predictor: Predictor) -> dict:
    """GET /model/info: classes with colours, training input size and scale, the network, modes with
    defaults, version."""
    return {
        "version": plugin.__version__,
        "classes": [
            {"index": i, "title": title, "color": predictor.color_of(title)}
            for i, title in enumerate(predictor.class_titles)
        ],
        "input_size": {"width": predictor.input_size[0], "height": predictor.input_size[1]},
        "scale": {"mode": predictor.scale.mode, "factor": predictor.scale.factor},
        "network": predictor.network.name,
        # What the model is (nn.network.network_record): arch, encoder, size divisor, input normalisation.
        "architecture": network_record(predictor.architecture),
        "modes": mode_defaults(),
    }


def _request_meta(annotation: dict, mode: Mode) -> ProjectMeta:
    """A meta for one annotation without its project: each object is parsed by its own geometryType
    (class shape "any"), and the bboxes classes asked for exist even where this image has none."""
    objects = annotation.get("objects")
    titles = [obj.get("classTitle") for obj in objects if isinstance(obj, dict)] if isinstance(objects, list) else []
    if mode.name == "bboxes" and mode.from_classes != MATCH_ALL:
        titles += list(mode.from_classes)
    unique = dict.fromkeys(t for t in titles if isinstance(t, str))
    return ProjectMeta([ObjClass(title, "any", "#000000") for title in unique], [], {})


class ModelQueue:
    """The model thread and its bounded queue of jobs."""

    def __init__(self, predictor: Predictor, size: int) -> None:
        self.predictor = predictor
        self.size = size
        self.running = 0  # jobs in the forward now (read by /health)
        # Every job that waits, in order, until the model thread puts it into a batch: the bound and
        # /health count them all, also one the thread has looked at but could not batch.
        self._waiting: deque[tuple[Job, Future]] = deque()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def full(self) -> bool:
        return len(self._waiting) >= self.size

    def submit(self, job: Job, wait: float = 0) -> Future:
        """The future of the job's Prediction; QueueFull when no place is free within `wait` seconds."""
        future: Future = Future()
        with self._changed:
            if not self._changed.wait_for(lambda: not self.full(), timeout=wait):
                raise QueueFull
            self._waiting.append((job, future))
            self._changed.notify_all()
        return future

    def _run(self) -> None:
        # A daemon thread, never stopped: once the server has drained, nothing is queued, and it ends
        # with the process (also when SIGTERM's drain time ran out in the middle of a forward).
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._waiting)
                batch = [self._waiting.popleft()]
                mode = batch[0][0].mode
                size, _ = batching(mode, self.predictor)
                # Only the jobs right behind it with the same mode: the others keep their turn.
                while len(batch) < size and self._waiting and self._waiting[0][0].mode == mode:
                    batch.append(self._waiting.popleft())
                batch = [(job, future) for job, future in batch if future.set_running_or_notify_cancel()]
                self.running = len(batch)  # with the queue's count, so /health never misses a job
                self._changed.notify_all()
            self._predict(batch)

    def _predict(self, batch: list[tuple[Job, Future]]) -> None:
        if not batch:  # every request of it was cancelled
            self.running = 0
            return
        mode = batch[0][0].mode
        # TTA is the request's choice; the model itself is shared.
        predictor = self.predictor if mode.tta == self.predictor.tta else replace(self.predictor, tta=mode.tta)
        try:
            predictions = predict(mode, predictor, [job.read for job, _ in batch])
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error, the thread goes on
            if not isinstance(exc, TaskError):
                log.exception("the model failed on a request")
            for _, future in batch:
                future.set_exception(exc)
        else:
            for (_, future), prediction in zip(batch, predictions):
                future.set_result(prediction)
        finally:
            self.running = 0
