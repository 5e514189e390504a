"""Per-item work over a pool of forked worker processes: the `masks` command and the training mask cache.

One place decides how many workers there are and what a forked worker must not inherit: the stop
handler (a worker that only records SIGTERM would outlive its pool's terminate) and OpenCV's
thread pool.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import cv2

from plugin.errors import TaskError

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Failure:
    """A TaskError as a worker returns it to the parent (a pickled TaskError would lose `where`)."""

    message: str
    where: str | None

    @classmethod
    def of(cls, error: TaskError) -> Failure:
        return cls(error.message, error.where)

    def error(self) -> TaskError:
        return TaskError(self.message, where=self.where)


def available_cores() -> int:
    """The cores this process may run on (its affinity, as a container's cpuset limits it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_process(processes: int) -> int:
    """torch threads for each of `processes` processes that share this process's cores: torch's default,
    one per core of the machine in each, would oversubscribe a container's cpuset."""
    return max(1, available_cores() // processes)


def resolve_workers(setting: int | None, items: int) -> int:
    """Worker processes for `items` jobs: the setting, or for None (auto) the available cores;
    never more than there are jobs, at least 1."""
    count = available_cores() if setting is None else setting
    return max(1, min(count, items))


def ordered_map(fn: Callable[[T], R], jobs: Iterable[T], workers: int, chunksize: int = 4) -> Iterator[R]:
    """fn(job) for each job, in order: in this process for one worker, else in `workers` forked processes.

    The caller may stop iterating at any point (an error, a stop signal): the workers are then
    terminated. fn and the jobs must pickle; exceptions raised by fn reach the caller as they are.
    """
    if workers <= 1:
        yield from map(fn, jobs)
        return
    # A forked child inherits OpenCV's thread pool without its threads; with one thread set before the
    # fork it never waits on them (a child that changed the count itself would hang).
    cv2.setNumThreads(1)
    context = multiprocessing.get_context("fork")
    # Workers are forked with SIGTERM blocked: a pool terminated at once (a short job list, an error)
    # signals workers that may not have run _init_worker yet, and one that still had the parent's stop
    # handler would only record the signal, then wait for work forever while the parent joins it.
    # Blocked, the signal waits until _init_worker has restored the default action, and then kills.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        pool = context.Pool(workers, initializer=_init_worker)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    with pool:
        yield from pool.imap(fn, jobs, chunksize)


def _init_worker(*_args: Any) -> None:
    # The parent handles stops (training's stop handler, Ctrl-C) and terminates the pool; a worker
    # dies on its SIGTERM and ignores the terminal's SIGINT, which the whole process group gets.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
