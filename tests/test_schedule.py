"""When the loop validates, and how the optimizer and the learning rate are set up from the config."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time

import pytest
import torch

from plugin.config.load import read_train_config
from plugin.config.typed import EarlyStoppingRule, TrainConfig
from plugin.training.schedule import (
    EarlyStopping,
    EvalPlanner,
    LrPolicy,
    LrSchedule,
    TimeBudget,
    create_optimizer,
    lr_schedule,
    plateau_policy,
)


def planned_epochs(val_every: float, iters: int, epochs: int) -> list[float]:
    planner = EvalPlanner(val_every, iters, epochs)
    planned = []
    for e in range(epochs):
        for i in range(iters):
            if planner.due(e, i):
                planner.mark(e, i)
                planned.append(round(e + (i + 1) / iters, 3))
    return planned


def load(tmp_path, user: dict) -> TrainConfig:
    path = tmp_path / "task_config.json"
    path.write_text(json.dumps(user))
    return read_train_config(path)


def test_planner_matches_the_legacy_example():
    # agent-protocol.md: 7 iterations/epoch, val_every 0.5, 2 epochs -> 0.571, 1.0, 1.571, 2.0
    assert planned_epochs(0.5, 7, 2) == [0.571, 1.0, 1.571, 2.0]


def test_planner_always_ends_with_a_validation():
    assert planned_epochs(0.7, 4, 2) == [0.75, 1.5, 2.0]  # 2 / 0.7 is not whole: the legacy loop never saved 2.0
    assert planned_epochs(5, 3, 2) == [2.0]  # val_every > epochs: legacy made no checkpoint at all
    assert planned_epochs(1, 1, 3) == [1.0, 2.0, 3.0]


def test_planner_validates_at_most_once_per_iteration():
    # val_every smaller than one iteration: legacy arithmetic, one validation per iteration.
    assert planned_epochs(0.1, 2, 1) == [0.5, 1.0]


def test_plateau_policy_divides_after_patience_validations_without_improvement():
    policy = LrPolicy(patience=2, divisor=4)
    lowered = [policy.step(loss) for loss in (1.0, 0.9, 0.95, 0.92, 0.99, 0.98, 0.97)]
    # The legacy arithmetic: more than `patience` validations since the last reset, and none of the
    # last `patience` losses is the best so far.
    assert lowered == [False, False, False, True, False, False, True]
    assert policy.scale == pytest.approx(1 / 16)


def test_warmup_rises_linearly_to_the_base_lr():
    schedule = LrSchedule("poly", base_lr=0.5, total_steps=100, warmup_steps=10)
    warmup = [schedule.lr_at(s) for s in range(10)]
    assert warmup == pytest.approx([0.05 * (s + 1) for s in range(10)])
    assert schedule.lr_at(10) == pytest.approx(0.5)


def test_poly_decays_monotonically_to_nearly_zero():
    schedule = LrSchedule("poly", base_lr=1.0, total_steps=100, warmup_steps=0)
    lrs = [schedule.lr_at(s) for s in range(100)]
    assert lrs[0] == 1.0
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert 0 < lrs[-1] == pytest.approx(0.01**0.9)  # (1 - 99/100) ** 0.9: the last step still learns
    assert lrs[50] == pytest.approx(0.5**0.9)


def test_cosine_is_half_the_lr_halfway_through_the_decay():
    schedule = LrSchedule("cosine", base_lr=2.0, total_steps=110, warmup_steps=10)
    assert schedule.lr_at(10) == pytest.approx(2.0)
    assert schedule.lr_at(60) == pytest.approx(1.0)
    assert schedule.lr_at(109) == pytest.approx(1.0 + math.cos(math.pi * 0.99))
    assert schedule.lr_at(109) < 0.01


def test_plateau_schedule_holds_the_lr_for_the_policy_to_divide():
    schedule = LrSchedule("plateau", base_lr=0.1, total_steps=50, warmup_steps=0)
    assert {schedule.lr_at(s) for s in range(50)} == {0.1}


def test_schedule_from_config_counts_iterations(tmp_path):
    config = load(tmp_path, {"epochs": 4, "lr": 0.01, "lr_schedule": {"name": "cosine", "warmup_epochs": 0.5}})
    schedule = lr_schedule(config, iters_per_epoch=6)
    assert schedule == LrSchedule("cosine", 0.01, total_steps=24, warmup_steps=3)
    # A warmup longer than the run is the whole run, not an error.
    long = dataclasses.replace(config, lr_schedule="poly", warmup_epochs=10)
    assert lr_schedule(long, iters_per_epoch=6).warmup_steps == 24
    assert plateau_policy(config) is None


def test_defaults_are_adamw_with_decay_and_poly_with_warmup(tmp_path):
    config = load(tmp_path, {})
    assert (config.optimizer, config.weight_decay) == ("adamw", 0.01)
    assert (config.lr_schedule, config.warmup_epochs) == ("poly", 0.5)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = create_optimizer(model, config)
    assert type(optimizer) is torch.optim.AdamW
    decay = {tuple(p.shape): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    # The conv kernel decays; its bias and the BatchNorm scale and shift (all of shape (4,)) do not.
    assert decay == {(4, 3, 3, 3): 0.01, (4,): 0.0}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 4


def test_a_legacy_config_with_lr_decreasing_keeps_the_plateau_rule_and_adam(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="plugin.config"):
        config = load(tmp_path, {"lr_decreasing": {"patience": 1000, "lr_divisor": 5}})
    assert (config.lr_schedule, config.warmup_epochs) == ("plateau", 0)
    assert (config.optimizer, config.weight_decay) == ("adam", 0)
    assert [r.getMessage() for r in caplog.records if "legacy rule" in r.getMessage()]
    policy = plateau_policy(config)
    assert (policy.patience, policy.divisor) == (1000, 5)
    assert type(create_optimizer(torch.nn.Linear(2, 2), config)) is torch.optim.Adam


def test_explicit_keys_win_over_the_legacy_rule(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="plugin.config"):
        chosen = load(tmp_path, {"lr_decreasing": {"patience": 2, "lr_divisor": 5},
                                 "lr_schedule": {"name": "cosine", "warmup_epochs": 1}})
    assert (chosen.lr_schedule, chosen.warmup_epochs) == ("cosine", 1)
    assert (chosen.optimizer, chosen.weight_decay) == ("adamw", 0.01)
    assert not [r for r in caplog.records if "legacy rule" in r.getMessage()]
    own_optimizer = load(tmp_path, {"lr_decreasing": {"patience": 2, "lr_divisor": 5},
                                    "optimizer": {"name": "adamw", "weight_decay": 0.001}})
    assert own_optimizer.lr_schedule == "plateau"
    assert (own_optimizer.optimizer, own_optimizer.weight_decay) == ("adamw", 0.001)


def test_the_decay_follows_the_budget_when_it_runs_out_first():
    schedule = LrSchedule("poly", 1.0, total_steps=110, warmup_steps=10)
    assert schedule.lr_at(20, budget_used=0.0) == schedule.lr_at(20)
    # Half the budget spent after a tenth of the steps: the LR is the poly value at t = 0.5.
    assert schedule.lr_at(20, budget_used=0.5) == pytest.approx(0.5**0.9)
    assert schedule.lr_at(20, budget_used=1.2) == 0.0
    assert schedule.lr_at(5, budget_used=0.9) == pytest.approx(0.6)  # warmup is counted in steps


def test_time_budget_fits_the_next_step_and_the_final_validation():
    budget = TimeBudget(100.0, spent_before=60.0, started=time.monotonic())
    assert 60.0 <= budget.spent() < 61.0
    # 100 s, 60 spent, 20 kept for the last validation: two steps of 10 s fit, not three.
    assert budget.iterations_left(spent_s=60, step_s=10, final_s=20) == 2
    assert budget.iterations_left(spent_s=60, step_s=10, final_s=35) == 0
    assert budget.share(60.0) == 0.6
    assert TimeBudget(None).iterations_left(1e9, 1e9, 1e9) is None and TimeBudget(None).share(5.0) == 0.0


@pytest.mark.parametrize("metric, values, ends_at", [
    ("loss", [0.9, 0.8, 0.85, 0.81, 0.7, 0.75, 0.76], 3),  # lower is better: 0.85, 0.81 do not improve
    ("mean_iou", [0.3, 0.5, 0.5, 0.4, 0.6], 3),  # higher is better; equal is no improvement
])
def test_early_stopping_counts_validations_without_a_better_value(metric, values, ends_at):
    stopping = EarlyStopping(EarlyStoppingRule(patience=2, metric=metric))
    ended = [stopping.step({metric: v}) for v in values]
    assert ended.index(True) == ends_at


def test_a_nan_metric_is_no_improvement():
    stopping = EarlyStopping(EarlyStoppingRule(patience=1, metric="loss"))
    assert not stopping.step({"loss": 1.0})
    assert stopping.step({"loss": float("nan")})
