"""Which torch device the run uses, from the config's gpu_devices."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from plugin.errors import TaskError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DevicePlan:
    """The device this process trains on, and how many devices share the global batch."""

    device: torch.device
    device_ids: tuple[int, ...]

    @property
    def count(self) -> int:
        return max(1, len(self.device_ids))


def plan_devices(gpu_devices: list[int]) -> DevicePlan:
    """CUDA devices from gpu_devices; without CUDA, the CPU with one warning so a replay runs anywhere."""
    if not torch.cuda.is_available():
        log.warning(
            f"CUDA is not available; running on the CPU instead of CUDA devices {gpu_devices}",
            extra={"gpu_devices": gpu_devices},
        )
        return DevicePlan(torch.device("cpu"), ())
    available = torch.cuda.device_count()
    missing = [d for d in gpu_devices if d >= available]
    if missing:
        raise TaskError(
            f"devices {missing} do not exist: this machine has {available} CUDA device(s), numbered 0..{available - 1}",
            where="gpu_devices",
        )
    names = ", ".join(f"cuda:{d} ({torch.cuda.get_device_name(d)})" for d in gpu_devices)
    log.info(f"running on {names}", extra={"gpu_devices": gpu_devices})
    return DevicePlan(torch.device("cuda", gpu_devices[0]), tuple(gpu_devices))
