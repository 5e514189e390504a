"""The one exception type for a task's failures that the user acts on: it carries where the problem is
and what is wrong."""

from __future__ import annotations

import importlib.util
import os


class TaskError(Exception):
    """A failure the user can act on, reported as `where: message`: bad input (a file, a config key,
    an object), and also a full or failing disk, a diverged run, a training rank that crashed.

    Entrypoints turn it into the agent's crash line and a non-zero exit; the text must let the
    user act without reading our code.
    """

    def __init__(self, message: str, where: str | os.PathLike | None = None) -> None:
        self.message = message
        self.where = None if where is None else str(where)
        super().__init__(f"{self.where}: {message}" if self.where else message)


def require_extra(extra: str, modules: tuple[str, ...], where: str) -> None:
    """TaskError naming the pip extra to install when a module of an optional dependency is missing."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise TaskError(
            f"needs {', '.join(missing)}, of the {extra!r} extra: pip install 'sly-unet[{extra}]'", where=where
        )


class InvalidConfig(TaskError):
    """A config (or a request's mode) that fails its schema; `problems` lists each violation as `path: reason`."""

    def __init__(self, message: str, problems: list[str], where: str | os.PathLike | None = None) -> None:
        super().__init__(message, where)
        self.problems = tuple(problems)


class LimitExceeded(TaskError):
    """Input over a documented size limit (an image's pixels, a request's bytes): the server's 413."""


class Stopped(BaseException):
    """A stop signal (SIGTERM, SIGINT) asked the task to end: raised at the next safe point.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it;
    the entrypoint turns it into exit code 128 + signum. `logged` is set once the stop line is out.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
        self.logged = False
