from __future__ import annotations

import datetime as dt
import io
import json
import logging
import re
import warnings

import numpy as np
import pytest

from plugin import agent_log
from plugin.agent_log import Progress, add_log_file, log_checkpoint, log_metrics, log_model_applied, run_main, setup
from plugin.errors import TaskError

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
LEVELS = {"trace", "debug", "info", "warn", "error", "fatal"}
log = logging.getLogger("plugin.test_agent_log")


@pytest.fixture(autouse=True)
def restore_logging():
    """setup() changes process-wide logging: put it back so other test modules see what they expect."""
    levels = {name: logging.getLogger(name).level for name in ("", "plugin", "entrypoints", "__main__")}
    yield
    agent_log.reset()
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def json_setup(level: str = "INFO") -> io.StringIO:
    out = io.StringIO()
    setup("json", out, level=level)
    return out


def parse(out: io.StringIO) -> list[dict]:
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    for line in lines:
        assert isinstance(line["message"], str)
        assert line["level"] in LEVELS
        assert TIMESTAMP.match(line["timestamp"]), line["timestamp"]
    return lines


def test_every_line_is_json_with_the_base_fields():
    out = json_setup()
    log.info("reading project", extra={"images": 30})
    log.warning("skipped an object", extra={"image": "a.png", "object": 3})
    Progress("Model applying: ", 2).tick()
    log_metrics("train", 0.5, {"loss": 0.5})
    log_checkpoint(0, "00000000", 10, True, {"epoch": 0.5})
    log_model_applied()
    lines = parse(out)
    assert [line["message"] for line in lines] == [
        "reading project", "skipped an object", "progress", "progress", "metrics", "checkpoint", "model applied",
    ]
    assert lines[0]["images"] == 30 and lines[0]["level"] == "info"
    assert lines[1]["image"] == "a.png" and lines[1]["object"] == 3 and lines[1]["level"] == "warn"
    assert "event_type" not in lines[0]


