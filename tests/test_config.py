from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import pytest
from jsonschema import Draft7Validator

from plugin.config.load import merge_defaults, merged_train_config, read_train_config
from plugin.config.schema import (
    DEFAULT_NETWORK,
    OPERATIONAL_KEYS,
    TRAIN_DEFAULTS,
    check_schema,
    config_reference,
    read_schema,
)
from plugin.errors import TaskError
from plugin.files import read_json
from plugin.format.images import DEFAULT_MAX_IMAGE_PIXELS
from tests.conftest import REPO

LEGACY_BASIC = {
    "lr": 0.001, "epochs": 3, "momentum": 0.9, "batch_size": {"val": 6, "train": 12},
    "input_size": {"width": 256, "height": 256}, "gpu_devices": [0], "data_workers": {"val": 0, "train": 3},
    "dataset_tags": {"val": "val", "train": "train"}, "special_classes": {"neutral": "neutral", "background": "bg"},
    "weights_init_type": "transfer_learning",
}

LEGACY_FULL = {
    "input_size": {"width": 128, "height": 128},
    "batch_size": {"train": 1, "val": 1},
    "data_workers": {"train": 0, "val": 0},
    "allow_corrupted_samples": {"train": 0, "val": 0},
    "dataset_tags": {"train": "train", "val": "val"},
    "special_classes": {"background": "bg", "neutral": "neutral"},
    "epochs": 2,
    "val_every": 0.5,
    "lr": 0.1,
    "momentum": 0.9,
    "lr_decreasing": {"patience": 1000, "lr_divisor": 5},
    "loss_weights": {"bce": 1.0, "dice": 1.0},
    "weights_init_type": "transfer_learning",
    "validate_with_model_eval": True,
    "gpu_devices": [0],
}


def write_config(tmp_path: Path, config: object) -> Path:
    path = tmp_path / "task_config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def problems(error: TaskError) -> list[str]:
    header, *lines = error.message.splitlines()
    assert header.startswith("invalid config (")
    return [line.strip() for line in lines]


def test_legacy_basic_config_is_valid(tmp_path):
    config = merged_train_config(write_config(tmp_path, LEGACY_BASIC))
    assert config["batch_size"] == {"val": 6, "train": 12}
    assert config["data_workers"] == {"val": 0, "train": 3}
    assert config["val_every"] == 0.5
    assert config["loss_weights"] == {"bce": 1.0, "dice": 1.0}
    assert config["lr_decreasing"] == {"patience": 3, "lr_divisor": 5}


def test_legacy_full_config_is_valid_and_kept(tmp_path):
    # Only the keys legacy never had are added, with their defaults.
    new_keys = {"sync_batchnorm": True, "cpu_processes": 1, "seed": 0, "augmentations": TRAIN_DEFAULTS["augmentations"],
                "scale": {"mode": "resize", "factor": 1.0}, "foreground_oversampling": 0.33}
    # It sets lr_decreasing, so it keeps the legacy optimizer and LR rule.
    new_keys |= {"class_weights": None, "optimizer": {"name": "adam", "weight_decay": 0},
                 "lr_schedule": {"name": "plateau", "warmup_epochs": 0}}
    new_keys |= {"resume": "auto", "time_budget_minutes": None, "early_stopping": {"patience": None, "metric": "loss"},
                 "max_nonfinite_steps": 10, "keep_checkpoints": None, "max_image_pixels": 2**28}
    new_keys |= {"amp": "auto", "compile": False, "log_every": {"seconds": 10, "iterations": None}}
    assert merged_train_config(write_config(tmp_path, LEGACY_FULL)) == {**LEGACY_FULL, **new_keys}


