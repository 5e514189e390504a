"""Task configs: read the JSON, merge the defaults, validate against schemas/<name>.schema.json."""

from __future__ import annotations

import copy
import difflib
import functools
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft7Validator, ValidationError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from plugin.errors import InvalidConfig, TaskError
from plugin.format.images import DEFAULT_MAX_IMAGE_PIXELS
from plugin.jsonfile import read_json
from plugin.settings import MATCH_ALL, InferenceConfig, NetworkChoice, NetworkSpec, TrainConfig

TRAIN_SCHEMA = "train_config"
INFERENCE_SCHEMA = "inference_config"

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def read_schema(schema_name: str) -> dict:
    """The JSON schema `schema_name` (train_config, inference_config) as it ships in schemas/."""
    text = resources.files("schemas").joinpath(f"{schema_name}.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def _train_properties() -> dict:
    return read_schema(TRAIN_SCHEMA)["properties"]


# The schema is where each train key's default, meaning and role live (`default`, `description`,
# `$comment` for why, `x-operational`); these are read from it, and docs/config.md is generated from it.
TRAIN_DEFAULTS: dict = {key: prop["default"] for key, prop in _train_properties().items() if "default" in prop}
# Keys that change how a run is operated, not what each step learns: a resumed run may change them
# (another number of processes, a longer budget after a preemption, fewer kept checkpoints).
OPERATIONAL_KEYS: frozenset[str] = frozenset(key for key, prop in _train_properties().items()
                                             if prop.get("x-operational"))
_NEW_TASK_NETWORK = _train_properties()["network"]["x-new-task-default"]
# A new task's network (no network section, no model/).
DEFAULT_NETWORK = NetworkChoice(NetworkSpec(_NEW_TASK_NETWORK["arch"], _NEW_TASK_NETWORK["encoder"]),
                                _NEW_TASK_NETWORK["encoder_weights"])

# What a network section's left-out keys are, by arch: a UNet starts from ImageNet as in
# segmentation_models_pytorch; the legacy network from scratch, as it always has.
_NETWORK_DEFAULTS: dict[str, dict] = {
    "unet": {"encoder": DEFAULT_NETWORK.spec.encoder, "encoder_weights": DEFAULT_NETWORK.encoder_weights},
    "unet_v2": {"encoder_weights": None},
}

_DEFAULT_MODE = "full_image"
_NO_SIDES = {"left": "0px", "top": "0px", "right": "0px", "bottom": "0px"}
# Every mode gets the suffix: legacy gave it only to full_image, and the other modes then crashed on
# predicted classes titled like the input classes.
_MODE_COMMON_DEFAULTS: dict = {
    "model_classes": {"save_classes": MATCH_ALL, "add_suffix": "_unet"},
    "model_tags": {"save_names": MATCH_ALL, "add_suffix": "_unet"},
    "save_probabilities": False,
    "tta": False,
}
_MODE_DEFAULTS: dict[str, dict] = {
    "full_image": {"batch_size": 8},
    "roi": {"bounds": _NO_SIDES, "save": False, "class_name": "inference_roi"},
    "bboxes": {"from_classes": MATCH_ALL, "padding": _NO_SIDES, "save": False, "add_suffix": "_input_bbox"},
    "sliding_window": {
        # null: the model's own training window (inference.modes.window_plan), not known here; each
        # null min_overlap axis is half the window.
        "window": {"width": None, "height": None},
        "min_overlap": {"x": None, "y": None},
        "save": False,
        "class_name": "sliding_window",
        "batch_size": 8,
    },
}
_MODEL_DEFAULTS: dict = {"gpu_device": 0, "amp": "auto", "backend": "torch"}


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
    merged = _network_defaults(merge_defaults(TRAIN_DEFAULTS, _legacy_lr_rule(read_json(path))))
    _raise_if_any(sorted(schema_errors(merged, TRAIN_SCHEMA) + _train_semantic_errors(merged)), str(path))
    return _coerce_integers(merged, _validator(TRAIN_SCHEMA).schema)


def read_train_config(path: Path) -> TrainConfig:
    """load_train_config, read into typed fields."""
    return TrainConfig.from_dict(load_train_config(path))


def read_inference_config(path: Path) -> InferenceConfig:
    """load_inference_config, read into typed fields."""
    return InferenceConfig.from_dict(load_inference_config(path))


def load_inference_config(path: Path) -> dict:
    """The inference config of `path`, normalized, with its mode's defaults; TaskError(where=path) listing all problems."""
    return inference_config(read_json(path), str(path))


def inference_config(raw: dict, where: str) -> dict:
    """An inference config already read (a task's file, a server request's mode), normalized, with its
    mode's defaults; InvalidConfig(where=where) listing all problems.

    A config without a "model" key is the v1 layout and is converted first; legacy key names are renamed.
    """
    errors: list[str] = []
    user = copy.deepcopy(raw) if "model" in raw else _from_v1_layout(raw, errors)
    mode = user.get("mode")
    if isinstance(mode, dict):
        _rename_legacy_key(mode.get("model_classes"), "save_names", "save_classes", "mode.model_classes", errors)
        _rename_legacy_key(mode.get("model_tags"), "save_classes", "save_names", "mode.model_tags", errors)
        name = mode.get("name", _DEFAULT_MODE)
    else:
        name = _DEFAULT_MODE
    merged = merge_defaults(_inference_defaults(name), user)
    errors += schema_errors(merged, INFERENCE_SCHEMA) + _inference_semantic_errors(merged)
    _raise_if_any(sorted(errors), where)
    schema = _validator(INFERENCE_SCHEMA).schema
    config = _coerce_integers(merged, schema)
    # The mode's keys are described by definitions/<name> (picked by if/then), out of _coerce_integers' reach.
    config["mode"] = _coerce_integers(config["mode"], schema["definitions"][config["mode"]["name"]])
    return config


def mode_config(mode: object, where: str = "mode") -> InferenceConfig:
    """A mode section given alone (a server request's, a command line's) through the inference config's
    defaults and schema; InvalidConfig whose problems are named <where>.<key>."""
    if mode is None:
        mode = {}
    if not isinstance(mode, dict):
        raise TaskError("must be a JSON object such as {\"name\": \"full_image\"}", where=where)
    try:
        return InferenceConfig.from_dict(inference_config({"model": {}, "mode": mode}, where=where))
    except InvalidConfig as exc:
        if where == "mode":
            raise
        problems = [where + problem[len("mode"):] if problem.startswith("mode") else problem
                    for problem in exc.problems]
        _raise_if_any(problems, where)
        raise


def mode_defaults() -> dict[str, dict]:
    """Each mode's section as a config that names only the mode gets it (what the model server lists)."""
    return {name: _inference_defaults(name)["mode"] for name in _MODE_DEFAULTS}


def _inference_defaults(mode_name: object) -> dict:
    # A name that is not a mode gets the common keys only; the schema then reports the name alone.
    own = _MODE_DEFAULTS.get(mode_name, {}) if isinstance(mode_name, str) else {}
    mode = merge_defaults({"name": mode_name, **_MODE_COMMON_DEFAULTS}, own)
    return {"model": copy.deepcopy(_MODEL_DEFAULTS), "mode": mode, "allow_corrupted_images": 0,
            "max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS}


def _from_v1_layout(raw: dict, errors: list[str]) -> dict:
    # v1: mode.source names the mode, model_classes sits at the top level, and the model's keys are the
    # other top-level keys. allow_corrupted_images and max_image_pixels are ours, not model keys, so they
    # stay at the top.
    mode = copy.deepcopy(raw.get("mode", {}))
    if isinstance(mode, dict):
        _rename_legacy_key(mode, "source", "name", "mode", errors)
        if "model_classes" in raw:
            if "model_classes" in mode:
                errors.append("model_classes: given both at the top level (v1 layout) and in mode; keep one")
            else:
                mode["model_classes"] = copy.deepcopy(raw["model_classes"])
    config: dict = {"mode": mode, "model": {}}
    for key, value in raw.items():
        if key in ("allow_corrupted_images", "max_image_pixels"):
            config[key] = copy.deepcopy(value)
        elif key not in ("mode", "model_classes"):
            config["model"][key] = copy.deepcopy(value)
    return config


def _rename_legacy_key(section: object, old: str, new: str, where: str, errors: list[str]) -> None:
    """In place: section[old] becomes section[new]; both given is an error (`where` is the section's dotted path)."""
    if not isinstance(section, dict) or old not in section:
        return
    value = section.pop(old)
    if new in section:
        errors.append(f"{where}.{old}: legacy name of {where}.{new}; give only one of them")
    else:
        section[new] = value


def _inference_semantic_errors(config: dict) -> list[str]:
    errors = []
    model = config.get("model")
    if isinstance(model, dict) and model.get("backend") == "onnxruntime" and model.get("amp") in ("bf16", "fp16"):
        errors.append(f"model.amp: {model['amp']!r} is a torch autocast; backend onnxruntime runs the exported "
                      "float32 graph, so leave amp at auto (or off) or use backend torch")
    mode = config.get("mode")
    if not isinstance(mode, dict) or mode.get("name") != "sliding_window":
        return errors
    window, overlap = mode.get("window"), mode.get("min_overlap")
    if not isinstance(window, dict) or not isinstance(overlap, dict):
        return errors
    for axis, size in (("x", "width"), ("y", "height")):
        # Only against a valid window size: a bad one is already reported by the schema.
        if _is_number(overlap.get(axis)) and _is_number(window.get(size)) and 1 <= window[size] <= overlap[axis]:
            errors.append(
                f"mode.min_overlap.{axis}: {overlap[axis]!r} must be less than mode.window.{size} "
                f"({window[size]!r}), or the stride (window - min_overlap) would be below 1"
            )
    return errors


def _legacy_lr_rule(user: dict) -> dict:
    """`user` with the legacy optimizer and LR rule made explicit when it sets lr_decreasing but no lr_schedule.

    Such a config was written for the legacy trainer (Adam, no weight decay, LR divided on plateaus),
    so it keeps that meaning rather than silently getting the new defaults; decided on the user's
    keys, since after the merge every config has lr_decreasing.
    """
    if "lr_decreasing" not in user or "lr_schedule" in user:
        return user
    legacy = {"lr_schedule": {"name": "plateau", "warmup_epochs": 0}}
    if "optimizer" not in user:
        legacy["optimizer"] = {"name": "adam", "weight_decay": 0}
    optimizer = "" if "optimizer" in user else " with Adam without weight decay"
    log.info(
        "the config sets lr_decreasing but no lr_schedule, so it keeps the legacy rule: the plateau "
        f"schedule (no warmup){optimizer}; add an lr_schedule key for another schedule",
        extra={"legacy": legacy},
    )
    return {**user, **legacy}


def _network_defaults(config: dict) -> dict:
    """`config` with the left-out keys of its network section filled in for its arch (unet when left out).

    The section itself stays absent when the user left it out: the train task then takes model/'s
    network, or DEFAULT_NETWORK."""
    network = config.get("network")
    if not isinstance(network, dict):
        return config
    arch = network.get("arch", "unet")
    own = _NETWORK_DEFAULTS.get(arch, {}) if isinstance(arch, str) else {}
    # An unknown arch gets no encoder_weights complaint on top of its own.
    return {**config, "network": merge_defaults({"arch": arch, "encoder_weights": None, **own}, network)}


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
    network = config.get("network")
    if isinstance(network, dict) and network.get("arch") == "unet_v2" and "encoder" in network:
        errors.append("network.encoder: unet_v2 has its own VGG16-BN encoder; encoder applies to arch unet only")
    every = config.get("log_every")
    if isinstance(every, dict) and every.get("seconds") is None and every.get("iterations") is None:
        errors.append("log_every: seconds and iterations cannot both be null")
    return errors + _augmentation_errors(config)


def _augmentation_errors(config: dict) -> list[str]:
    """What the schema cannot say: ranges given high before low, rotate90 on a non-square input."""
    steps, size = config.get("augmentations"), config.get("input_size")
    if not isinstance(steps, list):
        return []
    errors = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            continue
        for key, value in sorted(step.items()):
            if _is_pair(value) and value[0] > value[1]:
                errors.append(f"augmentations[{i}].{key}: {value!r} is not [low, high] (low is above high)")
        square = isinstance(size, dict) and size.get("width") == size.get("height")
        if step.get("name") == "rotate90" and not square:
            errors.append(
                f"augmentations[{i}].name: rotate90 would swap width and height of the non-square input_size; "
                "use hflip and vflip, or affine rotation"
            )
    return errors


def _is_pair(value: object) -> bool:
    return (
        isinstance(value, list) and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _raise_if_any(errors: list[str], where: str) -> None:
    if errors:
        count = f"{len(errors)} problem" + ("s" if len(errors) > 1 else "")
        message = f"invalid config ({count}):\n" + "\n".join(f"  {line}" for line in errors)
        raise InvalidConfig(message, errors, where=where)


@functools.lru_cache(maxsize=None)
def _validator(schema_name: str) -> Validator:
    schema = read_schema(schema_name)
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
    if "x-expected" in error.schema:
        # The schema's own wording of the value it wants, instead of a regex or "not valid under any of...".
        return [f"{_dotted(parent)}: {error.instance!r} is not {error.schema['x-expected']}"]
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
    types = schema.get("type")
    if (types == "integer" or isinstance(types, list) and "integer" in types) and isinstance(value, float):
        return int(value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return {key: _coerce_integers(item, props.get(key, {})) for key, item in value.items()}
    if isinstance(value, list):
        return [_coerce_integers(item, schema.get("items", {})) for item in value]
    return value


def config_reference() -> str:
    """docs/config.md: every train key with its default and meaning, from the schema (`make docs`)."""
    lines = [
        "# Train config reference",
        "",
        "Generated from [`schemas/train_config.schema.json`](../schemas/train_config.schema.json) by `make docs`;",
        "`make test` fails when this page and the schema differ. `task_config.json` is merged over these",
        "defaults (nested objects key by key, lists and values replaced), then validated against the schema:",
        "every violation is reported at once with its path, and unknown keys are errors.",
        "",
        "| key | default | meaning |",
        "|---|---|---|",
    ]
    for key, prop in _train_properties().items():
        default = prop.get("default", prop.get("x-new-task-default"))
        children = prop.get("properties", {})
        name = f"{key}.{'/'.join(children)}" if children and isinstance(default, dict) else key
        meaning = prop["description"]
        if "x-new-task-default" in prop:
            meaning += " Default: a new task's network."
        parts = [f"`{child}`: {sub['description']}" for child, sub in children.items() if "description" in sub]
        cell = " ".join([meaning, *parts]).replace("|", "\\|")
        lines.append(f"| `{name}` | {_rendered(default)} | {cell} |")
    return "\n".join(lines) + "\n"


def _rendered(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(_rendered(v) for v in value.values())
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return f"{len(value)} steps"
    return str(value) if isinstance(value, str) else json.dumps(value)
