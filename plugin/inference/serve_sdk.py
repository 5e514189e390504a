"""The model server's routes for the Supervisely SDK's clients (`Session(api, session_url=URL)`,
`ModelAPI(url=URL)`), as the SDK's own `Inference` server answers them. The answers' content is
inference/sdk_protocol.py's; every annotation comes from model_queue.predict_request or
predict_files, the code path of POST /model/inference, so the two cannot drift.

Every model route is a POST, as the SDK posts them all: a JSON body {"state": {...}, "context": {...},
"api_token"?}, or for uploads a multipart form with the images in `files` and a JSON field (or file
part) `settings` or `state`; the inference settings are state.settings. Health: GET /livez and
/is_alive, GET or POST /is_ready.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any
from urllib.parse import urlparse

from plugin.config.load import mode_config, mode_defaults
from plugin.config.typed import SDK_RUNTIMES, Mode
from plugin.errors import LimitExceeded, TaskError
from plugin.files import parse_json
from plugin.inference import serving
from plugin.inference.sdk_protocol import (
    AsyncRequest,
    AsyncRequests,
    Deployment,
    deploy_info,
    image_result,
    output_meta,
    published_settings,
    session_info,
    settings_mode,
)
from plugin.inference.serving import ServedModel, ServeOptions

log = logging.getLogger(__name__)

IMAGE_URL = "state.image_url"


def sdk_routes(model: ServedModel, options: ServeOptions, held: AsyncRequests) -> list:
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from plugin.inference.model_queue import predict_files, predict_request

    def deployment() -> Deployment:
        predictor = model.queue.predictor
        runtime = next(sdk for sdk, backend in SDK_RUNTIMES.items() if backend == options.backend)
        return Deployment(predictor.architecture.describe(), str(options.model_dir), str(predictor.device),
                          runtime, predictor.network.name, options.max_batch_files)

    def loaded(answer: Any) -> Any:
        """A route that needs the model: its answer once loaded, else the 503 that says why not."""
        async def route(request: Request) -> JSONResponse:
            return model.not_ready() or JSONResponse(answer())
        return route

    async def alive(_: Request) -> JSONResponse:
        return JSONResponse({"running": True})

    async def is_ready(_: Request) -> JSONResponse:
        return model.not_ready() or JSONResponse({"status": "ready"})

    async def is_deployed(_: Request) -> JSONResponse:
        return JSONResponse({"deployed": model.queue is not None})

    async def status(_: Request) -> JSONResponse:
        queue = model.queue
        return JSONResponse({"is_deployed": queue is not None, "queued": queue.waiting if queue else 0,
                             "running": queue.running if queue else 0, "async_requests": len(held)})

    async def custom_settings(_: Request) -> JSONResponse:
        return JSONResponse({"settings": published_settings(mode_defaults())})

    def request_mode(state: dict) -> tuple[Mode, bool]:
        mode, confidence = settings_mode(state.get("settings"), model.queue.predictor.class_titles,
                                         state.get("batch_size"))
        return mode_config(mode, where="settings").mode, confidence

    async def inference_image(request: Request) -> JSONResponse:
        async def handle() -> JSONResponse:
            state, files = await _upload(request, options)
            if len(files) != 1:
                raise TaskError(f"send one image file in the field \"files\", not {len(files)} (several: "
                                "/inference_batch)", where="files")
            mode, confidence = request_mode(state)
            return JSONResponse(image_result(await predict_request(model.queue, mode, files[0][1], None, confidence)))
        return await serving.guarded(handle, model, options)

    async def inference_batch(request: Request) -> JSONResponse:
        async def handle() -> JSONResponse:
            state, files = await _upload(request, options)
            mode, confidence = request_mode(state)
            results: list[dict] = [{}] * len(files)

            def keep(index: int, annotation: dict) -> None:
                results[index] = image_result(annotation, files[index][0])

            await asyncio.to_thread(predict_files, model.queue, mode, files, confidence, keep)
            return JSONResponse(results)
        return await serving.guarded(handle, model, options)

    async def inference_image_url(request: Request) -> JSONResponse:
        async def handle() -> JSONResponse:
            state = await _json_state(request, options)
            mode, confidence = request_mode(state)
            image = await asyncio.to_thread(_fetch, state.get("image_url"), options)
            return JSONResponse(image_result(await predict_request(model.queue, mode, image, None, confidence)))
        return await serving.guarded(handle, model, options)

    async def inference_batch_async(request: Request) -> JSONResponse:
        async def handle() -> JSONResponse:
            state, files = await _upload(request, options)
            mode, confidence = request_mode(state)
            queue = model.queue

            def run(job: AsyncRequest, lock: threading.Lock) -> None:
                def keep(index: int, annotation: dict) -> None:
                    with lock:
                        job.pending.append(image_result(annotation, files[index][0]))
                        job.done += 1

                try:
                    predict_files(queue, mode, files, confidence, keep, stopped=lambda: job.stopped)
                except Exception as exc:  # noqa: BLE001 - the client reads it from the request's status
                    if not isinstance(exc, TaskError):
                        log.exception("an async inference request failed")
                    with lock:
                        job.exception = {"type": type(exc).__name__, "message": str(exc)}
                finally:
                    with lock:
                        job.finished = True

            job = held.start(len(files), run)
            return JSONResponse({"message": "Scheduled inference task.", "inference_request_uuid": job.uuid,
                                 "progress": job.status()["progress"]})

        # Its images wait for places in the queue in the background: a full queue is no refusal.
        return await serving.guarded(handle, model, options, refuse_when_full=False)

    def on_request(act: Any) -> Any:
        """A route about one async request (state.inference_request_uuid): 404 for an unknown one."""
        async def route(request: Request) -> JSONResponse:
            try:
                state = await _json_state(request, options)
                return JSONResponse(act(state.get("inference_request_uuid")))
            except TaskError as exc:
                return serving.error_response(exc)
        return route

    def stop(request_uuid: object) -> dict:
        held.stop(request_uuid)
        return {"message": "Inference will be stopped.", "success": True}

    def clear(request_uuid: object) -> dict:
        held.clear(request_uuid)
        return {"success": True}

    return [
        Route("/livez", alive, methods=["GET"]),
        Route("/is_alive", alive, methods=["GET"]),
        Route("/is_ready", is_ready, methods=["GET", "POST"]),
        Route("/is_deployed", is_deployed, methods=["POST"]),
        Route("/get_status", status, methods=["POST"]),
        Route("/get_session_info",
              loaded(lambda: session_info(deployment(), model.queue.predictor.class_titles)), methods=["POST"]),
        Route("/get_deploy_info", loaded(lambda: deploy_info(deployment())), methods=["POST"]),
        *[Route(path, loaded(lambda: output_meta(model.queue.predictor.class_titles, model.queue.predictor.color_of)),
                methods=["POST"]) for path in ("/get_output_classes_and_tags", "/get_model_meta")],
        Route("/get_custom_inference_settings", custom_settings, methods=["POST"]),
        Route("/inference_image", inference_image, methods=["POST"]),
        Route("/inference_batch", inference_batch, methods=["POST"]),
        Route("/inference_image_url", inference_image_url, methods=["POST"]),
        Route("/inference_batch_async", inference_batch_async, methods=["POST"]),
        Route("/get_inference_progress", on_request(held.status), methods=["POST"]),
        Route("/get_inference_status", on_request(held.status), methods=["POST"]),
        Route("/get_inference_result", on_request(held.status), methods=["POST"]),
        Route("/pop_inference_results", on_request(held.pop), methods=["POST"]),
        Route("/stop_inference", on_request(stop), methods=["POST"]),
        Route("/clear_inference_request", on_request(clear), methods=["POST"]),
    ]


async def _json_state(request: Any, options: ServeOptions) -> dict:
    """The `state` of an SDK JSON body ({} for an empty body)."""
    body = await serving.read_body(request, options.max_request_bytes)
    if not body.strip():
        return {}
    return _state_of(parse_json(body, serving.REQUEST).get("state"))


async def _upload(request: Any, options: ServeOptions) -> tuple[dict, list[tuple[str, bytes]]]:
    """(state, [(file name, bytes)]) of an SDK upload: the images in `files`, the state in `state` or
    `settings` (a JSON field or file part, the SDK sends either)."""
    body = await serving.read_body(request, options.max_request_bytes)
    if serving.content_type(request) != "multipart/form-data":
        raise TaskError("send the images as multipart/form-data, in the field \"files\"", where=serving.REQUEST)
    form = await serving.read_form(request, body, options.max_request_bytes, max_files=options.max_batch_files + 2)
    files = await serving.file_parts(form, "files")
    if not files:
        raise TaskError("the form has no image in the field \"files\"", where="files")
    if len(files) > options.max_batch_files:
        raise LimitExceeded(f"{len(files)} files in one request, over the limit of {options.max_batch_files} "
                            "(--max-batch-files)", where="files")
    state = await serving.json_part(form, "state")
    if not state:  # the SDK's rule: an empty state gives way to settings
        state = await serving.json_part(form, "settings")
    return _state_of(state), files


def _state_of(state: object) -> dict:
    if state is None:
        return {}
    if not isinstance(state, dict):
        raise TaskError("must be a JSON object", where="state")
    return state


def _fetch(url: object, options: ServeOptions) -> bytes:
    """The bytes at an http(s) URL, within --max-request-bytes and --url-timeout-seconds in all;
    serving.Forbidden unless the server was started with --allow-url-fetch (it would otherwise fetch any
    address its network reaches, for whoever can reach the server)."""
    import requests

    if not options.allow_url_fetch:
        raise serving.Forbidden("this server does not fetch URLs; start it with --allow-url-fetch, or send the image "
                        "to /inference_image", where=IMAGE_URL)
    if not isinstance(url, str) or urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc:
        raise TaskError(f"must be an http(s) URL, not {url!r}", where=IMAGE_URL)
    deadline = time.monotonic() + options.url_timeout_seconds
    chunks, size = [], 0
    try:
        with requests.get(url, stream=True, timeout=options.url_timeout_seconds) as response:
            if response.status_code != 200:
                raise TaskError(f"{url} answered HTTP {response.status_code}", where=IMAGE_URL)
            for chunk in response.iter_content(64 * 1024):
                size += len(chunk)
                if size > options.max_request_bytes:
                    raise LimitExceeded(f"{url} holds over {options.max_request_bytes} bytes (--max-request-bytes)",
                                        where=IMAGE_URL)
                if time.monotonic() > deadline:
                    raise TaskError(f"{url} took over {options.url_timeout_seconds:g} s (--url-timeout-seconds)",
                                    where=IMAGE_URL)
                chunks.append(chunk)
    except requests.RequestException as exc:
        raise TaskError(f"cannot fetch {url}: {type(exc).__name__}", where=IMAGE_URL) from None
    return b"".join(chunks)
