"""Log lines for the Supervisely agent (one JSON object per line on stdout) or for a person at a terminal.

Everything goes through `logging`: one handler on the root logger renders every record, ours and
third-party ones, so nothing reaches stdout as raw text in the JSON view. Extra context passed as
`logger.warning(msg, extra={...})` becomes top-level keys of the JSON line.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, TextIO

from plugin.errors import TaskError

EVENT_TASK_CRASHED = "EventType.TASK_CRASHED"
EVENT_PROGRESS = "EventType.PROGRESS"
EVENT_CHECKPOINT = "EventType.CHECKPOINT"
EVENT_METRICS = "EventType.METRICS"
EVENT_MODEL_APPLIED = "EventType.MODEL_APPLIED"

# Their level follows LOG_LEVEL; third-party loggers stay at INFO or above (PIL, for one, is chatty at DEBUG).
_OWN_LOGGERS = ("plugin", "entrypoints", "__main__")
# Protocol lines (progress, checkpoints, the crash) must reach the agent whatever LOG_LEVEL says,
# so they come from a logger with its own fixed level.
_events = logging.getLogger("plugin.events")
_events.setLevel(logging.INFO)

_CONSOLE_MARK = "_sly_unet_console"
_FILE_MARK = "_sly_unet_file"

_ENV_LEVELS = {"TRACE": logging.DEBUG, "DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING,
               "WARNING": logging.WARNING, "ERROR": logging.ERROR, "FATAL": logging.CRITICAL,
               "CRITICAL": logging.CRITICAL}
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
# The last setup()'s resolved (view, level), so that a spawned training process logs the same way.
_setup: tuple[str, str | None] = ("json", None)


def setup(view: str = "auto", stream: TextIO | None = None, level: str | None = None,
          errors_only: bool = False) -> None:
    """Send all log records to `stream` (stdout) as JSON lines ("json") or readable text ("human").

    "auto" picks human when the stream is a terminal. `level` defaults to $LOG_LEVEL, else INFO.
    `errors_only` shows errors and nothing else, protocol lines included: the view of a training
    process other than rank 0. Calling it again replaces the console handler; an added log file stays.
    """
    global _setup
    stream = sys.stdout if stream is None else stream
    if view == "auto":
        view = "human" if _isatty(stream) else "json"
    if view not in ("json", "human"):
        raise ValueError(f"view must be 'json', 'human' or 'auto', not {view!r}")
    levelno = _ENV_LEVELS.get((level or os.environ.get("LOG_LEVEL") or "INFO").upper(), logging.INFO)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _CONSOLE_MARK, False)]:
        root.removeHandler(old)
        old.close()
    if view == "human":
        handler: logging.Handler = _HumanHandler(stream, show_tracebacks=levelno <= logging.DEBUG)
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter())
    setattr(handler, _CONSOLE_MARK, True)
    if errors_only:
        handler.setLevel(logging.ERROR)
    root.addHandler(handler)
    _setup = (view, level)
    root.setLevel(max(levelno, logging.INFO))
    for name in _OWN_LOGGERS:
        logging.getLogger(name).setLevel(levelno)
    logging.captureWarnings(True)


def reset() -> None:
    """Undo setup() and add_log_file(): our handlers removed and closed, warnings no longer captured,
    current_setup() back to its default. Logger levels are the caller's to restore."""
    global _setup
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _CONSOLE_MARK, False) or getattr(h, _FILE_MARK, None)]:
        root.removeHandler(handler)
        handler.close()
    logging.captureWarnings(False)
    _setup = ("json", None)


def add_log_file(path: Path) -> None:
    """Also append every log line, as JSON, to `path` (creating its folder); replaces an earlier log file."""
    path = Path(path).absolute()
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _FILE_MARK, None) is not None]:
        if getattr(old, _FILE_MARK) == path:
            return
        # One task per log file: a second task in the same process must not write into the first one's tmp/.
        root.removeHandler(old)
        old.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(JsonFormatter())
    setattr(handler, _FILE_MARK, path)
    root.addHandler(handler)


