"""Checkpoint folders under results/: complete before they appear, then announced to the agent.

The agent copies `results/<subdir>` the moment it reads the CHECKPOINT line, so a folder is staged
in tmp/ and renamed into results/ only when both files are on disk. results/ never holds anything
but finished checkpoint folders.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from plugin import agent_log
from plugin.format.classes import ClassMapping
from plugin.jsonfile import write_json
from plugin.nn.weights import CONFIG_NAME, WEIGHTS_NAME


def checkpoint_config(settings: dict, mapping: ClassMapping) -> dict:
    """The legacy config.json shape, so legacy tools read our checkpoints (neutral stays out)."""
    return {
        "settings": settings,
        "out_classes": mapping.out_classes,
        "class_title_to_idx": mapping.title_to_idx,
    }


def legacy_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights named as the legacy DataParallel model saved them (`module.` prefix), on the CPU."""
    return {f"module.{name}": tensor.detach().cpu() for name, tensor in model.state_dict().items()}


@dataclass
class CheckpointWriter:
    """Numbers checkpoints from 0, stages them in tmp/, and tracks the best validation loss."""

    results_dir: Path
    staging_dir: Path
    next_id: int = 0
    best_loss: float = float("inf")

    def save(self, config: dict, model: torch.nn.Module, epoch: float, val_metrics: dict[str, float]) -> Path:
        subdir = f"{self.next_id:08d}"
        final = self.results_dir / subdir
        staging = self.staging_dir / f"{subdir}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write_json(staging / CONFIG_NAME, config)
        torch.save(legacy_state_dict(model), staging / WEIGHTS_NAME)
        sizeb = sum(f.stat().st_size for f in staging.iterdir())
        self.results_dir.mkdir(parents=True, exist_ok=True)
        if final.exists():
            # Only a stale folder from an earlier run can be here: the agent empties results/ first.
            shutil.rmtree(final)
        _move_dir(staging, final)

        loss = val_metrics["loss"]
        best_now = loss < self.best_loss or self.next_id == 0
        self.best_loss = min(self.best_loss, loss)
        agent_log.log_checkpoint(
            self.next_id, subdir, sizeb, best_now, {"epoch": epoch, "val_metrics": val_metrics}
        )
        self.next_id += 1
        return final


def _move_dir(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError:
        # tmp/ and results/ on different mounts: copy beside the target, then rename there.
        beside = dst.with_name(f".{dst.name}.partial")
        shutil.copytree(src, beside)
        os.replace(beside, dst)
        shutil.rmtree(src)
