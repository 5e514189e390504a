"""Inference config loading: defaults, merging, legacy presets and layouts, window plans, the schema and sides."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
from jsonschema import Draft7Validator

from plugin.config.load import merged_inference_config, read_inference_config
from plugin.config.schema import INFERENCE_SCHEMA, check_schema
from plugin.inference.modes import parse_side, window_plan
from plugin.inference.predictor import Predictor

UNET_CLASSES = {"save_classes": "__all__", "add_suffix": "_unet"}
UNET_TAGS = {"save_names": "__all__", "add_suffix": "_unet"}
ZERO_SIDES = {"left": "0px", "top": "0px", "right": "0px", "bottom": "0px"}
# window_plan reads only the predictor's input size and scale: a legacy model without a network.
LEGACY_MODEL = Predictor(None, None, (256, 256), ["bg", "a"], [])

FULL_IMAGE = {
    "model": {"gpu_device": 0, "amp": "auto", "backend": "torch"},
    "mode": {"name": "full_image", "model_classes": UNET_CLASSES, "model_tags": UNET_TAGS, "save_probabilities": False,
             "tta": False, "batch_size": 8},
    "allow_corrupted_images": 0,
    "max_image_pixels": 2**28,
}
ROI = {
    "model": {"gpu_device": 0, "amp": "auto", "backend": "torch"},
    "mode": {
        "name": "roi", "model_classes": UNET_CLASSES, "model_tags": UNET_TAGS, "save_probabilities": False, "tta": False,
        "bounds": ZERO_SIDES, "save": False, "class_name": "inference_roi",
    },
    "allow_corrupted_images": 0,
    "max_image_pixels": 2**28,
}
BBOXES = {
    "model": {"gpu_device": 0, "amp": "auto", "backend": "torch"},
    "mode": {
        "name": "bboxes", "model_classes": UNET_CLASSES, "model_tags": UNET_TAGS, "save_probabilities": False, "tta": False,
        "from_classes": "__all__", "padding": ZERO_SIDES, "save": False, "add_suffix": "_input_bbox",
    },
    "allow_corrupted_images": 0,
    "max_image_pixels": 2**28,
}
SLIDING_WINDOW = {
    "model": {"gpu_device": 0, "amp": "auto", "backend": "torch"},
    "mode": {
        "name": "sliding_window", "model_classes": UNET_CLASSES, "model_tags": UNET_TAGS,
        "save_probabilities": False, "tta": False, "window": {"width": None, "height": None},
        "min_overlap": {"x": None, "y": None},
        "save": False, "class_name": "sliding_window", "batch_size": 8,
    },
    "allow_corrupted_images": 0,
    "max_image_pixels": 2**28,
}
DEFAULTS = {"full_image": FULL_IMAGE, "roi": ROI, "bboxes": BBOXES, "sliding_window": SLIDING_WINDOW}

# The legacy plugin's inference presets, one per mode, as the platform sends them.
PRESET_FULL_IMAGE = {"model": {"gpu_device": 0}, "mode": {"name": "full_image", "model_classes": UNET_CLASSES}}
PRESET_ROI = {
    "model": {"gpu_device": 0, "amp": "auto", "backend": "torch"},
    "mode": {
        "name": "roi",
        "bounds": {"left": "10%", "top": "30%", "right": "10%", "bottom": "10%"},
        "save": False,
        "class_name": "inference_roi",
        "model_classes": UNET_CLASSES,
    },
}
PRESET_BBOXES = {
    "model": {"gpu_device": 0, "amp": "auto", "backend": "torch"},
    "mode": {
        "name": "bboxes",
        "from_classes": "__all__",
        "padding": {"left": "10px", "top": "10px", "right": "10px", "bottom": "10px"},
        "save": False,
        "add_suffix": "_input_bbox",
        "model_classes": UNET_CLASSES,
    },
}
PRESET_SLIDING_WINDOW = {
    "model": {"gpu_device": 0, "amp": "auto", "backend": "torch"},
    "mode": {
        "name": "sliding_window",
        "window": {"width": 128, "height": 128},
        "min_overlap": {"x": 10, "y": 10},
        "save": False,
        "class_name": "sl_window",
        "model_classes": UNET_CLASSES,
    },
}


def write_config(tmp_path: Path, config: object) -> Path:
    path = tmp_path / "task_config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def load(tmp_path: Path, config: object) -> dict:
    return merged_inference_config(write_config(tmp_path, config))


def with_mode(base: dict, **changes: object) -> dict:
    return {**base, "mode": {**base["mode"], **changes}}


def test_empty_config_is_full_image_with_the_unet_suffix(tmp_path):
    assert load(tmp_path, {}) == FULL_IMAGE
    assert load(tmp_path, {"model": {}}) == FULL_IMAGE
    assert load(tmp_path, {"model": {}, "mode": {}}) == FULL_IMAGE


@pytest.mark.parametrize("name", ["full_image", "roi", "bboxes", "sliding_window"])
def test_each_mode_gets_its_defaults_and_the_unet_suffix(tmp_path, name):
    config = load(tmp_path, {"model": {}, "mode": {"name": name}})
    assert config == DEFAULTS[name]
    assert list(config["mode"])[0] == "name"


def test_user_values_merge_into_the_mode_defaults_key_by_key(tmp_path):
    user = {
        "model": {"gpu_device": 2},
        "mode": {
            "name": "sliding_window",
            "window": {"width": 256},
            "min_overlap": {"y": 32},
            "model_classes": {"save_classes": ["kiwi"]},
            "model_tags": {"add_suffix": "_t"},
            "save_probabilities": True,
        },
        "allow_corrupted_images": 3,
        "max_image_pixels": 10**6,
    }
    assert load(tmp_path, user) == {
        "model": {"gpu_device": 2, "amp": "auto", "backend": "torch"},
        "mode": {
            "name": "sliding_window", "model_classes": {"save_classes": ["kiwi"], "add_suffix": "_unet"},
            "model_tags": {"save_names": "__all__", "add_suffix": "_t"}, "save_probabilities": True, "tta": False,
            "window": {"width": 256, "height": None}, "min_overlap": {"x": None, "y": 32},
            "save": False, "class_name": "sliding_window", "batch_size": 8,
        },
        "allow_corrupted_images": 3,
        "max_image_pixels": 10**6,
    }


@pytest.mark.parametrize(
    "window, min_overlap, expected",
    [
        ({"width": 200}, None, ((200, 128), (100, 64))),  # a legacy model's other side is 128
        ({"width": 201, "height": 51}, None, ((201, 51), (100, 25))),
        ({"width": 200, "height": 60}, {"y": 0}, ((200, 60), (100, 0))),  # an axis the user gives is kept
        ({"width": 1, "height": 1}, None, ((1, 1), (0, 0))),
    ],
)
def test_min_overlap_defaults_to_half_the_window(tmp_path, window, min_overlap, expected):
    mode = {"name": "sliding_window", "window": window}
    if min_overlap is not None:
        mode["min_overlap"] = min_overlap
    path = tmp_path / "task_config.json"
    path.write_text(json.dumps({"model": {}, "mode": mode}))
    typed = read_inference_config(path).mode
    assert window_plan(LEGACY_MODEL, typed.window, typed.min_overlap) == expected


@pytest.mark.parametrize("name", ["full_image", "roi", "bboxes", "sliding_window"])
@pytest.mark.parametrize("tta", [True, False, [], ["vertical"], ["horizontal", "vertical", "both"]])
def test_tta_is_accepted_in_every_mode(tmp_path, name, tta):
    assert load(tmp_path, {"model": {}, "mode": {"name": name, "tta": tta}})["mode"]["tta"] == tta


def test_roi_bounds_merge_side_by_side(tmp_path):
    config = load(tmp_path, {"model": {}, "mode": {"name": "roi", "bounds": {"top": "-5%"}, "save": True}})
    assert config["mode"]["bounds"] == {"left": "0px", "top": "-5%", "right": "0px", "bottom": "0px"}
    assert config["mode"]["save"] is True


def test_an_empty_suffix_is_kept(tmp_path):
    config = load(tmp_path, {"model": {}, "mode": {"name": "roi", "model_classes": {"add_suffix": ""}}})
    assert config["mode"]["model_classes"] == {"save_classes": "__all__", "add_suffix": ""}


def test_legacy_full_image_preset(tmp_path):
    assert load(tmp_path, PRESET_FULL_IMAGE) == FULL_IMAGE


def test_legacy_roi_preset(tmp_path):
    assert load(tmp_path, PRESET_ROI) == with_mode(
        ROI, bounds={"left": "10%", "top": "30%", "right": "10%", "bottom": "10%"}
    )


def test_legacy_bboxes_preset(tmp_path):
    assert load(tmp_path, PRESET_BBOXES) == with_mode(
        BBOXES, padding={"left": "10px", "top": "10px", "right": "10px", "bottom": "10px"}
    )


def test_legacy_sliding_window_preset(tmp_path):
    assert load(tmp_path, PRESET_SLIDING_WINDOW) == with_mode(
        SLIDING_WINDOW, window={"width": 128, "height": 128}, min_overlap={"x": 10, "y": 10}, class_name="sl_window"
    )


def test_v1_layout_is_converted(tmp_path):
    v1 = {
        "mode": {
            "source": "bboxes",
            "from_classes": ["kiwi", "lemon"],
            "padding": {"left": "5px", "top": "10%", "right": "5px", "bottom": "10%"},
            "save": True,
            "add_suffix": "_box",
        },
        "model_classes": {"save_names": ["kiwi"], "add_suffix": "_unet"},
        "gpu_device": 1,
        "allow_corrupted_images": 2,
        "max_image_pixels": 2**20,  # ours, not a model key: it stays at the top
    }
    assert load(tmp_path, v1) == {
        "model": {"gpu_device": 1, "amp": "auto", "backend": "torch"},
        "mode": {
            "name": "bboxes", "model_classes": {"save_classes": ["kiwi"], "add_suffix": "_unet"},
            "model_tags": UNET_TAGS, "save_probabilities": False, "tta": False, "from_classes": ["kiwi", "lemon"],
            "padding": {"left": "5px", "top": "10%", "right": "5px", "bottom": "10%"},
            "save": True, "add_suffix": "_box",
        },
        "allow_corrupted_images": 2,
        "max_image_pixels": 2**20,
    }


def test_v1_layout_keeps_model_classes_given_in_mode(tmp_path):
    v1 = {"mode": {"source": "roi", "model_classes": {"add_suffix": "_x"}}, "gpu_device": 0}
    config = load(tmp_path, v1)
    assert config["model"] == {"gpu_device": 0, "amp": "auto", "backend": "torch"}
    assert config["mode"]["name"] == "roi"
    assert config["mode"]["model_classes"] == {"save_classes": "__all__", "add_suffix": "_x"}


def test_v1_layout_without_mode_is_full_image(tmp_path):
    assert load(tmp_path, {"gpu_device": 3}) == {**FULL_IMAGE, "model": {"gpu_device": 3, "amp": "auto", "backend": "torch"}}


def test_save_names_is_read_as_save_classes(tmp_path):
    config = load(tmp_path, {"model": {}, "mode": {"name": "roi", "model_classes": {"save_names": ["kiwi"]}}})
    assert config["mode"]["model_classes"] == {"save_classes": ["kiwi"], "add_suffix": "_unet"}


def test_model_tags_accept_save_classes_for_save_names(tmp_path):
    config = load(tmp_path, {"model": {}, "mode": {"model_tags": {"save_classes": []}}})
    assert config["mode"]["model_tags"] == {"save_names": [], "add_suffix": "_unet"}


def test_integral_floats_become_ints(tmp_path):
    user = {
        "model": {"gpu_device": 1.0},
        "mode": {"name": "sliding_window", "window": {"width": 64.0}, "min_overlap": {"x": 8.0}, "batch_size": 4.0},
        "allow_corrupted_images": 2.0,
    }
    config = load(tmp_path, user)
    values = [config["model"]["gpu_device"], config["mode"]["window"]["width"], config["mode"]["min_overlap"]["x"],
              config["mode"]["batch_size"], config["allow_corrupted_images"]]
    assert values == [1, 64, 8, 4, 2]
    assert all(type(value) is int for value in values)


@pytest.mark.parametrize("name", ["full_image", "roi", "bboxes", "sliding_window"])
def test_a_normalized_config_loads_to_itself(tmp_path, name):
    check_schema(DEFAULTS[name], INFERENCE_SCHEMA, "defaults")
    assert load(tmp_path, DEFAULTS[name]) == DEFAULTS[name]


def test_schema_is_strict_and_documented():
    schema = json.loads(resources.files("schemas").joinpath(f"{INFERENCE_SCHEMA}.schema.json").read_text())
    Draft7Validator.check_schema(schema)
    definitions = schema["definitions"]

    def resolve(node: dict) -> dict:
        return definitions[node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else node

    def walk(node: dict, path: str) -> None:
        node = resolve(node)
        if path == ".mode":
            return  # open: its keys are those of the chosen mode, checked below
        if node.get("type") == "object":
            assert node["additionalProperties"] is False, path
            assert sorted(node["required"]) == sorted(node["properties"]), path
        for key, child in node.get("properties", {}).items():
            assert resolve(child).get("description"), f"{path}.{key} has no description"
            walk(child, f"{path}.{key}")

    walk(schema, "")
    assert schema["properties"]["mode"]["description"]
    modes = schema["properties"]["mode"]["properties"]["name"]["enum"]
    assert modes == ["full_image", "roi", "bboxes", "sliding_window"]
    for name in modes:
        walk(definitions[name], name)
        assert set(definitions[name]["properties"]) == set(DEFAULTS[name]["mode"]), name


@pytest.mark.parametrize(
    "value, length, expected",
    [
        ("10px", 500, 10),
        ("0px", 500, 0),
        ("-5px", 500, -5),
        ("4000px", 10, 4000),
        ("10%", 1000, 100),
        ("30%", 500, 150),
        ("0%", 77, 0),
        ("33%", 10, 3),  # 3.3 truncated
        ("99%", 1, 0),  # 0.99 truncated
        ("150%", 7, 10),  # 10.5 truncated
        ("-33%", 10, -3),  # toward zero, as int(): not -4
        ("-150%", 7, -10),
        ("100%", 4096, 4096),
    ],
)
def test_parse_side(value, length, expected):
    assert parse_side(value, length, "mode.bounds.left") == expected


def test_roi_example_from_the_spec(tmp_path):
    # 500x1000 image, "30%" top and "10%" elsewhere: rows 150..449, cols 100..899.
    mode = load(tmp_path, {"model": {}, "mode": {"name": "roi", "bounds": {
        "left": "10%", "top": "30%", "right": "10%", "bottom": "10%"}}})["mode"]
    height, width = 500, 1000
    bounds = mode["bounds"]
    top = parse_side(bounds["top"], height, "mode.bounds.top")
    left = parse_side(bounds["left"], width, "mode.bounds.left")
    bottom = height - parse_side(bounds["bottom"], height, "mode.bounds.bottom") - 1
    right = width - parse_side(bounds["right"], width, "mode.bounds.right") - 1
    assert (top, bottom, left, right) == (150, 449, 100, 899)
