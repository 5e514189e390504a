"""Task configs: read the JSON, merge the defaults, validate against the schemas, read into typed
settings (plugin/config/settings.py)."""

from __future__ import annotations

import copy
from pathlib import Path

from plugin.config.legacy import from_v1_layout, legacy_trainer_rules, rename_legacy_key
from plugin.config.schema import (
    DEFAULT_NETWORK,
    INFERENCE_SCHEMA,
    TRAIN_DEFAULTS,
    TRAIN_SCHEMA,
    coerce_integers,
    raise_if_any,
    read_schema,
    schema_errors,
)
from plugin.config.typed import MATCH_ALL, InferenceConfig, TrainConfig
from plugin.errors import InvalidConfig, TaskError
from plugin.files import read_json
from plugin.format.images import DEFAULT_MAX_IMAGE_PIXELS

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


def merged_train_config(path: Path) -> dict:
    """The train config of `path` with the defaults merged in, validated; TaskError(where=path) listing all problems."""
    merged = _network_defaults(merge_defaults(TRAIN_DEFAULTS, legacy_trainer_rules(read_json(path))))
    raise_if_any(sorted(schema_errors(merged, TRAIN_SCHEMA) + _train_semantic_errors(merged)), str(path))
    return coerce_integers(merged, read_schema(TRAIN_SCHEMA))


def read_train_config(path: Path) -> TrainConfig:
    """merged_train_config, read into typed fields."""
    return TrainConfig.from_dict(merged_train_config(path))


def read_inference_config(path: Path) -> InferenceConfig:
    """merged_inference_config, read into typed fields."""
    return InferenceConfig.from_dict(merged_inference_config(path))


def merged_inference_config(path: Path) -> dict:
    """The inference config of `path`, normalized, with its mode's defaults; TaskError(where=path) listing all problems."""
    return inference_config(read_json(path), str(path))


def inference_config(raw: dict, where: str) -> dict:
    """An inference config already read (a task's file, a server request's mode), normalized, with its
    mode's defaults; InvalidConfig(where=where) listing all problems.

    A config without a "model" key is the v1 layout and is converted first; legacy key names are renamed.
    """
    errors: list[str] = []
    user = copy.deepcopy(raw) if "model" in raw else from_v1_layout(raw, errors)
    mode = user.get("mode")
    if isinstance(mode, dict):
        rename_legacy_key(mode.get("model_classes"), "save_names", "save_classes", "mode.model_classes", errors)
        rename_legacy_key(mode.get("model_tags"), "save_classes", "save_names", "mode.model_tags", errors)
        name = mode.get("name", _DEFAULT_MODE)
    else:
        name = _DEFAULT_MODE
    merged = merge_defaults(_inference_defaults(name), user)
    errors += schema_errors(merged, INFERENCE_SCHEMA) + _inference_semantic_errors(merged)
    raise_if_any(sorted(errors), where)
    schema = read_schema(INFERENCE_SCHEMA)
    config = coerce_integers(merged, schema)
    # The mode's keys are described by definitions/<name> (picked by if/then), out of coerce_integers' reach.
    config["mode"] = coerce_integers(config["mode"], schema["definitions"][config["mode"]["name"]])
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
        raise_if_any(problems, where)
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
