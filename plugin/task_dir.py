"""Where the task directory is and what lies in it (the agent mounts it at /sly_task_data)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from plugin.errors import TaskError

DEFAULT_TASK_DIR = Path("/sly_task_data")
TASK_DIR_ENV = "SLY_TASK_DIR"


@dataclass(frozen=True)
class TaskDir:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "task_config.json"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def state_path(self) -> Path:
        """The resume state: beside results/, which keeps only the legacy checkpoint folders."""
        return self.tmp_dir / "resume" / "state.pt"

    @property
    def train_log_path(self) -> Path:
        """The train log's copy (every run on the task dir appends to it): curves and `sly-unet plot`."""
        return self.tmp_dir / "train_log.jsonl"

    @property
    def inference_log_path(self) -> Path:
        return self.tmp_dir / "inference_log.jsonl"

    @property
    def progress_path(self) -> Path:
        """The training curves, redrawn at each validation."""
        return self.tmp_dir / "progress.png"

    @property
    def checkpoint_staging_dir(self) -> Path:
        """Where a checkpoint folder is written before it is renamed into results/."""
        return self.tmp_dir / "checkpoints"

    @property
    def mask_cache_dir(self) -> Path:
        return self.tmp_dir / "mask_cache"

    def output_staging_dir(self, project_name: str) -> Path:
        """Where the inference output project is built before it is moved into results/."""
        return self.tmp_dir / f"{project_name}.partial"


def resolve_task_dir(arg: str | None) -> TaskDir:
    """The task dir from --task-dir, else $SLY_TASK_DIR, else /sly_task_data; TaskError if it is not a directory."""
    if arg:
        root, source = Path(arg), "--task-dir"
    elif os.environ.get(TASK_DIR_ENV):
        root, source = Path(os.environ[TASK_DIR_ENV]), TASK_DIR_ENV
    else:
        root, source = DEFAULT_TASK_DIR, None

    root = root.expanduser().absolute()
    if root.is_dir():
        return TaskDir(root)
    problem = "is not a directory" if root.exists() else "does not exist"
    if source is None:
        raise TaskError(
            f"task directory {problem}. Mount it with `docker run -v TASK_DIR:{DEFAULT_TASK_DIR} ...`, "
            f"or pass --task-dir PATH or set {TASK_DIR_ENV}=PATH",
            where=root,
        )
    raise TaskError(f"task directory (from {source}) {problem}", where=root)
