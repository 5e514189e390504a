"""Training processes on torch.distributed: one per device, started by torchrun or spawned here.

`launch` runs a training function once per rank. Under torchrun (RANK and WORLD_SIZE in the
environment) this process is one rank and joins the group torchrun describes. Otherwise, for more
than one process, it spawns the ranks itself on this machine (127.0.0.1, a free port) and waits:
when any rank fails, torch's spawn terminates the others (SIGTERM, then SIGKILL), and the launcher
raises one `RankFailed` that names the first failed rank and carries its traceback, so the caller
logs a single crash line. Spawned ranks never log crash lines themselves.
"""

from __future__ import annotations

import datetime as dt
import os
import queue as queue_module
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from plugin import agent_log
from plugin.errors import TaskError
from plugin.nn.devices import WorldPlan

# A rank waiting longer than this in a collective (a peer hung, not dead) fails instead of hanging forever.
COLLECTIVE_TIMEOUT = dt.timedelta(minutes=10)
# Debug and test hook: when set to a folder, every rank saves its final weights there as rank<N>.pt.
DUMP_WEIGHTS_ENV = "SLY_UNET_DUMP_RANK_WEIGHTS"
_MAX_STACK_LINES = 200  # keeps a relayed traceback far below a pipe's buffer


@dataclass(frozen=True)
class DistContext:
    """This process's place among the training processes; world_size 1 means no process group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext(rank=0, world_size=1, local_rank=0, backend=None)


class RankFailed(TaskError):
    """One rank's failure, relayed: the message names the rank, the stack is the rank's own traceback."""

    def __init__(self, rank: int, message: str, remote_stack: list[str]) -> None:
        super().__init__(f"rank {rank}: {message}")
        self.rank = rank
        self.remote_stack = remote_stack


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's global rank: torchrun's RANK, else 0 (the launcher, or a single process)."""
    return int(os.environ.get("RANK", "0")) if under_torchrun() else 0


def quiet_other_ranks() -> None:
    """Under torchrun, a rank other than 0 logs errors only from here on (rank 0 speaks for the job)."""
    if env_rank() != 0:
        view, level = agent_log.settings()
        agent_log.setup(view, level=level, errors_only=True)


def launch(world: WorldPlan, fn: Callable[..., Any], args: tuple) -> Any:
    """fn(ctx, *args) on every rank; returns rank 0's result.

    world.world_size is ignored under torchrun (the environment decides); 1 runs fn in this process.
    """
    if under_torchrun():
        return _run_torchrun_rank(world, fn, args)
    if world.world_size == 1:
        return fn(SINGLE, *args)
    return _spawn(world, fn, args)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum over all ranks (nothing to do without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def free_port() -> int:
    """A TCP port free on the loopback now (bound to port 0, then released for rank 0's store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_torchrun_rank(world: WorldPlan, fn: Callable[..., Any], args: tuple) -> Any:
    ctx = DistContext(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=world.backend,
    )
    # Each torchrun process is its own main and logs its own crash line, so the line names the rank.
    try:
        _bind_device(world, ctx.local_rank)
        dist.init_process_group(world.backend, init_method="env://", timeout=COLLECTIVE_TIMEOUT)
        try:
            return fn(ctx, *args)
        finally:
            dist.destroy_process_group()
    except Exception as error:
        if ctx.world_size == 1:
            raise
        raise RankFailed(ctx.rank, agent_log.crash_message(error), agent_log.stack_lines(error)) from error


def _bind_device(world: WorldPlan, local_rank: int) -> None:
    # NCCL talks through the current CUDA device: without this every rank of a node would use cuda:0.
    device = world.device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _spawn(world: WorldPlan, fn: Callable[..., Any], args: tuple) -> Any:
    context = mp.get_context("spawn")
    reports = context.SimpleQueue()
    port = free_port()
    try:
        mp.start_processes(
            _spawned_rank,
            args=(world, port, agent_log.settings(), reports, fn, args),
            nprocs=world.world_size,
            join=True,
            start_method="spawn",
        )
    except ProcessException as error:
        raise _first_failure(reports, error) from None
    for kind, rank, payload in _drain(reports):
        if kind == "result" and rank == 0:
            return payload
    return None


def _first_failure(reports: Any, error: ProcessException) -> RankFailed:
    # torch reports the first rank whose process ended badly; its own report says why. A rank killed
    # by a signal reports nothing, and a peer's "connection closed" error is only a consequence.
    failures = {rank: payload for kind, rank, payload in _drain(reports) if kind == "error"}
    rank = error.error_index
    if rank in failures:
        message, stack = failures[rank]
        return RankFailed(rank, message, stack)
    return RankFailed(rank, str(error).splitlines()[0] if str(error) else "the process failed", [])


def _drain(reports: Any) -> list[tuple[str, int, Any]]:
    items = []
    while True:
        try:
            if reports.empty():
                return items
            items.append(reports.get())
        except (EOFError, OSError, queue_module.Empty):
            return items


def _spawned_rank(
    rank: int,
    world: WorldPlan,
    port: int,
    log_settings: tuple[str, str | None],
    reports: Any,
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    view, level = log_settings
    agent_log.setup(view, level=level, errors_only=rank != 0)
    # The ranks share the machine's cores: torch's default of one thread per core in each would oversubscribe them.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.world_size))
    ctx = DistContext(rank=rank, world_size=world.world_size, local_rank=rank, backend=world.backend)
    try:
        _bind_device(world, rank)
        dist.init_process_group(
            world.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world.world_size,
            timeout=COLLECTIVE_TIMEOUT,
        )
        try:
            result = fn(ctx, *args)
        finally:
            dist.destroy_process_group()
    except Exception as error:
        stack = agent_log.stack_lines(error)[-_MAX_STACK_LINES:]
        reports.put(("error", rank, (agent_log.crash_message(error), stack)))
        raise  # a non-zero exit makes torch's spawn stop the other ranks
    reports.put(("result", rank, result if rank == 0 else None))