class Progress:
    """A counter logged as PROGRESS lines: at creation, then about every 1 % and at the end."""

    def __init__(self, subtask: str, total: int) -> None:
        self.subtask = subtask
        self.total = total
        self.current = 0
        self._step = max(1, math.ceil(total / 100))
        self._log()

    def tick(self, n: int = 1) -> None:
        before = self.current
        self.current += n
        # Crossing a multiple of the step (not landing on it) so that tick(n > 1) cannot skip a report.
        if self.current == self.total or self.current // self._step > before // self._step:
            self._log()

    def _log(self) -> None:
        _events.info("progress", extra={"event_type": EVENT_PROGRESS, "subtask": self.subtask,
                                        "current": self.current, "total": self.total})


def log_metrics(kind: str, epoch: float, metrics: dict[str, float], **extra: Any) -> None:
    """A METRICS line; `kind` is "train" or "val"; a None metric is logged as null.

    A NaN or infinite metric is left out of the line (JSON has no NaN, and a null would chart as a
    gap nobody notices) and named in a warning instead.
    """
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        listed = ", ".join(f"{k} {v}" for k, v in bad.items())
        logging.getLogger("plugin.metrics").warning(
            f"{kind} metrics at epoch {epoch:.2f} are not finite: {listed}; they are left out of the METRICS line",
            extra={"metrics_type": kind, "epoch": float(epoch), "nonfinite_metrics": sorted(bad)},
        )
    _events.info("metrics", extra={"event_type": EVENT_METRICS, "type": kind, "epoch": float(epoch),
                                   "metrics": {k: v for k, v in metrics.items() if k not in bad}, **extra})


def log_checkpoint(idx: int, subdir: str, sizeb: int, best_now: bool, optional: dict) -> None:
    """A CHECKPOINT line; results/<subdir> must be complete before this is called (the agent copies it at once)."""
    _events.info("checkpoint", extra={"event_type": EVENT_CHECKPOINT, "id": int(idx), "subdir": subdir,
                                      "sizeb": int(sizeb), "best_now": bool(best_now), "optional": optional})


def log_model_applied() -> None:
    _events.info("model applied", extra={"event_type": EVENT_MODEL_APPLIED})


def run_main(main_name: str, main: Callable[[], object]) -> int:
    """Run `main`; 0 on success, else log the TASK_CRASHED line and return 1.

    KeyboardInterrupt and SystemExit propagate. Sets up JSON/auto logging first if setup() has not run,
    so that the crash line is never lost.
    """
    if not any(getattr(h, _CONSOLE_MARK, False) for h in logging.getLogger().handlers):
        setup()
    try:
        main()
    except Exception as e:  # noqa: BLE001 - turning every failure into the agent's crash line is the point
        message = crash_message(e)
        _events.critical(message, extra={"event_type": EVENT_TASK_CRASHED, "main_name": main_name,
                                         "exc_str": str(e), "stack": stack_lines(e)})
        return 1
    return 0


def current_setup() -> tuple[str, str | None]:
    """(view, level) of the last setup(), view resolved to "json" or "human"."""
    return _setup


def crash_message(error: BaseException) -> str:
    """The crash line's message: a TaskError's own text, else the exception type and text."""
    return str(error) if isinstance(error, TaskError) else f"{type(error).__name__}: {error}"


def stack_lines(error: BaseException | None) -> list[str]:
    """The traceback of `error` as lines; an error relayed from another process carries that process's (`remote_stack`)."""
    if error is None:
        return []
    remote = getattr(error, "remote_stack", None)
    if remote is not None:
        return list(remote)
    return "".join(traceback.format_exception(type(error), error, error.__traceback__)).splitlines()