def test_level_names_and_utc_timestamp():
    out = json_setup(level="DEBUG")
    before = dt.datetime.now(dt.timezone.utc)
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    lines = parse(out)
    assert [line["level"] for line in lines] == ["debug", "info", "warn", "error", "fatal"]
    stamp = dt.datetime.strptime(lines[0]["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc)
    assert abs((stamp - before).total_seconds()) < 5


def test_exception_info_becomes_a_stack_list():
    out = json_setup()
    try:
        raise ValueError("bad pixel")
    except ValueError:
        log.error("could not read", exc_info=True)
    [line] = parse(out)
    assert line["stack"][0] == "Traceback (most recent call last):"
    assert line["stack"][-1] == "ValueError: bad pixel"


def test_progress_cadence_on_250():
    out = json_setup()
    progress = Progress("Model training: ", 250)
    for _ in range(250):
        progress.tick()
    lines = parse(out)
    # step = ceil(250 / 100) = 3: 0, every multiple of 3 up to 249, and the end.
    assert [line["current"] for line in lines] == [0, *range(3, 250, 3), 250]
    assert len(lines) == 85
    for line in lines:
        assert line["message"] == "progress" and line["event_type"] == "EventType.PROGRESS"
        assert line["subtask"] == "Model training: " and line["total"] == 250 and line["level"] == "info"


def test_progress_big_ticks_do_not_skip_a_step():
    out = json_setup()
    progress = Progress("Model applying: ", 250)
    for _ in range(5):
        progress.tick(2)
    # Step 3: 2 crosses nothing, 4 crosses 3, 6 reaches 6, 8 crosses nothing, 10 crosses 9.
    assert [line["current"] for line in parse(out)] == [0, 4, 6, 10]


def test_progress_small_total_logs_every_tick():
    out = json_setup()
    progress = Progress("Building model:", 1)
    progress.tick()
    assert [(line["current"], line["total"]) for line in parse(out)] == [(0, 1), (1, 1)]


def test_metrics_line():
    out = json_setup()
    metrics = {"loss": np.float32(0.25), "accuracy": 0.9, "iou/kiwi": None, "dice": float("nan")}
    log_metrics("val", 1, metrics, absent_classes=["kiwi"])
    warning, line = parse(out)
    assert line["message"] == "metrics" and line["event_type"] == "EventType.METRICS"
    assert line["type"] == "val"
    assert line["epoch"] == 1.0 and isinstance(line["epoch"], float)
    # NaN is not JSON (the agent would drop the line), and a null would chart as an unnoticed gap: a
    # non-finite metric is left out and named in a warning. An absent class stays null.
    assert line["metrics"] == {"loss": 0.25, "accuracy": 0.9, "iou/kiwi": None}
    assert line["absent_classes"] == ["kiwi"]
    assert warning["level"] == "warn" and warning["nonfinite_metrics"] == ["dice"]
    assert warning["message"] == ("val metrics at epoch 1.00 are not finite: dice nan; they are left out of the "
                                  "METRICS line")


def test_checkpoint_and_model_applied_lines():
    out = json_setup()
    log_checkpoint(1, "00000001", 244170000, False, {"epoch": 1.0, "val_metrics": {"loss": 0.6}})
    log_model_applied()
    checkpoint, applied = parse(out)
    assert {k: v for k, v in checkpoint.items() if k not in ("timestamp",)} == {
        "message": "checkpoint", "event_type": "EventType.CHECKPOINT", "id": 1, "subdir": "00000001",
        "sizeb": 244170000, "best_now": False, "optional": {"epoch": 1.0, "val_metrics": {"loss": 0.6}},
        "level": "info",
    }
    assert applied["message"] == "model applied" and applied["event_type"] == "EventType.MODEL_APPLIED"


def test_protocol_lines_survive_a_quiet_log_level():
    out = json_setup(level="ERROR")
    log.info("not shown")
    Progress("Model training: ", 1)
    log_checkpoint(0, "00000000", 1, True, {})
    assert [line["message"] for line in parse(out)] == ["progress", "checkpoint"]


def test_errors_only_keeps_errors_and_drops_protocol_lines():
    # The view of a training rank other than 0: rank 0 logs progress and metrics for the job.
    out = io.StringIO()
    setup("json", out, level="DEBUG", errors_only=True)
    log.warning("a warning")
    Progress("Model training: ", 1)
    log_metrics("train", 1.0, {"loss": 0.5})
    log.error("a real problem")
    assert [line["message"] for line in parse(out)] == ["a real problem"]


def test_settings_remember_the_resolved_view_and_level():
    setup("auto", io.StringIO(), level="DEBUG")
    assert agent_log.current_setup() == ("json", "DEBUG")


def test_third_party_loggers_and_warnings_are_json():
    out = json_setup(level="DEBUG")
    logging.getLogger("somelib").info("hello from a library")
    logging.getLogger("somelib").debug("library chatter stays out")
    log.debug("our own debug line")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("careful with that", UserWarning)
    lines = parse(out)
    assert [line["message"] for line in lines[:2]] == ["hello from a library", "our own debug line"]
    assert lines[2]["level"] == "warn" and "UserWarning: careful with that" in lines[2]["message"]
    assert len(lines) == 3


def test_crash_line_for_a_task_error():
    out = json_setup()

    def main() -> None:
        raise TaskError("epochs: 0 is less than the minimum of 1", where="task_config.json")

    assert run_main("UNET_V2_TRAIN", main) == 1
    [line] = parse(out)
    assert line["level"] == "fatal" and line["event_type"] == "EventType.TASK_CRASHED"
    assert line["main_name"] == "UNET_V2_TRAIN"
    assert line["message"] == "task_config.json: epochs: 0 is less than the minimum of 1"
    assert line["exc_str"] == "task_config.json: epochs: 0 is less than the minimum of 1"
    assert line["stack"][0] == "Traceback (most recent call last):"
    assert line["stack"][-1] == "plugin.errors.TaskError: task_config.json: epochs: 0 is less than the minimum of 1"


def test_crash_line_for_a_plain_exception():
    out = json_setup()

    def main() -> None:
        raise ValueError("boom")

    assert run_main("UNET_V2_INFERENCE", main) == 1
    [line] = parse(out)
    assert line["level"] == "fatal" and line["event_type"] == "EventType.TASK_CRASHED"
    assert line["main_name"] == "UNET_V2_INFERENCE"
    assert line["message"] == "ValueError: boom"
    assert line["exc_str"] == "boom"
    assert line["stack"][-1] == "ValueError: boom"
    assert any("in main" in frame for frame in line["stack"])


def test_run_main_success_prints_nothing():
    out = json_setup()
    assert run_main("UNET_V2_TRAIN", lambda: None) == 0
    assert out.getvalue() == ""


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(3)])
def test_interrupt_and_exit_propagate(error):
    out = json_setup()

    def main() -> None:
        raise error

    with pytest.raises(type(error)):
        run_main("UNET_V2_TRAIN", main)
    assert out.getvalue() == ""


