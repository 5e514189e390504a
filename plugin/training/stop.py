"""Graceful stop: SIGTERM or SIGINT ends training at the next safe point, a second signal at once.

`docker stop` sends SIGTERM and, 10 s later, SIGKILL; a training step on the CPU can take longer
than that. So the handler only records the signal, and `check()` raises `Stopped` at the next safe
point: before any module's forward and whenever a parameter's gradient is computed (hooks that
`watch` adds), so the step in flight is abandoned within one layer's time. Parameters change only
in `optimizer.step()`, which has no hooks, so a stop never leaves half a step applied; the loop
then writes the resume state of the last completed step (loop.py).

A second signal ends the process at once with 128 + signum. The state files are replaced
atomically, so the previous resume state and the checkpoints survive it, as they survive SIGKILL.
The same signal again within DUPLICATE_WINDOW_S is the same request: a terminal's Ctrl-C reaches
torchrun and each of its workers, and torchrun forwards it once more.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable

from torch import nn

from plugin.errors import Stopped

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DUPLICATE_WINDOW_S = 1.0

_requested: int | None = None
_requested_at = 0.0


def install(on_first: Callable[[int], None] | None = None, on_second: Callable[[int], None] | None = None) -> None:
    """Handle SIGTERM and SIGINT in this process from now on; `on_first` / `on_second` run in the handler
    (the spawning launcher forwards the signal to its ranks there). A signal already received stays."""

    def handle(signum: int, _frame: object) -> None:
        global _requested, _requested_at
        now = time.monotonic()
        if _requested is None:
            _requested, _requested_at = signum, now
            if on_first is not None:
                on_first(signum)
            return
        if signum == _requested and now - _requested_at < DUPLICATE_WINDOW_S:
            return
        if on_second is not None:
            on_second(signum)
        # Loader workers would notice the missing parent only seconds later.
        for child in multiprocessing.active_children():
            child.kill()
        os._exit(128 + signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handle)


def uninstall() -> None:
    """Python's own handling of SIGTERM and SIGINT again, and no stop requested."""
    global _requested
    _requested = None
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def requested() -> int | None:
    """The stop signal received, if any."""
    return _requested


def requested_at() -> float:
    """time.monotonic() of the stop signal."""
    return _requested_at


def check() -> None:
    """Raise Stopped if a stop signal came."""
    if _requested is not None:
        raise Stopped(_requested)


def watch(model: nn.Module) -> Callable[[], None]:
    """Make every forward and backward of `model` a safe point; returns the function that removes the hooks.

    On the CPU the autograd engine runs the backward in the calling (main) thread, so a gradient
    hook also gives Python's signal handler its chance to run mid-backward.
    """
    handles = [module.register_forward_pre_hook(lambda _module, _inputs: check()) for module in model.modules()]
    handles += [param.register_hook(_check_gradient) for param in model.parameters() if param.requires_grad]

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove


def _check_gradient(_grad: object) -> None:
    check()
