"""`sly-unet serve` as a real process for the tests: started on a free loopback port, its log lines kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.conftest import REPO


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    lines: list[dict] = field(default_factory=list)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.lines
            if requests.get(self.url + "/health", timeout=5).status_code == 200:
                return
            time.sleep(0.1)
        raise AssertionError("the server did not load its model")

    def wait_health(self, **expected: int) -> None:
        """Until /health shows the queue as `expected` (running=1, queued=1, ...)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            health = requests.get(self.url + "/health", timeout=5).json()
            if all(health.get(k) == v for k, v in expected.items()):
                return
            time.sleep(0.02)
        raise AssertionError(f"/health never showed {expected}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def start_server(model_dir: Path, *args: str, verb: str | None = None) -> Server:
    """The container's command (with the SDK's verb `deploy`, or none) on a free loopback port (--port 0;
    the port is read from its first line)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "entrypoints.serve", *([verb] if verb else []), "--model", str(model_dir), "--host", "127.0.0.1", "--port", "0",
         "--log-format", "json", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    server = Server(proc, "")
    first = json.loads(proc.stdout.readline())
    server.lines.append(first)
    if "port" in first:
        server.url = f"http://127.0.0.1:{first['port']}"

    def drain() -> None:
        for line in proc.stdout:
            server.lines.append(json.loads(line) if line.startswith("{") else {"raw": line})

    threading.Thread(target=drain, daemon=True).start()
    return server
