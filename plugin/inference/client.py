"""A client of `sly-unet serve` on `requests` (no torch): the image as a multipart upload, 503s retried.

A 503 (queue full, model loading) is retried up to `retries` times, after the server's Retry-After
(capped at `max_wait` seconds); any other error status raises ServerError with the server's JSON.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from plugin.errors import TaskError

CONNECT_TIMEOUT = 10.0


class ServerError(TaskError):
    """The server answered an error status; `status` and `body` (its JSON, or {"error": text}) tell which."""

    def __init__(self, message: str, status: int, body: dict, where: str) -> None:
        super().__init__(message, where)
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Client:
    url: str  # e.g. http://127.0.0.1:8000
    timeout: float = 120.0  # seconds to wait for an answer, per attempt
    retries: int = 5  # further attempts after a 503
    max_wait: float = 10.0  # the longest wait between attempts
    session: requests.Session = field(default_factory=requests.Session, compare=False, repr=False)

    def health(self) -> dict:
        """{"status": "ready" | "loading" | "failed", ...}; never retried or raised for a 503."""
        return self._once("GET", "/health").json()

    def info(self) -> dict:
        return self._call("GET", "/model/info").json()

    def predict(
        self, image: bytes | Path, mode: dict | None = None, annotation: dict | None = None, confidence: bool = False
    ) -> dict:
        """The annotation of the prediction (Supervisely JSON: size and the predicted objects)."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        form = {"confidence": "true" if confidence else "false"}
        if mode is not None:
            form["mode"] = json.dumps(mode)
        if annotation is not None:
            form["annotation"] = json.dumps(annotation)
        return self._call("POST", "/model/inference", data=form, files={"image": ("image", data)}).json()

    def _call(self, method: str, path: str, **kwargs: object) -> requests.Response:
        for attempt in range(self.retries + 1):
            response = self._once(method, path, **kwargs)
            if response.status_code != 503 or attempt == self.retries:
                break
            time.sleep(self._wait(response, attempt))
        if not response.ok:
            body = _json(response)
            raise ServerError(
                f"{method} {path} answered {response.status_code}: {body.get('error', body)}",
                response.status_code, body, where=self.url,
            )
        return response

    def _once(self, method: str, path: str, **kwargs: object) -> requests.Response:
        try:
            return self.session.request(
                method, self.url.rstrip("/") + path, timeout=(CONNECT_TIMEOUT, self.timeout), **kwargs
            )
        except requests.RequestException as exc:
            raise TaskError(f"no answer from the server: {exc}", where=self.url) from None

    def _wait(self, response: requests.Response, attempt: int) -> float:
        try:
            wait = float(response.headers.get("Retry-After", ""))
        except ValueError:
            wait = 2.0**attempt  # no Retry-After (or an HTTP date): back off
        return min(max(wait, 0.0), self.max_wait)


def _json(response: requests.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {"error": response.text[:500]}
    return body if isinstance(body, dict) else {"error": body}