def test_run_control_keys_and_their_errors(tmp_path):
    config = read_train_config(write_config(tmp_path, {
        "resume": "never", "time_budget_minutes": 90, "early_stopping": {"patience": 5, "metric": "mean_iou"},
        "max_nonfinite_steps": 0, "keep_checkpoints": 2, "max_image_pixels": 10**6,
    }))
    assert (config.resume, config.time_budget_s, config.max_nonfinite_steps) == (False, 5400.0, 0)
    assert (config.early_stopping.patience, config.early_stopping.metric) == (5, "mean_iou")
    assert not config.early_stopping.lower_is_better
    assert (config.keep_checkpoints, config.max_image_pixels) == (2, 10**6)
    assert read_train_config(write_config(tmp_path, {"early_stopping": {"patience": 3}})).early_stopping.metric == "loss"
    with pytest.raises(TaskError) as caught:
        merged_train_config(write_config(tmp_path, {
            "resume": "always", "time_budget_minutes": 0, "early_stopping": {"patience": 0, "metric": ""},
            "max_nonfinite_steps": -1, "keep_checkpoints": 0, "max_image_pixels": 2**31,
        }))
    found = problems(caught.value)
    for key in ("resume", "time_budget_minutes", "early_stopping.patience", "early_stopping.metric",
                "max_nonfinite_steps", "keep_checkpoints", "max_image_pixels"):
        assert any(line.startswith(f"{key}: ") for line in found), (key, found)


def test_distributed_keys(tmp_path):
    config = merged_train_config(write_config(tmp_path, {"cpu_processes": 2, "seed": 7, "sync_batchnorm": False}))
    assert (config["cpu_processes"], config["seed"], config["sync_batchnorm"]) == (2, 7, False)
    with pytest.raises(TaskError) as caught:
        merged_train_config(write_config(tmp_path, {"cpu_processes": 0, "seed": -1, "sync_batchnorm": "yes"}))
    assert problems(caught.value) == [
        "cpu_processes: 0 is less than the minimum of 1",
        "seed: -1 is less than the minimum of 0",
        "sync_batchnorm: 'yes' is not of type 'boolean'",
    ]


def test_empty_config_gives_the_defaults(tmp_path):
    assert merged_train_config(write_config(tmp_path, {})) == TRAIN_DEFAULTS


def test_defaults_have_every_schema_key():
    check_schema(TRAIN_DEFAULTS, "train_config", "defaults")
    assert TRAIN_DEFAULTS["lr"] == 0.001 and TRAIN_DEFAULTS["input_size"] == {"width": 256, "height": 256}


def test_merge_is_recursive_and_leaves_inputs_alone():
    defaults = {"a": {"x": 1, "y": {"deep": 1, "keep": 2}}, "l": [1, 2], "s": 1}
    user = {"a": {"y": {"deep": 5}}, "l": [9], "new": {"k": 1}}
    defaults_before, user_before = copy.deepcopy(defaults), copy.deepcopy(user)
    merged = merge_defaults(defaults, user)
    assert merged == {"a": {"x": 1, "y": {"deep": 5, "keep": 2}}, "l": [9], "s": 1, "new": {"k": 1}}
    assert defaults == defaults_before and user == user_before
    merged["a"]["x"] = 100
    merged["new"]["k"] = 100
    merged["l"].append(0)
    assert defaults == defaults_before and user == user_before


def test_scalar_where_a_section_is_expected_is_a_schema_error(tmp_path):
    path = write_config(tmp_path, {"input_size": 256})
    with pytest.raises(TaskError) as info:
        merged_train_config(path)
    assert problems(info.value) == ["input_size: 256 is not of type 'object'"]


