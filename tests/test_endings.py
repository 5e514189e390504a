"""How a run ends other than by its epochs: the time budget, early stopping, divergence."""

from __future__ import annotations

import datetime as dt

from tests.conftest import TINY_CONFIG, make_task, run_entrypoint


def train_epochs(run) -> list[float]:
    return [m["epoch"] for m in run.events("METRICS") if m["type"] == "train"]


def test_the_time_budget_ends_the_run_with_a_marked_checkpoint_and_exit_0(tmp_path):
    # 1000 epochs would take many minutes; a 0.1-minute budget stops after a few steps, before any
    # planned validation.
    config = dict(TINY_CONFIG, epochs=1000, val_every=1000, time_budget_minutes=0.1)
    run = run_entrypoint("entrypoints.train", make_task(tmp_path / "task", config))
    assert run.returncode == 0, run.stderr[-3000:]
    checkpoints = run.events("CHECKPOINT")
    assert len(checkpoints) == 1 and checkpoints[0]["optional"]["end"] == "time_budget"
    assert checkpoints[0]["optional"]["epoch"] == train_epochs(run)[-1] < 1000
    [ended] = [line for line in run.lines if line.get("ending") == "time_budget"]
    progress = [line for line in run.lines if line.get("subtask") == "Model training: "][-1]
    assert 0 < ended["iteration"] < ended["iterations"] == progress["total"]
    # Training, the final validation and checkpoint included, kept to the budget: 6 s, and a margin for
    # writing the checkpoint, which the first validation's estimate does not know yet.
    started = next(line for line in run.lines if line.get("subtask") == "Model training: ")
    assert seconds(checkpoints[0]["timestamp"]) - seconds(started["timestamp"]) < 6 + 8
    assert not (tmp_path / "task" / "tmp" / "resume").exists()


def seconds(timestamp: str) -> float:
    return dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def test_early_stopping_ends_the_run_after_patience_validations_without_improvement(tmp_path):
    # An LR far below float32 resolution keeps the weights, and BatchNorm on batch statistics in
    # validation keeps the running statistics out: every validation then scores the same.
    config = dict(TINY_CONFIG, epochs=20, val_every=1, lr=1e-30, validate_with_model_eval=False,
                  augmentations=False, early_stopping={"patience": 2, "metric": "mean_iou"})
    run = run_entrypoint("entrypoints.train", make_task(tmp_path / "task", config))
    assert run.returncode == 0, run.stderr[-3000:]
    checkpoints = run.events("CHECKPOINT")
    assert [c["id"] for c in checkpoints] == [0, 1, 2]
    assert checkpoints[-1]["optional"]["end"] == "early_stopping"
    assert "end" not in checkpoints[0]["optional"]
    assert train_epochs(run)[-1] == 3.0


def test_an_unknown_early_stopping_metric_names_the_key_and_the_choices(tmp_path):
    config = dict(TINY_CONFIG, early_stopping={"patience": 2, "metric": "iou/cat"})
    run = run_entrypoint("entrypoints.train", make_task(tmp_path / "task", config))
    assert run.returncode == 1
    message = run.events("TASK_CRASHED")[0]["message"]
    assert message.startswith("early_stopping.metric: 'iou/cat' is not a val metric of this model")
    assert "mean_iou" in message and "iou/ring" in message


def test_a_diverging_run_skips_non_finite_steps_then_stops_naming_the_iteration_and_lr(tmp_path):
    # A huge LR: the first step blows the weights up, and every later loss is NaN.
    config = dict(TINY_CONFIG, batch_size={"train": 1, "val": 1}, epochs=2, lr=1e30, max_nonfinite_steps=2,
                  lr_schedule={"name": "poly", "warmup_epochs": 0})
    task = make_task(tmp_path / "task", config)
    run = run_entrypoint("entrypoints.train", task)
    assert run.returncode == 1
    skipped = [line for line in run.lines if "skipped_iteration" in line]
    assert [(line["skipped_iteration"], line["nonfinite_in_row"]) for line in skipped] == [(2, 1), (3, 2)]
    assert all(line["level"] == "warn" for line in skipped)
    crash = run.events("TASK_CRASHED")[0]["message"]
    assert crash.startswith("lr: the loss or gradient was not finite in 3 iterations in a row (the last: iteration 4 of 8")
    assert "Lower lr" in crash
    assert not (task / "results").exists() or not any((task / "results").iterdir())
