"""`sly-unet serve`: a trained model kept in memory behind HTTP, as the legacy plugin's REST server, and
behind the Supervisely SDK's serving routes (inference/serve_sdk.py), so that the SDK's `Session` and
`ModelAPI` clients work against it unmodified.

Our own routes: GET /health, GET /model/info, POST /model/inference (a multipart upload or a JSON
body). The socket is bound and answering before the model loads: torch and the weights load in a
background thread, and until then /health and inference answer 503. Requests are decoded and answered
in a thread pool, and the model runs in one thread of its own (inference/model_queue.py), a batch at a
time; its queue is bounded, and a request that finds it full gets 503 with Retry-After. SIGTERM (or
Ctrl-C) stops accepting connections, lets the requests in flight finish and exits 0.

Starlette, uvicorn and torch are imported only here, when the server starts.
"""

from __future__ import annotations

import base64
import binascii
import errno
import logging
import signal
import socket
import threading
from typing import Any

from plugin.config.load import mode_config
from plugin.errors import TaskError, require_extra
from plugin.files import parse_json
from plugin.format.images import UPLOAD, set_max_image_pixels
from plugin.inference.sdk_protocol import AsyncRequests
from plugin.inference.serving import (
    REQUEST,
    ServedModel,
    ServeOptions,
    content_type,
    file_parts,
    guarded,
    json_part,
    read_body,
    read_form,
)

log = logging.getLogger(__name__)


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
    model = ServedModel()
    held = AsyncRequests(options.max_async_requests, options.async_ttl_seconds)
    config = uvicorn.Config(
        create_app(model, options, held), log_config=None, access_log=False,
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
            log.info("ready: answering POST /model/inference and the Supervisely SDK's routes", extra={"port": port})
        except Exception as exc:  # noqa: BLE001 - re-raised in the main thread, which logs the crash line
            model.error = exc
            server.should_exit = True

    threading.Thread(target=load, name="load-model", daemon=True).start()
    # uvicorn re-raises the signal that stopped it once it has drained; as a no-op here, the process
    # then exits 0 instead of dying by the signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    server.run(sockets=[sock])
    held.close(options.drain_seconds)
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


def create_app(model: ServedModel, options: ServeOptions, held: AsyncRequests) -> Any:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from plugin.inference.serve_sdk import sdk_routes

    async def health(_: Request) -> JSONResponse:
        waiting = model.not_ready()
        if waiting is not None:
            return waiting
        return JSONResponse({"status": "ready", "queued": model.queue.waiting, "running": model.queue.running})

    async def info(_: Request) -> JSONResponse:
        from plugin.inference.model_queue import model_info

        return model.not_ready() or JSONResponse(model_info(model.queue.predictor))

    async def inference(request: Request) -> JSONResponse:
        from plugin.inference.model_queue import predict_request

        async def handle() -> JSONResponse:
            fields = await _read_request(request, options.max_request_bytes)
            mode = mode_config(fields.get("mode")).mode
            return JSONResponse(await predict_request(model.queue, mode, fields["image"], fields.get("annotation"),
                                                      fields.get("confidence", False)))

        return await guarded(handle, model, options)

    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/model/info", info, methods=["GET"]),
        Route("/model/inference", inference, methods=["POST"]),
        *sdk_routes(model, options, held),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


async def _read_request(request: Any, limit: int) -> dict:
    """{"image": bytes, "mode": dict?, "annotation": dict?, "confidence": bool?} from a multipart form
    (fields image, mode, annotation, confidence) or a JSON body (the image as base64)."""
    body = await read_body(request, limit)
    kind = content_type(request)
    if kind == "multipart/form-data":
        return await _form_fields(await read_form(request, body, limit, max_files=4))
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


async def _form_fields(form: Any) -> dict:
    images = await file_parts(form, "image")
    if len(images) != 1:
        raise TaskError(f"the form needs one image file in the field \"image\", not {len(images)}", where=UPLOAD)
    fields: dict = {"image": images[0][1]}
    for key in ("mode", "annotation"):
        value = await json_part(form, key)
        if value is not None:
            fields[key] = value
    if form.get("confidence") is not None:
        fields["confidence"] = {"true": True, "false": False}.get(str(form["confidence"]).lower(), form["confidence"])
    return _checked(fields)


def _checked(fields: dict) -> dict:
    if not isinstance(fields.get("confidence", False), bool):
        raise TaskError("must be true or false", where="confidence")
    if "annotation" in fields and fields["annotation"] is not None and not isinstance(fields["annotation"], dict):
        raise TaskError("must be a Supervisely annotation (a JSON object)", where="annotation")
    return fields
