"""Task configs: read the JSON, merge the defaults, validate against schemas/<name>.schema.json."""

from __future__ import annotations

import copy
import difflib
import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft7Validator, ValidationError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from plugin.errors import TaskError
from plugin.jsonfile import read_json

TRAIN_SCHEMA = "train_config"

TRAIN_DEFAULTS: dict = {
    "input_size": {"width": 256, "height": 256},
    "batch_size": {"train": 8, "val": 8},
    "dataset_tags": {"train": "train", "val": "val"},
    # The val loader runs a small fraction of the time, so one worker keeps it from stalling training.
    "data_workers": {"train": 2, "val": 1},
    "special_classes": {"background": "bg", "neutral": "neutral"},
    "epochs": 5,
    "val_every": 0.5,
    # Legacy default 0.1 makes Adam diverge at once; 0.001 is the legacy "train" preset.
    "lr": 0.001,
    "momentum": 0.9,
    "lr_decreasing": {"patience": 3, "lr_divisor": 5},
    "loss_weights": {"bce": 1.0, "dice": 1.0},
    "allow_corrupted_samples": {"train": 0, "val": 0},
    "validate_with_model_eval": True,
    "weights_init_type": "transfer_learning",
    "gpu_devices": [0],
}

def merge_defaults(defaults: dict, user: dict) -> dict:
    """A new dict: `user` over `defaults`; nested dicts merge key by key, lists and scalars replace."""
    merged = copy.deepcopy(defaults)
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_defaults(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def validate(config: dict, schema_name: str, where: str) -> None:
    """Raise one TaskError listing every violation of schemas/<schema_name>.schema.json, each with its path."""
    _raise_if_any(schema_errors(config, schema_name), where)


def schema_errors(config: Any, schema_name: str) -> list[str]:
    """Every violation as `dotted.path: reason`, sorted by path."""
    lines: list[str] = []
    for error in _validator(schema_name).iter_errors(config):
        lines.extend(_describe(error))
    return sorted(lines)


def load_train_config(path: Path) -> dict:
    """The train config of `path` with the defaults merged in, validated; TaskError(where=path) listing all problems."""
    merged = merge_defaults(TRAIN_DEFAULTS, read_json(path))
    _raise_if_any(sorted(schema_errors(merged, TRAIN_SCHEMA) + _train_semantic_errors(merged)), str(path))
    return _coerce_integers(merged, _validator(TRAIN_SCHEMA).schema)


def _train_semantic_errors(config: dict) -> list[str]:
    # Checked on whatever parts are well-typed, so they show up together with the schema errors.
    errors = []
    special = config.get("special_classes")
    if isinstance(special, dict) and isinstance(special.get("background"), str):
        if special.get("background") == special.get("neutral"):
            errors.append(
                f"special_classes: background and neutral must be different classes (both are {special['background']!r})"
            )
    weights = config.get("loss_weights")
    if isinstance(weights, dict) and all(_is_number(weights.get(k)) for k in ("bce", "dice")):
        if weights["bce"] == 0 and weights["dice"] == 0:
            errors.append("loss_weights: bce and dice cannot both be 0")
    return errors


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _raise_if_any(errors: list[str], where: str) -> None:
    if errors:
        count = f"{len(errors)} problem" + ("s" if len(errors) > 1 else "")
        raise TaskError(f"invalid config ({count}):\n" + "\n".join(f"  {line}" for line in errors), where=where)


@functools.lru_cache(maxsize=None)
def _validator(schema_name: str) -> Validator:
    text = resources.files("schemas").joinpath(f"{schema_name}.schema.json").read_text(encoding="utf-8")
    schema = json.loads(text)
    cls = validator_for(schema, default=Draft7Validator)
    cls.check_schema(schema)
    return cls(schema)


def _dotted(path: Any) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _describe(error: ValidationError) -> list[str]:
    parent = list(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        return [
            f"{_dotted(parent + [key])}: unknown key ({_suggest(key, allowed)})"
            for key in sorted(set(error.instance) - set(allowed))
        ]
    if error.validator == "required":
        # jsonschema yields one error per missing key and names it only in the message.
        key = next(k for k in error.validator_value if error.message == f"{k!r} is a required property")
        return [f"{_dotted(parent + [key])}: missing required key"]
    if error.validator in ("minLength", "minItems"):
        # Worded here: jsonschema's text for these changed between releases ("is too short" / "should be non-empty").
        count = error.validator_value
        need = "must not be empty" if count == 1 else f"needs at least {count} " + (
            "characters" if error.validator == "minLength" else "items")
        return [f"{_dotted(parent)}: {error.instance!r} {need}"]
    if error.validator == "exclusiveMinimum":
        return [f"{_dotted(parent)}: {error.instance!r} must be greater than {error.validator_value!r}"]
    return [f"{_dotted(parent)}: {error.message}"]


def _suggest(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f"did you mean {close[0]!r}?" if close else "allowed: " + ", ".join(allowed)


def _coerce_integers(value: Any, schema: dict) -> Any:
    # Draft 7 accepts 3.0 as an integer; the code downstream needs a real int (range(), num_workers).
    if schema.get("type") == "integer" and isinstance(value, float):
        return int(value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return {key: _coerce_integers(item, props.get(key, {})) for key, item in value.items()}
    if isinstance(value, list):
        return [_coerce_integers(item, schema.get("items", {})) for item in value]
    return value
