"""Which torch devices a run uses: from the config's gpu_devices (and cpu_processes when there is no CUDA)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from plugin.errors import TaskError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DevicePlan:
    """The first device a process uses, and every CUDA device asked for (empty on the CPU)."""

    device: torch.device
    device_ids: tuple[int, ...]


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


@dataclass(frozen=True)
class WorldPlan:
    """How many training processes run and where: one per CUDA device of gpu_devices, else cpu_processes on the CPU."""

    world_size: int
    gpu_devices: tuple[int, ...]  # empty: the processes train on the CPU

    @property
    def backend(self) -> str:
        return "nccl" if self.gpu_devices else "gloo"

    def device(self, local_rank: int) -> torch.device:
        """The device of the process with this rank on its node."""
        if not self.gpu_devices:
            return torch.device("cpu")
        if local_rank >= len(self.gpu_devices):
            raise TaskError(
                f"this node runs more training processes than gpu_devices lists: local rank {local_rank} has no "
                f"device in {list(self.gpu_devices)}; give torchrun --nproc-per-node {len(self.gpu_devices)} or "
                "list one device per process",
                where="gpu_devices",
            )
        return torch.device("cuda", self.gpu_devices[local_rank])


def plan_world(gpu_devices: list[int], cpu_processes: int) -> WorldPlan:
    """The training processes of a config: len(gpu_devices) with CUDA, cpu_processes without (one warning if more GPUs were asked)."""
    if not torch.cuda.is_available():
        if len(gpu_devices) > 1:
            log.warning(
                f"CUDA is not available: gpu_devices {gpu_devices} asks for {len(gpu_devices)} devices, but training "
                f"runs {cpu_processes} CPU process(es) as cpu_processes says",
                extra={"gpu_devices": gpu_devices, "cpu_processes": cpu_processes},
            )
        else:
            plan_devices(gpu_devices)  # the one CPU warning
        return WorldPlan(cpu_processes, ())
    plan = plan_devices(gpu_devices)
    return WorldPlan(len(plan.device_ids), plan.device_ids)
