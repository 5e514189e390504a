"""The resume state: what a stopped run needs to go on as if it had never stopped.

It lives in tmp/resume/state.pt, beside results/ (which keeps exactly the legacy checkpoint folders),
and is replaced atomically at every checkpoint and on a graceful stop: written to a `.partial` file,
synced, then renamed over the old one, so a kill at any moment leaves either state whole.

A state belongs to one run: its fingerprint holds the config (less the keys that only say how the
run is operated) and a digest of every item's annotation and image size and of meta.json. A run
on a task dir whose state has another fingerprint starts afresh and says what changed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from plugin.config.schema import OPERATIONAL_KEYS
from plugin.errors import TaskError
from plugin.files import refuse_symlink
from plugin.format.project import Item
from plugin.training.checkpoints import save_file

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: one entry per part of the run (run_state.RunState.state_dict)
_META = "meta.json"


@dataclass
class Position:
    """Where a run is: the epoch, how many of its samples are trained on (over all ranks), and the
    optimizer steps made (skipped non-finite steps included)."""

    epoch: int = 0
    samples: int = 0
    step: int = 0


@dataclass(frozen=True)
class Fingerprint:
    config: dict  # the merged config without OPERATIONAL_KEYS
    project: dict  # "dataset/image name" (and "meta.json") -> sha256 of what training reads of it


def fingerprint(config: dict, project_dir: Path, items: list[Item]) -> Fingerprint:
    """The fingerprint of a run of the merged `config` on these items of the project."""
    project = {_META: _digest((project_dir / _META).read_bytes())}
    for item in items:
        # An image is identified by its size in bytes: reading every image to hash it would cost as much
        # as an epoch on a large project, and an edit that keeps the byte count is rare.
        size = item.image_path.stat().st_size
        project[f"{item.dataset}/{item.name}"] = _digest(item.ann_path.read_bytes() + b"\0" + str(size).encode())
    kept = {key: value for key, value in config.items() if key not in OPERATIONAL_KEYS}
    return Fingerprint(kept, project)


def changes(old: Fingerprint, new: Fingerprint) -> list[str]:
    """What differs between two fingerprints, in words; empty when they are the same run."""
    found = []
    keys = sorted(k for k in old.config.keys() | new.config.keys() if old.config.get(k) != new.config.get(k))
    if keys:
        found.append("config " + ", ".join(keys))
    added = new.project.keys() - old.project.keys()
    removed = old.project.keys() - new.project.keys()
    edited = {k for k in old.project.keys() & new.project.keys() if old.project[k] != new.project[k]}
    for count, what in ((len(added), "added"), (len(removed), "removed"), (len(edited - {_META}), "changed")):
        if count:
            found.append(f"{count} item{'s' if count > 1 else ''} {what}")
    if _META in edited:
        found.append("meta.json changed")
    return found


def resumed_position(saved: dict, train_loader: DataLoader, iters: int) -> Position:
    """The saved position with its step recounted from the batches left in the epoch: another process
    count makes another global batch, and what carries over is the samples trained on. Leaves the
    loader's EpochSampler at that position."""
    epoch, samples = saved["epoch"], saved["samples"]
    train_loader.sampler.set_position(epoch, samples)
    return Position(epoch, samples, epoch * iters + iters - len(train_loader))


def log_resume(state: dict, position: Position, samples_per_epoch: int) -> None:
    """The one line that says where a resumed run continues."""
    checkpoints = state["checkpoints"]
    after = checkpoints["saved"][-1] if checkpoints and checkpoints["saved"] else None
    where = f"after checkpoint {after}" if after is not None else "before the first checkpoint"
    epoch = round(position.epoch + position.samples / samples_per_epoch, 4)
    log.info(
        f"resuming from the resume state at iteration {position.step} (epoch {epoch:.2f}), {where}",
        extra={"resumed_iteration": position.step, "resumed_epoch": epoch, "resumed_checkpoint": after},
    )


def rng_states() -> dict[str, Any]:
    """Every random generator a run draws from, in a form torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(path: Path, state: dict, fp: Fingerprint) -> int:
    """Replace the resume state at `path` atomically; returns its size in bytes."""
    write_atomic(path, {"version": STATE_VERSION, "fingerprint": asdict(fp), **state})
    return path.stat().st_size


def load_state(path: Path, fp: Fingerprint) -> dict | None:
    """The resume state at `path` if it belongs to the run `fp` describes, else None (with a warning
    that says why, when there is a state). A leftover `.partial` of a write that was killed is removed."""
    _partial(path).unlink(missing_ok=True)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        old = Fingerprint(**state["fingerprint"])
        version = state["version"]
    except Exception as exc:  # noqa: BLE001 - any unreadable state means: start afresh, and say so
        log.warning(f"the resume state {path} cannot be read ({type(exc).__name__}: {exc}); starting afresh",
                    extra={"file": str(path)})
        return None
    if version != STATE_VERSION:
        log.warning(f"the resume state {path} has version {version}, this trainer writes {STATE_VERSION}; "
                    "starting afresh", extra={"file": str(path)})
        return None
    changed = changes(old, fp)
    if changed:
        log.warning(
            f"the resume state {path} is of another run ({'; '.join(changed)}); starting afresh",
            extra={"file": str(path), "changed": changed},
        )
        return None
    return state


def write_atomic(path: Path, payload: Any) -> None:
    """torch.save `payload` to `path` through a synced `.partial` beside it, then rename: a reader (or
    a kill) sees the old file or the new one, never a part. A failed write is a TaskError naming the
    path, and the old file stays."""
    partial = _partial(path)
    refuse_symlink(path)
    try:
        save_file(partial, payload)
        os.replace(partial, path)
        _sync_dir(path.parent)
    except (OSError, RuntimeError) as exc:
        partial.unlink(missing_ok=True)
        raise TaskError(f"cannot write {path.name}: {exc}", where=partial) from exc


def _sync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk too.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
