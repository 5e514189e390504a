"""`sly-unet serve`: a trained model kept in memory behind HTTP, as the legacy plugin's REST server.

GET /health, GET /model/info, POST /model/inference (a multipart upload or a JSON body). The socket
is bound and answering before the model loads: torch and the weights load in a background thread,
and until then /health and inference answer 503. Requests are decoded and answered in a thread pool,
and the model runs in one thread of its own (inference/model_queue.py), a batch at a time; its queue
is bounded, and a request that finds it full gets 503 with Retry-After. SIGTERM (or Ctrl-C) stops
accepting connections, lets the requests in flight finish and exits 0.

Starlette, uvicorn and torch are imported only here, when the server starts.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import logging
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugin.config import inference_config
from plugin.errors import InvalidConfig, LimitExceeded, TaskError, require_extra
from plugin.format.images import UPLOAD, set_max_image_pixels
from plugin.jsonfile import parse_json
from plugin.settings import InferenceConfig

log = logging.getLogger(__name__)

# What errors about the request as a whole name (its size, its encoding).
REQUEST = "request"
# Seconds a client is asked to wait when the queue is full or the model is still loading.
RETRY_AFTER = 1


@dataclass(frozen=True)
class ServeOptions:
    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (logged)
    device: int = 0  # CUDA device index; the CPU where there is no CUDA
    amp: str = "auto"
    backend: str = "torch"  # or "onnxruntime": model.onnx (sly-unet export) instead of model.pt
    # Requests waiting for the model, beside the batch it is running; each holds its decoded image.
    queue_size: int = 16
    max_request_bytes: int = 64 * 2**20
    max_image_pixels: int | None = None  # None: the project's default, 2^28
    # How long SIGTERM waits for the requests in flight before cancelling them.
    drain_seconds: float = 60.0


class _Model:
    """The model as the request handlers see it: loading, loaded (its queue), or failed to load."""

    def __init__(self) -> None:
        self.queue: Any = None  # model_queue.ModelQueue once loaded
        self.error: Exception | None = None


def serve(options: ServeOptions) -> None:
    """Bind, load the model in the background and serve until SIGTERM; TaskError when the port is taken
    or the model does not load (the crash line, exit 1)."""
    require_extra("serve", ("starlette", "uvicorn", "python_multipart"), where="serve")
    import uvicorn

    if options.max_image_pixels is not None:
        set_max_image_pixels(options.max_image_pixels)
    sock = _bind(options.host, options.port)
    port = sock.getsockname()[1]
    log.info(
        f"serving on http://{options.host}:{port} (the model is loading)", extra={"host": options.host, "port": port}
    )
    model = _Model()
    config = uvicorn.Config(
        build_app(model, options), log_config=None, access_log=False,
        timeout_graceful_shutdown=options.drain_seconds,
    )
    server = uvicorn.Server(config)
    # Its start-up lines say what ours say; its warnings and errors still come through.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").addFilter(_without_colour)

    def load() -> None:
        try:
            from plugin.inference.model_queue import ModelQueue
            from plugin.inference.predictor import load_predictor

            predictor = load_predictor(options.model_dir, options.device, (), options.amp, options.backend)
            model.queue = ModelQueue(predictor, options.queue_size)
            log.info("ready: answering POST /model/inference", extra={"port": port})
        except Exception as exc:  # noqa: BLE001 - re-raised in the main thread, which logs the crash line
            model.error = exc
            server.should_exit = True

    threading.Thread(target=load, name="load-model", daemon=True).start()
    # uvicorn re-raises the signal that stopped it once it has drained; as a no-op here, the process
    # then exits 0 instead of dying by the signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    server.run(sockets=[sock])
    if model.error is not None:
        raise model.error
    log.info("stopped: every request in flight was answered")


def _without_colour(record: logging.LogRecord) -> bool:
    # uvicorn attaches its message again with terminal colour codes, which would become a field of the
    # agent's JSON line.
    record.__dict__.pop("color_message", None)
    return True


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise TaskError(f"port {port} on {host} is already in use; choose another --port", where="--port") from None
        raise TaskError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", where="--host") from None
    sock.listen(128)
    return sock


def build_app(model: _Model, options: ServeOptions) -> Any:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def unavailable(status: str, detail: str) -> JSONResponse:
        return JSONResponse({"status": status, "error": detail}, 503, headers={"Retry-After": str(RETRY_AFTER)})

    def not_ready() -> JSONResponse | None:
        if model.error is not None:
            return JSONResponse({"status": "failed", "error": str(model.error)}, 503)
        if model.queue is None:
            return unavailable("loading", "the model is loading; retry shortly")
        return None

    async def health(_: Request) -> JSONResponse:
        waiting = not_ready()
        if waiting is not None:
            return waiting
        return JSONResponse({"status": "ready", "queued": model.queue.waiting, "running": model.queue.running})

    async def info(_: Request) -> JSONResponse:
        from plugin.inference.model_queue import model_info

        return not_ready() or JSONResponse(model_info(model.queue.predictor))

    async def inference(request: Request) -> JSONResponse:
        waiting = not_ready()
        if waiting is not None:
            return waiting
        from plugin.inference.model_queue import QueueFull, answer, prepare

        queue = model.queue
        if queue.full():  # early, before decoding anything; submit decides
            return unavailable("busy", f"the queue of {options.queue_size} requests is full; retry shortly")
        try:
            fields = await _read_request(request, options.max_request_bytes)
            config = _mode_config(fields.get("mode"))
            job = await run_in_threadpool(
                prepare, queue.predictor, config.mode, fields["image"], fields.get("annotation"),
                fields.get("confidence", False),
            )
            prediction = await asyncio.wrap_future(queue.submit(job))
            return JSONResponse(await run_in_threadpool(answer, job, prediction))
        except QueueFull:
            return unavailable("busy", f"the queue of {options.queue_size} requests is full; retry shortly")
        except TaskError as exc:
            return _error_response(exc)
        except Exception as exc:  # noqa: BLE001 - a JSON 500, never a traceback to the client
            log.exception("a request failed")
            return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)

    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/model/info", info, methods=["GET"]),
        Route("/model/inference", inference, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def _error_response(exc: TaskError) -> Any:
    """413 over a limit, 400 an unreadable image or request, 422 a bad mode or annotation (each problem listed)."""
    from starlette.responses import JSONResponse

    if isinstance(exc, LimitExceeded):
        status = 413
    elif exc.where in (UPLOAD, REQUEST):
        status = 400
    else:
        status = 422
    body: dict = {"error": str(exc), "where": exc.where}
    if status == 422:
        body["problems"] = list(exc.problems) if isinstance(exc, InvalidConfig) else [str(exc)]
    return JSONResponse(body, status)


def _mode_config(mode: object) -> InferenceConfig:
    """The request's mode through the inference config's defaults and schema (problems named mode.<key>)."""
    if mode is None:
        mode = {}
    if not isinstance(mode, dict):
        raise TaskError("must be a JSON object such as {\"name\": \"full_image\"}", where="mode")
    return InferenceConfig.from_dict(inference_config({"model": {}, "mode": mode}, where="mode"))


async def _read_request(request: Any, limit: int) -> dict:
    """{"image": bytes, "mode": dict?, "annotation": dict?, "confidence": bool?} from a multipart form
    (fields image, mode, annotation, confidence) or a JSON body (the image as base64)."""
    body = await _read_body(request, limit)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return await _form_fields(request.headers, body, limit)
    if kind == "application/json":
        doc = parse_json(body, REQUEST)
        unknown = sorted(set(doc) - {"image", "mode", "annotation", "confidence"})
        if unknown:
            raise TaskError(f"unknown keys {unknown}; the body has image, mode, annotation, confidence", where=REQUEST)
        image = doc.get("image")
        if not isinstance(image, str):
            raise TaskError("the JSON body needs \"image\": the image file as base64", where=UPLOAD)
        try:
            doc["image"] = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise TaskError("\"image\" is not valid base64", where=UPLOAD) from None
        return _checked(doc)
    raise TaskError(f"send multipart/form-data or application/json, not {kind or 'no content type'!r}", where=REQUEST)


async def _read_body(request: Any, limit: int) -> bytes:
    chunks, size = [], 0
    # Read to the end even past the limit, so that the client gets the 413 instead of a broken pipe.
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise LimitExceeded(
            f"the request is {size} bytes, over the limit of {limit} (--max-request-bytes)", where=REQUEST
        )
    return b"".join(chunks)


async def _form_fields(headers: Any, body: bytes, limit: int) -> dict:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=1, max_fields=8, max_part_size=limit).parse()
    except MultiPartException as exc:
        raise TaskError(f"the multipart form cannot be read: {exc.message}", where=REQUEST) from None
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise TaskError("the form needs the image file in the field \"image\"", where=UPLOAD)
    fields: dict = {"image": await upload.read()}
    for key in ("mode", "annotation"):
        if form.get(key) is not None:
            fields[key] = parse_json(str(form[key]), key)
    if form.get("confidence") is not None:
        fields["confidence"] = {"true": True, "false": False}.get(str(form["confidence"]).lower(), form["confidence"])
    return _checked(fields)


def _checked(fields: dict) -> dict:
    if not isinstance(fields.get("confidence", False), bool):
        raise TaskError("must be true or false", where="confidence")
    if "annotation" in fields and fields["annotation"] is not None and not isinstance(fields["annotation"], dict):
        raise TaskError("must be a Supervisely annotation (a JSON object)", where="annotation")
    return fields