@pytest.mark.parametrize(
    "user, expected",
    [
        ({"input_size": {"width": 250}}, "input_size.width: 250 is not a multiple of 16"),
        ({"input_size": {"height": 0}}, "input_size.height: 0 is less than the minimum of 16"),
        ({"input_size": {"width": 4112}}, "input_size.width: 4112 is greater than the maximum of 4096"),
        ({"scale": {"factor": 0}}, "scale.factor: 0 is not \"auto\" or a number above 0, at most 4"),
        ({"scale": {"factor": "half"}}, "scale.factor: 'half' is not \"auto\" or a number above 0, at most 4"),
        ({"scale": {"mode": "tile"}}, "scale.mode: 'tile' is not one of ['crop', 'resize']"),
        ({"scale": "crop"}, "scale: 'crop' is not of type 'object'"),
        ({"foreground_oversampling": 1.5}, "foreground_oversampling: 1.5 is greater than the maximum of 1"),
        ({"batch_size": {"train": 0}}, "batch_size.train: 0 is less than the minimum of 1"),
        ({"data_workers": {"val": -1}}, "data_workers.val: -1 is less than the minimum of 0"),
        ({"allow_corrupted_samples": {"train": 1.5}}, "allow_corrupted_samples.train: 1.5 is not of type 'integer'"),
        ({"dataset_tags": {"val": ""}}, "dataset_tags.val: '' must not be empty"),
        ({"epochs": "ten"}, "epochs: 'ten' is not of type 'integer'"),
        ({"epochs": True}, "epochs: True is not of type 'integer'"),
        ({"lr": True}, "lr: True is not of type 'number'"),
        ({"lr": 0}, "lr: 0 must be greater than 0"),
        ({"val_every": -0.5}, "val_every: -0.5 must be greater than 0"),
        ({"momentum": -0.1}, "momentum: -0.1 is less than the minimum of 0"),
        ({"lr_decreasing": {"patience": 0}}, "lr_decreasing.patience: 0 is less than the minimum of 1"),
        ({"lr_decreasing": {"lr_divisor": 0.5}}, "lr_decreasing.lr_divisor: 0.5 is less than the minimum of 1"),
        ({"lr_decreasing": {"patiance": 2}}, "lr_decreasing.patiance: unknown key (did you mean 'patience'?)"),
        ({"loss_weights": {"dice": -1}}, "loss_weights.dice: -1 is less than the minimum of 0"),
        ({"validate_with_model_eval": "yes"}, "validate_with_model_eval: 'yes' is not of type 'boolean'"),
        (
            {"weights_init_type": "scratch"},
            "weights_init_type: 'scratch' is not one of ['transfer_learning', 'continue_training']",
        ),
        ({"gpu_devices": []}, "gpu_devices: [] must not be empty"),
        ({"gpu_devices": [1, 1]}, "gpu_devices: [1, 1] has non-unique elements"),
        ({"gpu_devices": [0, -1]}, "gpu_devices[1]: -1 is less than the minimum of 0"),
        ({"gpu_devices": 0}, "gpu_devices: 0 is not of type 'array'"),
        (
            {"special_classes": {"neutral": "bg"}},
            "special_classes: background and neutral must be different classes (both are 'bg')",
        ),
        ({"loss_weights": {"bce": 0, "dice": 0.0}}, "loss_weights: bce and dice cannot both be 0"),
    ],
)
def test_each_error_names_its_path(tmp_path, user, expected):
    path = write_config(tmp_path, user)
    with pytest.raises(TaskError) as info:
        merged_train_config(path)
    assert info.value.where == str(path)
    assert problems(info.value) == [expected]
    assert str(info.value).startswith(f"{path}: invalid config (1 problem):\n")


def test_unknown_top_level_key_lists_the_allowed_ones(tmp_path):
    with pytest.raises(TaskError) as info:
        merged_train_config(write_config(tmp_path, {"zzz": 1}))
    [line] = problems(info.value)
    assert line.startswith("zzz: unknown key (allowed: allow_corrupted_samples, amp, augmentations, batch_size, ")


def test_all_errors_at_once_sorted_by_path(tmp_path):
    user = {
        "lr_decreasing": {"patiance": 2},
        "epochs": 0,
        "input_size": {"width": 250, "height": 100},
        "special_classes": {"background": "x", "neutral": "x"},
        "gpu_devices": ["0"],
    }
    with pytest.raises(TaskError) as info:
        merged_train_config(write_config(tmp_path, user))
    assert info.value.message.splitlines()[0] == "invalid config (6 problems):"
    assert problems(info.value) == [
        "epochs: 0 is less than the minimum of 1",
        "gpu_devices[0]: '0' is not of type 'integer'",
        "input_size.height: 100 is not a multiple of 16",
        "input_size.width: 250 is not a multiple of 16",
        "lr_decreasing.patiance: unknown key (did you mean 'patience'?)",
        "special_classes: background and neutral must be different classes (both are 'x')",
    ]


