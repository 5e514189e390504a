"""Training processes on torch.distributed: one per device, started by torchrun or spawned here.

`launch` runs a training function once per rank. Under torchrun (RANK and WORLD_SIZE in the
environment) this process is one rank and joins the group torchrun describes. Otherwise, for more
than one process, it spawns the ranks itself on this machine (127.0.0.1, a free port) and waits:
when any rank fails, torch's spawn terminates the others (SIGTERM, then SIGKILL), and the launcher
raises one `RankFailed` that names the first failed rank and carries its traceback, so the caller
logs a single crash line. Spawned ranks never log crash lines themselves.

A stop signal to the launcher is passed on to every rank (stop.py); the ranks stop, rank 0 writes
the resume state, and the launcher raises Stopped once all have exited (killing any rank still
there after STOP_WAIT_S). Spawned ranks die with the launcher even when it is killed outright.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import logging
import os
import queue as queue_module
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.multiprocessing.spawn import ProcessException
from torch.nn.parallel import DistributedDataParallel

from plugin import agent_log
from plugin.errors import Stopped, TaskError
from plugin.nn.devices import WorldPlan
from plugin.parallel import threads_per_process
from plugin.training import stop

log = logging.getLogger(__name__)

# A rank waiting longer than this in a collective (a peer hung, not dead) fails instead of hanging forever.
COLLECTIVE_TIMEOUT = dt.timedelta(minutes=10)
# Debug and test hook: when set to a folder, every rank saves its final weights there as rank<N>.pt.
DUMP_WEIGHTS_ENV = "SLY_UNET_DUMP_RANK_WEIGHTS"
_MAX_STACK_LINES = 200  # keeps a relayed traceback far below a pipe's buffer
# After a stop signal the ranks get this long to write the resume state and exit, then are killed.
STOP_WAIT_S = 60.0
_PR_SET_PDEATHSIG = 1


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
        view, level = agent_log.current_setup()
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


def wrap_model(model: nn.Module, device: torch.device, ctx: DistContext, sync_batchnorm: bool) -> nn.Module:
    """The model itself in one process; with several, DistributedDataParallel (SyncBatchNorm first on CUDA).

    Converting in place keeps `model` the module whose state dict the checkpoints save, with the same names.
    """
    if ctx.world_size == 1:
        return model
    if sync_batchnorm and device.type == "cuda":
        for name, child in list(model.named_children()):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    elif sync_batchnorm and ctx.is_main:
        log.info("sync_batchnorm: torch's SyncBatchNorm runs on CUDA only, so each CPU process normalises "
                 "over its own batch")
    # static_graph: the legacy network keeps a block its forward never uses (for the checkpoint names);
    # DDP learns that from the first step instead of searching the graph for unused parameters every step.
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True
    )


def dump_rank_weights(model: nn.Module, ctx: DistContext) -> None:
    """The DUMP_WEIGHTS_ENV debug hook: this rank's final weights as <folder>/rank<N>.pt."""
    folder = os.environ.get(DUMP_WEIGHTS_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, Path(folder) / f"rank{ctx.rank}.pt")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum over all ranks (nothing to do without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the maximum over all ranks (nothing to do without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (itself without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
    return value


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
    ranks = mp.start_processes(
        _spawned_rank,
        args=(world, port, agent_log.current_setup(), reports, fn, args),
        nprocs=world.world_size,
        join=False,
        start_method="spawn",
    )
    # `docker stop` and `kill` signal this launcher only: each rank must hear it to stop cleanly.
    stop.install(on_first=lambda signum: _signal(ranks.processes, signum),
                 on_second=lambda _signum: _signal(ranks.processes, signal.SIGKILL))
    try:
        while not ranks.join(timeout=1.0):
            if stop.requested() is not None and time.monotonic() - stop.requested_at() > STOP_WAIT_S:
                # A rank that has not stopped by now hangs (a peer died inside a collective).
                _signal(ranks.processes, signal.SIGKILL)
    except ProcessException as error:
        if stop.requested() is None:
            raise _first_failure(reports, error) from None
    reported = _drain(reports)
    stops = {rank: payload for kind, rank, payload in reported if kind == "stopped"}
    signum = stop.requested() or next((s for s, _ in stops.values()), None)
    if signum is not None:
        stopped = Stopped(signum)
        # Rank 0 logged the stop line if it was training; a stop before that is the caller's to log.
        stopped.logged = stops.get(0, (signum, False))[1]
        raise stopped
    for kind, rank, payload in reported:
        if kind == "result" and rank == 0:
            return payload
    return None


def _signal(processes: list, signum: int) -> None:
    for process in processes:
        if process.is_alive():
            try:
                os.kill(process.pid, signum)
            except ProcessLookupError:
                pass


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
    _die_with_parent()
    # A fresh process: it hears the stop signals its launcher passes on from its first line.
    stop.install()
    view, level = log_settings
    agent_log.setup(view, level=level, errors_only=rank != 0)
    torch.set_num_threads(threads_per_process(world.world_size))
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
    except Stopped as stopped:
        # Exit 0: a non-zero exit would make the launcher terminate the other ranks, rank 0 perhaps
        # while it writes the resume state. The launcher exits 128 + signum for all of them.
        reports.put(("stopped", rank, (stopped.signum, stopped.logged)))
        return
    except Exception as error:
        stack = agent_log.stack_lines(error)[-_MAX_STACK_LINES:]
        reports.put(("error", rank, (agent_log.crash_message(error), stack)))
        raise  # a non-zero exit makes torch's spawn stop the other ranks
    reports.put(("result", rank, result if rank == 0 else None))


def _die_with_parent() -> None:
    # A launcher killed outright (SIGKILL) cannot stop its ranks; Linux then kills them for it.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the ranks notice the launcher's end at their next collective
