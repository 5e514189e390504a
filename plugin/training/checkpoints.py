"""Checkpoint folders under results/: complete before they appear, then announced to the agent.

The agent copies `results/<subdir>` the moment it reads the CHECKPOINT line, so a folder is staged
in tmp/ and renamed into results/ only when both files are on disk. results/ never holds anything
but finished checkpoint folders.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plugin import agent_log
from plugin.errors import TaskError
from plugin.files import open_for_writing, refuse_symlink, write_json
from plugin.format.classes import ClassMapping
from plugin.nn.weights import CONFIG_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)


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
    """Numbers checkpoints from 0 (or from where a resumed run left off), stages them in tmp/, tracks
    the best validation loss, and keeps the best and the last `keep` folders when `keep` is set.
    `model_record` is added to every config.json: what the train task knows of the model beyond the
    settings (the network, the scale training presented images at)."""

    results_dir: Path
    staging_dir: Path
    keep: int | None = None
    model_record: dict = field(default_factory=dict)
    next_id: int = 0
    best_loss: float = float("inf")
    best_subdir: str | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    saved: list[str] = field(default_factory=list)  # subdirs written by this run, oldest first, pruned ones out

    def save(
        self,
        config: dict,
        model: torch.nn.Module,
        epoch: float,
        val_metrics: dict[str, float],
        end: str | None = None,
        before_announce: Callable[[], None] | None = None,
    ) -> Path:
        """Write results/<next id>/, run `before_announce` (the resume state is written there, so that it
        names this checkpoint), then log the CHECKPOINT line; `end` marks the run's last checkpoint
        with why the run ends early ("time_budget", "early_stopping")."""
        weights = legacy_state_dict(model)
        bad = [name for name, tensor in weights.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
        if bad:
            raise TaskError(
                f"the weights are not finite ({len(bad)} tensors, {bad[0]} first) at epoch {epoch:.2f}, so no "
                "checkpoint is written: training diverged; lower lr",
                where="lr",
            )
        subdir = f"{self.next_id:08d}"
        final = self.results_dir / subdir
        staging = self.staging_dir / f"{subdir}.partial"
        refuse_symlink(final)
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            write_json(staging / CONFIG_NAME, {**config, **self.model_record})
            save_file(staging / WEIGHTS_NAME, weights)
            sizeb = sum(f.stat().st_size for f in staging.iterdir())
            self.results_dir.mkdir(parents=True, exist_ok=True)
            if final.exists():
                # Only a stale folder from an earlier run can be here: the agent empties results/ first.
                shutil.rmtree(final)
            _move_dir(staging, final)
        except (OSError, RuntimeError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise TaskError(f"cannot write checkpoint {subdir}: {exc}", where=staging) from exc

        loss = val_metrics["loss"]
        best_now = loss < self.best_loss or self.next_id == 0
        if best_now:
            self.best_subdir, self.best_metrics = subdir, dict(val_metrics)
        self.best_loss = min(self.best_loss, loss)
        self.next_id += 1
        self.saved.append(subdir)
        if before_announce is not None:
            before_announce()
        optional: dict = {"epoch": epoch, "val_metrics": val_metrics}
        if end is not None:
            optional["end"] = end
        agent_log.log_checkpoint(self.next_id - 1, subdir, sizeb, best_now, optional)
        self._prune()
        return final

    def state_dict(self) -> dict:
        """The counters a resumed run continues from."""
        return {"next_id": self.next_id, "best_loss": self.best_loss, "best_subdir": self.best_subdir,
                "best_metrics": self.best_metrics, "saved": list(self.saved)}

    def load_state_dict(self, state: dict) -> None:
        self.next_id, self.best_loss = state["next_id"], state["best_loss"]
        self.best_subdir, self.best_metrics = state["best_subdir"], dict(state["best_metrics"])
        self.saved = list(state["saved"])

    def _prune(self) -> None:
        # Only after the CHECKPOINT line: the agent has copied a folder by the time it is announced.
        if self.keep is None:
            return
        kept = set(self.saved[-self.keep :]) | {self.best_subdir}
        for subdir in [s for s in self.saved if s not in kept]:
            try:
                shutil.rmtree(self.results_dir / subdir)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning(f"keep_checkpoints: cannot delete {self.results_dir / subdir}: {exc}")
                continue
            self.saved.remove(subdir)


def save_file(path: Path, payload: object) -> None:
    """torch.save to a new file (never through a symbolic link), synced to disk before it is renamed into place."""
    with open_for_writing(path) as file:
        torch.save(payload, file)
        file.flush()
        os.fsync(file.fileno())


def _move_dir(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError:
        # tmp/ and results/ on different mounts: copy beside the target, then rename there.
        beside = dst.with_name(f".{dst.name}.partial")
        shutil.copytree(src, beside)
        os.replace(beside, dst)
        shutil.rmtree(src)