class JsonFormatter(logging.Formatter):
    """One JSON object per record: message, the extra fields, [stack], timestamp (UTC), level."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"message": record.getMessage(), **_extras(record)}
        if record.exc_info and "stack" not in line:
            line["stack"] = stack_lines(record.exc_info[1])
        line["timestamp"] = _timestamp(record)
        line["level"] = _level_name(record.levelno)
        return json.dumps(_jsonable(line))


class _HumanHandler(logging.StreamHandler):
    """Readable lines; progress is one bar redrawn in place with \\r."""

    def __init__(self, stream: TextIO, show_tracebacks: bool) -> None:
        super().__init__(stream)
        self.show_tracebacks = show_tracebacks
        self._bar_open = False  # a progress bar is on screen without its newline
        self._bar_width = 0
        self._started: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if getattr(record, "event_type", None) == EVENT_PROGRESS:
                self._draw_bar(record)
            else:
                if self._bar_open:
                    self.stream.write("\n")
                    self._bar_open, self._bar_width = False, 0
                self.stream.write(self._render(record) + "\n")
            self.flush()
        except Exception:  # noqa: BLE001 - logging's own policy: report on stderr, never raise
            self.handleError(record)

    def _draw_bar(self, record: logging.LogRecord) -> None:
        subtask, current, total = record.subtask, record.current, record.total
        if current == 0 or subtask not in self._started:
            self._started[subtask] = record.created
        text = _progress_text(subtask, current, total, record.created - self._started[subtask])
        self.stream.write("\r" + text.ljust(self._bar_width))
        done = current >= total
        if done:
            self.stream.write("\n")
        self._bar_open, self._bar_width = not done, 0 if done else len(text)

    def _render(self, record: logging.LogRecord) -> str:
        event = getattr(record, "event_type", None)
        if event == EVENT_METRICS:
            return _metrics_text(record.type, record.epoch, record.metrics)
        if event == EVENT_CHECKPOINT:
            return _checkpoint_text(record.subdir, record.sizeb, record.best_now, record.optional)
        if event == EVENT_TASK_CRASHED:
            text = f"ERROR: {record.getMessage()}"
            return text + "\n" + "\n".join(record.stack) if self.show_tracebacks else text
        if record.levelno >= logging.ERROR:
            prefix = "ERROR: "
        elif record.levelno >= logging.WARNING:
            prefix = "WARNING: "
        else:
            prefix = "" if record.levelno >= logging.INFO else "DEBUG: "
        extras = {k: v for k, v in _extras(record).items() if k != "event_type"}
        text = prefix + record.getMessage()
        if extras:
            text += " (" + " ".join(f"{k}={v}" for k, v in extras.items()) + ")"
        if record.exc_info and self.show_tracebacks:
            text += "\n" + "\n".join(stack_lines(record.exc_info[1]))
        return text


def _progress_text(subtask: str, current: int, total: int, elapsed: float) -> str:
    """`Model training [#####---------------] 60/250  24.0%  12.50 it/s  ETA 0:15`."""
    fraction = min(1.0, current / total) if total > 0 else 1.0
    filled = round(20 * fraction)
    name = subtask.strip().rstrip(":")
    rate = current / elapsed if elapsed > 0 and current > 0 else None
    rate_text = f"{rate:.2f} it/s" if rate else "- it/s"
    if current >= total:
        tail = f"done in {_clock(elapsed)}"
    else:
        tail = "ETA " + (_clock((total - current) / rate) if rate else "-")
    return f"{name} [{'#' * filled}{'-' * (20 - filled)}] {current}/{total} {100 * fraction:5.1f}%  {rate_text}  {tail}"


def _metrics_text(kind: str, epoch: float, metrics: dict) -> str:
    """`val   epoch 1.00  loss 0.2310  accuracy 0.9512`; a None value shows as "-"."""
    parts = [f"{kind:<5} epoch {epoch:.2f}"]
    for name, value in metrics.items():
        if value is None:
            shown = "-"
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            shown = f"{value:.4f}"
        else:
            shown = str(value)
        parts.append(f"{name} {shown}")
    return "  ".join(parts)


def _checkpoint_text(subdir: str, sizeb: int, best_now: bool, optional: dict) -> str:
    """`checkpoint 00000001 saved  epoch 1.00  233.2 MB  (best so far)`."""
    text = f"checkpoint {subdir} saved"
    if isinstance(optional, dict) and isinstance(optional.get("epoch"), (int, float)):
        text += f"  epoch {optional['epoch']:.2f}"
    text += f"  {sizeb / 1e6:.1f} MB"
    return text + ("  (best so far)" if best_now else "")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


def _timestamp(record: logging.LogRecord) -> str:
    moment = dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z"


def _level_name(levelno: int) -> str:
    for threshold, name in ((logging.CRITICAL, "fatal"), (logging.ERROR, "error"), (logging.WARNING, "warn"),
                            (logging.INFO, "info"), (logging.DEBUG, "debug")):
        if levelno >= threshold:
            return name
    return "trace"


def _jsonable(value: Any) -> Any:
    # json.dumps would write NaN (not JSON: the agent would drop the line) and fail on numpy/torch scalars.
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return _jsonable(value.item())
    return str(value)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
