"""What the model server's two sets of routes (serve.py's own, serve_sdk.py's for the Supervisely SDK)
share: the server's options, the served model, reading requests (bounded bodies, multipart forms whose
JSON parts come as fields or as files, modes) and TaskError as a JSON error with its HTTP status.

Starlette is imported inside the functions: only the server imports this module, after checking
its extra.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugin.errors import InvalidConfig, LimitExceeded, TaskError
from plugin.files import parse_json
from plugin.format.images import UPLOAD

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
    device: int | None = 0  # CUDA device index (the CPU where there is no CUDA); None: the CPU
    amp: str = "auto"
    backend: str = "torch"  # or "onnxruntime": model.onnx (sly-unet export) instead of model.pt
    # Requests waiting for the model, beside the batch it is running; each holds its decoded image.
    queue_size: int = 16
    max_request_bytes: int = 64 * 2**20
    max_image_pixels: int | None = None  # None: the project's default, 2^28
    # How long SIGTERM waits for the requests in flight before cancelling them.
    drain_seconds: float = 60.0
    # The SDK routes (serve_sdk.py): files in one batch request; async requests held at once, each
    # with its files' bytes and its unpopped results, and how long one is kept after a client last
    # asked about it; whether /inference_image_url may fetch, and for how long.
    max_batch_files: int = 64
    max_async_requests: int = 8
    async_ttl_seconds: float = 600.0
    allow_url_fetch: bool = False
    url_timeout_seconds: float = 30.0


class ServedModel:
    """The model as the request handlers see it: loading, loaded (its queue), or failed to load."""

    def __init__(self) -> None:
        self.queue: Any = None  # model_queue.ModelQueue once loaded
        self.error: Exception | None = None

    def not_ready(self) -> Any:
        """None once loaded; else the 503 that says why not."""
        from starlette.responses import JSONResponse

        if self.error is not None:
            return JSONResponse({"status": "failed", "error": str(self.error)}, 503)
        if self.queue is None:
            return unavailable("loading", "the model is loading; retry shortly")
        return None


class NotFound(TaskError):
    """Something a request names that the server does not hold (an async request's uuid): 404."""


class TooManyRequests(TaskError):
    """A request over a count the server bounds (async requests held): 429."""


class Forbidden(TaskError):
    """Something this server was not started to do (fetching URLs): 403."""


# Errors about the request's form rather than its content: 400, not 422.
_MALFORMED = (UPLOAD, REQUEST, "files", "state", "settings", "state.image_url", "state.inference_request_uuid")


def status_of(exc: TaskError) -> int:
    """413 over a size limit, 404 an unknown name, 429 too many, 403 not allowed, 400 an unreadable
    request or image, 422 a bad mode, setting or annotation."""
    if isinstance(exc, LimitExceeded):
        return 413
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, TooManyRequests):
        return 429
    if not isinstance(exc, InvalidConfig) and (exc.where in _MALFORMED or str(exc.where).startswith("files[")):
        return 400
    return 422


def error_response(exc: TaskError) -> Any:
    """The JSON error: the message, where it is, and for a 422 each problem listed."""
    from starlette.responses import JSONResponse

    status = status_of(exc)
    body: dict = {"error": str(exc), "where": exc.where}
    if status == 422:
        body["problems"] = list(exc.problems) if isinstance(exc, InvalidConfig) else [str(exc)]
    return JSONResponse(body, status)


def unavailable(status: str, detail: str) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"status": status, "error": detail}, 503, headers={"Retry-After": str(RETRY_AFTER)})


async def read_body(request: Any, limit: int) -> bytes:
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


def content_type(request: Any) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_form(request: Any, body: bytes, limit: int, max_files: int) -> Any:
    """The multipart form of `body` (FormData): at most `max_files` file parts and a few fields."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        return await MultiPartParser(request.headers, stream(), max_files=max_files, max_fields=16,
                                     max_part_size=limit).parse()
    except MultiPartException as exc:
        raise TaskError(f"the multipart form cannot be read: {exc.message}", where=REQUEST) from None


async def json_part(form: Any, key: str) -> dict | None:
    """The JSON object in the form's `key`, sent as a plain field or as a file part (curl -F key=@f.json,
    requests' files={key: (name, data)}); None when absent."""
    from starlette.datastructures import UploadFile

    value = form.get(key)
    if value is None:
        return None
    return parse_json(await value.read() if isinstance(value, UploadFile) else str(value), key)


async def file_parts(form: Any, key: str) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each file part under `key`, in order."""
    from starlette.datastructures import UploadFile

    return [(part.filename or "", await part.read()) for part in form.getlist(key) if isinstance(part, UploadFile)]


async def guarded(handle: Any, model: ServedModel, options: ServeOptions, refuse_when_full: bool = True) -> Any:
    """An inference handler's answer, or the JSON error it ends in: 503 while the model loads or its
    queue is full (checked first too, unless the handler waits for a place), the TaskError's status,
    or 500 (logged) for anything else, never a traceback."""
    from starlette.responses import JSONResponse

    from plugin.inference.model_queue import QueueFull

    def busy() -> Any:
        return unavailable("busy", f"the queue of {options.queue_size} requests is full; retry shortly")

    waiting = model.not_ready()
    if waiting is not None:
        return waiting
    if refuse_when_full and model.queue.full():  # early, before reading anything; submit decides
        return busy()
    try:
        return await handle()
    except QueueFull:
        return busy()
    except TaskError as exc:
        return error_response(exc)
    except Exception as exc:  # noqa: BLE001 - a JSON 500, never a traceback to the client
        log.exception("a request failed")
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)
