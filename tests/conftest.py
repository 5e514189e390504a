"""Shared fixtures: real task dirs on disk, and a runner for the train container's command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from plugin.synthetic import create_project

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
ISBI = SHARED / "data" / "isbi2012-membranes"

TINY_CONFIG = {
    "input_size": {"width": 64, "height": 64},
    "batch_size": {"train": 2, "val": 2},
    "data_workers": {"train": 0, "val": 0},
    "epochs": 1,
    "val_every": 1,
    "lr": 0.001,
    # Whole images resized (one sample, one forward each): the suite's small tasks stay quick. Crops,
    # the default, have their own tests (test_crop.py).
    "scale": {"mode": "resize", "factor": 1.0},
    "gpu_devices": [0],
    # A METRICS line per iteration, as the tests read them (the default is about one per 10 s).
    "log_every": {"seconds": None, "iterations": 1},
}


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[dict]:
        """Every stdout line, parsed: the agent reads each one as JSON."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def events(self, name: str) -> list[dict]:
        return [line for line in self.lines if line.get("event_type") == f"EventType.{name}"]


def run_entrypoint(module: str, task_dir: Path, *args: str) -> Run:
    """Run `python -m <module> --task-dir DIR` as the container would, with JSON logs on stdout."""
    env = {k: v for k, v in os.environ.items() if k != "SLY_TASK_DIR"}
    proc = subprocess.run(
        [sys.executable, "-m", module, "--task-dir", str(task_dir), "--log-format", "json", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def make_task(root: Path, config: dict | None = None, n_train: int = 4, n_val: int = 2, size: int = 64) -> Path:
    """A task dir with a synthetic project (rings, blobs, boxes, neutral) and a train config."""
    create_project(root / "data" / "shapes", n_train=n_train, n_val=n_val, size=size, seed=1)
    (root / "task_config.json").write_text(json.dumps(TINY_CONFIG if config is None else config, indent=4))
    return root


@pytest.fixture(scope="session")
def trained_task(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Run]:
    """One tiny full training run (64x64, 1 epoch), shared by the tests that inspect its outputs."""
    root = make_task(tmp_path_factory.mktemp("trained") / "task")
    return root, run_entrypoint("entrypoints.train", root)


@pytest.fixture(scope="session")
def checkpoint(trained_task: tuple[Path, Run]) -> Path:
    """The first checkpoint folder (config.json + model.pt) of the shared training run."""
    root, run = trained_task
    assert run.returncode == 0, run.stderr[-3000:]
    return root / "results" / "00000000"


@pytest.fixture(scope="session")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The four 64x64 images of a synthetic project, for the model server's tests."""
    root = tmp_path_factory.mktemp("images")
    create_project(root / "shapes", n_train=3, n_val=1, size=64, seed=7)
    return sorted((root / "shapes").glob("*/img/*"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sdk: runs the Supervisely SDK's clients from build/sdk-venv (make test-sdk)")