def test_setup_twice_does_not_duplicate_lines():
    first = json_setup()
    second = json_setup()
    log.info("once")
    assert first.getvalue() == ""
    assert [line["message"] for line in parse(second)] == ["once"]


def test_auto_view_is_json_off_a_terminal():
    out = io.StringIO()
    setup("auto", out)
    log.info("plain")
    assert json.loads(out.getvalue())["message"] == "plain"


def test_log_file_gets_the_same_json_lines(tmp_path):
    out = json_setup()
    path = tmp_path / "tmp" / "nested" / "train_log.jsonl"
    add_log_file(path)
    add_log_file(path)  # a second call must not double the lines
    log.info("to both")
    Progress("Model training: ", 1)
    file_lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert file_lines == parse(out)
    assert len(file_lines) == 2

    other = tmp_path / "other.jsonl"
    add_log_file(other)
    log.info("only the new file")
    assert len(path.read_text().splitlines()) == 2
    assert json.loads(other.read_text())["message"] == "only the new file"


def human_setup(level: str = "INFO") -> io.StringIO:
    out = io.StringIO()
    setup("human", out, level=level)
    return out


def test_human_view_progress_metrics_checkpoint_warning():
    out = human_setup()
    progress = Progress("Model training: ", 4)
    for _ in range(4):
        progress.tick()
    log_metrics("val", 1, {"loss": 0.231, "accuracy": 0.95123, "iou/kiwi": None})
    log_checkpoint(0, "00000000", 1_500_000, True, {"epoch": 1.0})
    log.warning("skipped an object", extra={"image": "a.png"})
    bar, *rest = out.getvalue().split("\n")
    frames = bar.split("\r")[1:]
    assert len(frames) == 5  # current 0..4, redrawn in place
    assert frames[0].startswith("Model training [--------------------] 0/4   0.0%")
    assert frames[2].startswith("Model training [##########----------] 2/4  50.0%")
    assert re.match(r"Model training \[#{20}\] 4/4 100\.0%  \S+ it/s  done in 0:00$", frames[4].rstrip())
    assert rest == [
        "val   epoch 1.00  loss 0.2310  accuracy 0.9512  iou/kiwi -",
        "checkpoint 00000000 saved  epoch 1.00  1.5 MB  (best so far)",
        "WARNING: skipped an object (image=a.png)",
        "",
    ]


def test_human_view_ends_an_unfinished_bar_before_other_lines():
    out = human_setup()
    progress = Progress("Model applying: ", 10)
    progress.tick(3)
    log.info("halfway note")
    bar, *rest = out.getvalue().split("\n")
    frames = bar.split("\r")[1:]
    assert len(frames) == 2
    assert frames[1].startswith("Model applying [######--------------] 3/10  30.0%")
    assert " ETA " in frames[1]
    assert rest == ["halfway note", ""]


def test_human_view_crash_shows_traceback_only_at_debug():
    def main() -> None:
        raise TaskError("bad value", where="task_config.json")

    out = human_setup()
    assert run_main("UNET_V2_TRAIN", main) == 1
    assert out.getvalue() == "ERROR: task_config.json: bad value\n"

    out = human_setup(level="DEBUG")
    assert run_main("UNET_V2_TRAIN", main) == 1
    lines = out.getvalue().splitlines()
    assert lines[0] == "ERROR: task_config.json: bad value"
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "plugin.errors.TaskError: task_config.json: bad value"


def test_unknown_view_is_refused():
    with pytest.raises(ValueError):
        setup("yaml", io.StringIO())