def test_check_schema_reports_missing_keys():
    with pytest.raises(TaskError) as info:
        check_schema({"epochs": 1, "input_size": {"width": 16}}, "train_config", "cfg")
    lines = problems(info.value)
    assert info.value.where == "cfg"
    assert "input_size.height: missing required key" in lines
    assert "lr: missing required key" in lines
    # Every top-level key but the two given is absent, and the height.
    assert len(lines) == len(TRAIN_DEFAULTS) - 2 + 1


def test_integral_floats_become_ints(tmp_path):
    config = merged_train_config(write_config(tmp_path, {"epochs": 3.0, "gpu_devices": [1.0], "lr": 1.0}))
    assert config["epochs"] == 3 and type(config["epochs"]) is int
    assert config["gpu_devices"] == [1] and type(config["gpu_devices"][0]) is int
    assert type(config["lr"]) is float


def test_schema_is_strict_and_documented():
    schema = json.loads(resources.files("schemas").joinpath("train_config.schema.json").read_text())
    Draft7Validator.check_schema(schema)
    # network alone has no default section: left out, the train task takes model/'s network or the default.
    assert set(schema["properties"]) == set(TRAIN_DEFAULTS) | {"network"}

    def walk(node: dict, path: str) -> None:
        if node.get("type") == "object":
            assert node["additionalProperties"] is False, path
            # network may be left out; network.encoder exists for arch unet only (filled in when left out).
            optional = {"": {"network"}, ".network": {"encoder"}}.get(path, set())
            assert sorted(node["required"]) == sorted(set(node["properties"]) - optional), path
        for key, child in node.get("properties", {}).items():
            assert child.get("description"), f"{path}.{key} has no description"
            walk(child, f"{path}.{key}")

    walk(schema, "")
    assert "unused" in schema["properties"]["momentum"]["description"]


def test_read_json_missing_file(tmp_path):
    path = tmp_path / "task_config.json"
    with pytest.raises(TaskError) as info:
        read_json(path)
    assert str(info.value) == f"{path}: file not found"


def test_read_json_bad_json_gives_line_and_column(tmp_path):
    path = tmp_path / "task_config.json"
    path.write_text('{\n  "lr": 0.1,\n}\n')
    with pytest.raises(TaskError) as info:
        read_json(path)
    assert info.value.where == str(path)
    assert info.value.message == "not valid JSON: Expecting property name enclosed in double quotes at line 3, column 1"


def test_read_json_rejects_nan(tmp_path):
    path = tmp_path / "task_config.json"
    path.write_text('{"lr": NaN}')
    with pytest.raises(TaskError, match="NaN is not allowed in JSON") as info:
        read_json(path)
    assert info.value.where == str(path)


def test_read_json_top_level_must_be_an_object(tmp_path):
    path = tmp_path / "task_config.json"
    path.write_text("[1, 2]")
    with pytest.raises(TaskError) as info:
        read_json(path)
    assert str(info.value) == f"{path}: expected a JSON object at the top level, found an array"


def test_read_json_directory_and_bom(tmp_path):
    with pytest.raises(TaskError, match="found a directory"):
        read_json(tmp_path)
    path = tmp_path / "bom.json"
    path.write_bytes(b'\xef\xbb\xbf{"epochs": 2}')
    assert read_json(path) == {"epochs": 2}


def test_the_config_reference_is_the_schema() -> None:
    committed = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == config_reference(), "docs/config.md differs from the schema: run `make docs`"
    for key in TRAIN_DEFAULTS:
        assert f"| `{key}" in committed


def test_every_train_key_has_its_default_and_role_in_the_schema() -> None:
    properties = read_schema("train_config")["properties"]
    # Every key but network (left out: model/'s network, else the new task's) has its default there.
    assert set(properties) - set(TRAIN_DEFAULTS) == {"network"}
    assert DEFAULT_NETWORK.spec.encoder == properties["network"]["x-new-task-default"]["encoder"]
    assert all(properties[key].get("x-operational") for key in OPERATIONAL_KEYS)
    assert {"resume", "gpu_devices", "time_budget_minutes"} <= OPERATIONAL_KEYS and "lr" not in OPERATIONAL_KEYS
    # Every command's pixel limit and the train config's default are one number.
    assert TRAIN_DEFAULTS["max_image_pixels"] == DEFAULT_MAX_IMAGE_PIXELS
