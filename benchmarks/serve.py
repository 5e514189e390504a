"""Model server throughput: `sly-unet serve` as a real process, N concurrent clients on loopback.

Each client sends one image with full_image as fast as the answers come, for a fixed time; printed:
requests/s over all clients, and the p50 and p99 latency of a request (sent to answered), with the
command that reproduces them. The model is a seeded one of the default network (benchmarks/inference.make_task).

`.venv/bin/python -m benchmarks.serve [--clients 8] [--seconds 20] [--size 512] [--input-size 256]`
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from benchmarks.inference import make_task
from plugin.format.project import list_items
from plugin.inference.client import Client

REPO = Path(__file__).resolve().parent.parent


def bench_serve(clients: int, seconds: float, size: int, input_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="sly-unet-serve-bench-") as tmp:
        task = make_task(Path(tmp) / "task", images=1, size=size, input_size=input_size, mode={"name": "full_image"})
        image = list_items(task.data_dir / "bench")[0].image_path.read_bytes()
        proc = subprocess.Popen(
            [sys.executable, "-m", "plugin.cli", "serve", "--model", str(task.model_dir), "--port", "0",
             "--log-format", "json"],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
        )
        try:
            url = f"http://127.0.0.1:{json.loads(proc.stdout.readline())['port']}"
            while requests.get(url + "/health", timeout=10).status_code != 200:
                assert proc.poll() is None, "the server exited"
                time.sleep(0.2)
            Client(url).predict(image)  # warm-up: the first forward allocates
            latencies: list[float] = []
            start = time.perf_counter()
            deadline = start + seconds

            def loop(_: int) -> None:
                client = Client(url, retries=0)
                while time.perf_counter() < deadline:
                    sent = time.perf_counter()
                    client.predict(image)
                    latencies.append(time.perf_counter() - sent)

            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(loop, range(clients)))
            elapsed = time.perf_counter() - start
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "per_second": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=512, help="side of the square JPEG sent")
    parser.add_argument("--input-size", type=int, default=256, help="the model's input side")
    args = parser.parse_args()
    result = bench_serve(args.clients, args.seconds, args.size, args.input_size)
    print(
        f"serve: {args.clients} clients, {args.size}x{args.size} JPEG, "
        f"full_image at {args.input_size}x{args.input_size}: "
        f"{result['per_second']:.2f} requests/s ({result['requests']} in {args.seconds:g} s), "
        f"latency p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms\n"
        f"  reproduce: .venv/bin/python -m benchmarks.serve --clients {args.clients} --seconds {args.seconds:g} "
        f"--size {args.size} --input-size {args.input_size}"
    )


if __name__ == "__main__":
    main()
