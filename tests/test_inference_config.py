from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
from jsonschema import Draft7Validator

from plugin.config import INFERENCE_SCHEMA, load_inference_config, parse_side, validate
from plugin.errors import TaskError

UNET_CLASSES = {"save_classes": "__all__", "add_suffix": "_unet"}
UNET_TAGS = {"save_names": "__all__", "add_suffix": "_unet"}
ZERO_SIDES = {"left": "0px", "top": "0px", "right": "0px", "bottom": "0px"}

FULL_IMAGE = {
    "model": {"gpu_device": 0},
    "mode": {"name": "full_image", "model_classes": UNET_CLASSES, "model_tags": UNET_TAGS, "save_probabilities": False,
             "tta": False},
    "allow_corrupted_images": 0,
}
ROI = {
    "model": {"gpu_device": 0},
    "mode": {
        "name": "roi", "model_classes": UNET_CLASSES, "model_tags": UNET_TAGS, "save_probabilities": False, "tta": False,
        "bounds": ZERO_SIDES, "save": False, "class_name": "inference_roi",
    },
    "allow_corrupted_images": 0,
}
BBOXES = {
    "model": {"gpu_device": 0},
    "mode": {
        "name": "bboxes", "model_classes": UNET_CLASSES, "model_tags": UNET_TAGS, "save_probabilities": False, "tta": False,
        "from_classes": "__all__", "padding": ZERO_SIDES, "save": False, "add_suffix": "_input_bbox",
    },
    "allow_corrupted_images": 0,
}
SLIDING_WINDOW = {
    "model": {"gpu_device": 0},
    "mode": {
        "name": "sliding_window", "model_classes": UNET_CLASSES, "model_tags": UNET_TAGS,
        "save_probabilities": False, "tta": False, "window": {"width": 128, "height": 128},
        "min_overlap": {"x": 64, "y": 64},
        "save": False, "class_name": "sliding_window", "batch_size": 8,
    },
    "allow_corrupted_images": 0,
}
DEFAULTS = {"full_image": FULL_IMAGE, "roi": ROI, "bboxes": BBOXES, "sliding_window": SLIDING_WINDOW}

# The legacy plugin's inference presets, one per mode, as the platform sends them.
PRESET_FULL_IMAGE = {"model": {"gpu_device": 0}, "mode": {"name": "full_image", "model_classes": UNET_CLASSES}}
PRESET_ROI = {
    "model": {"gpu_device": 0},
    "mode": {
        "name": "roi",
        "bounds": {"left": "10%", "top": "30%", "right": "10%", "bottom": "10%"},
        "save": False,
        "class_name": "inference_roi",
        "model_classes": UNET_CLASSES,
    },
}
PRESET_BBOXES = {
    "model": {"gpu_device": 0},
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
    "model": {"gpu_device": 0},
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
    return load_inference_config(write_config(tmp_path, config))


def problems_of(tmp_path: Path, config: object) -> list[str]:
    path = write_config(tmp_path, config)
    with pytest.raises(TaskError) as info:
        load_inference_config(path)
    assert info.value.where == str(path)
    header, *lines = info.value.message.splitlines()
    count = len(lines)
    assert header == f"invalid config ({count} problem{'s' if count > 1 else ''}):"
    return [line.strip() for line in lines]


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
    }
    assert load(tmp_path, user) == {
        "model": {"gpu_device": 2},
        "mode": {
            "name": "sliding_window", "model_classes": {"save_classes": ["kiwi"], "add_suffix": "_unet"},
            "model_tags": {"save_names": "__all__", "add_suffix": "_t"}, "save_probabilities": True, "tta": False,
            "window": {"width": 256, "height": 128}, "min_overlap": {"x": 128, "y": 32},
            "save": False, "class_name": "sliding_window", "batch_size": 8,
        },
        "allow_corrupted_images": 3,
    }


@pytest.mark.parametrize(
    "window, min_overlap, expected",
    [
        ({"width": 200}, None, {"x": 100, "y": 64}),  # from the merged window: the default height is 128
        ({"width": 201, "height": 51}, None, {"x": 100, "y": 25}),
        ({"width": 200, "height": 60}, {"y": 0}, {"x": 100, "y": 0}),  # an axis the user gives is kept
        ({"width": 1, "height": 1}, None, {"x": 0, "y": 0}),
    ],
)
def test_min_overlap_defaults_to_half_the_window(tmp_path, window, min_overlap, expected):
    mode = {"name": "sliding_window", "window": window}
    if min_overlap is not None:
        mode["min_overlap"] = min_overlap
    assert load(tmp_path, {"model": {}, "mode": mode})["mode"]["min_overlap"] == expected


@pytest.mark.parametrize("name", ["full_image", "roi", "bboxes", "sliding_window"])
@pytest.mark.parametrize("tta", [True, False, [], ["vertical"], ["horizontal", "vertical", "both"]])
def test_tta_is_accepted_in_every_mode(tmp_path, name, tta):
    assert load(tmp_path, {"model": {}, "mode": {"name": name, "tta": tta}})["mode"]["tta"] == tta


@pytest.mark.parametrize(
    "tta, expected",
    [
        (
            ["horizontal", "diagonal"],
            "mode.tta[1]: 'diagonal' is not one of ['horizontal', 'vertical', 'both']",
        ),
        ("horizontal", "mode.tta: 'horizontal' is not of type 'boolean', 'array'"),
        (["vertical", "vertical"], "mode.tta: ['vertical', 'vertical'] has non-unique elements"),
    ],
)
def test_a_bad_tta_names_its_key(tmp_path, tta, expected):
    assert problems_of(tmp_path, {"model": {}, "mode": {"name": "roi", "tta": tta}}) == [expected]


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
        SLIDING_WINDOW, min_overlap={"x": 10, "y": 10}, class_name="sl_window"
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
    }
    assert load(tmp_path, v1) == {
        "model": {"gpu_device": 1},
        "mode": {
            "name": "bboxes", "model_classes": {"save_classes": ["kiwi"], "add_suffix": "_unet"},
            "model_tags": UNET_TAGS, "save_probabilities": False, "tta": False, "from_classes": ["kiwi", "lemon"],
            "padding": {"left": "5px", "top": "10%", "right": "5px", "bottom": "10%"},
            "save": True, "add_suffix": "_box",
        },
        "allow_corrupted_images": 2,
    }


def test_v1_layout_keeps_model_classes_given_in_mode(tmp_path):
    v1 = {"mode": {"source": "roi", "model_classes": {"add_suffix": "_x"}}, "gpu_device": 0}
    config = load(tmp_path, v1)
    assert config["model"] == {"gpu_device": 0}
    assert config["mode"]["name"] == "roi"
    assert config["mode"]["model_classes"] == {"save_classes": "__all__", "add_suffix": "_x"}


def test_v1_layout_without_mode_is_full_image(tmp_path):
    assert load(tmp_path, {"gpu_device": 3}) == {**FULL_IMAGE, "model": {"gpu_device": 3}}


def test_v1_layout_errors_name_the_converted_keys(tmp_path):
    v1 = {
        "mode": {"source": "roi", "name": "roi", "model_classes": {}},
        "model_classes": {"add_suffix": "_unet"},
        "gpu_devices": [0],
    }
    assert problems_of(tmp_path, v1) == [
        "mode.source: legacy name of mode.name; give only one of them",
        "model.gpu_devices: unknown key (did you mean 'gpu_device'?)",
        "model_classes: given both at the top level (v1 layout) and in mode; keep one",
    ]


def test_save_names_is_read_as_save_classes(tmp_path):
    config = load(tmp_path, {"model": {}, "mode": {"name": "roi", "model_classes": {"save_names": ["kiwi"]}}})
    assert config["mode"]["model_classes"] == {"save_classes": ["kiwi"], "add_suffix": "_unet"}


def test_model_tags_accept_save_classes_for_save_names(tmp_path):
    config = load(tmp_path, {"model": {}, "mode": {"model_tags": {"save_classes": []}}})
    assert config["mode"]["model_tags"] == {"save_names": [], "add_suffix": "_unet"}


def test_a_key_and_its_legacy_name_together_are_an_error(tmp_path):
    user = {"model": {}, "mode": {"model_classes": {"save_names": ["a"], "save_classes": ["b"]}}}
    assert problems_of(tmp_path, user) == [
        "mode.model_classes.save_names: legacy name of mode.model_classes.save_classes; give only one of them"
    ]


@pytest.mark.parametrize(
    "mode, expected",
    [
        (
            {"name": "sliding"},
            "mode.name: 'sliding' is not one of ['full_image', 'roi', 'bboxes', 'sliding_window']",
        ),
        ({"name": None}, "mode.name: None is not one of ['full_image', 'roi', 'bboxes', 'sliding_window']"),
        ({"name": "roi", "bounds": {"left": "10 %"}}, "mode.bounds.left: '10 %' is not a side like '10px' or '10%'"),
        ({"name": "roi", "bounds": {"top": "30"}}, "mode.bounds.top: '30' is not a side like '10px' or '10%'"),
        ({"name": "roi", "bounds": {"right": "1.5%"}}, "mode.bounds.right: '1.5%' is not a side like '10px' or '10%'"),
        ({"name": "roi", "bounds": {"bottom": 10}}, "mode.bounds.bottom: 10 is not a side like '10px' or '10%'"),
        (
            {"name": "bboxes", "padding": {"left": "10PX"}},
            "mode.padding.left: '10PX' is not a side like '10px' or '10%'",
        ),
        (
            {"name": "bboxes", "padding": {"top": "5px\n"}},
            "mode.padding.top: '5px\\n' is not a side like '10px' or '10%'",
        ),
        ({"name": "bboxes", "padding": {"top": "-"}}, "mode.padding.top: '-' is not a side like '10px' or '10%'"),
        ({"name": "bboxes", "padding": "10px"}, "mode.padding: '10px' is not of type 'object'"),
        ({"name": "bboxes", "padding": {"lft": "1px"}}, "mode.padding.lft: unknown key (did you mean 'left'?)"),
        (
            {"name": "sliding_window", "window": {"width": 4097}},
            "mode.window.width: 4097 is greater than the maximum of 4096",
        ),
        ({"name": "sliding_window", "window": {"height": 0}}, "mode.window.height: 0 is less than the minimum of 1"),
        (
            {"name": "sliding_window", "window": {"width": -128}},
            "mode.window.width: -128 is less than the minimum of 1",
        ),
        ({"name": "sliding_window", "window": {"width": 64.5}}, "mode.window.width: 64.5 is not of type 'integer'"),
        (
            {"name": "sliding_window", "min_overlap": {"x": 128}},
            "mode.min_overlap.x: 128 must be less than mode.window.width (128), "
            "or the stride (window - min_overlap) would be below 1",
        ),
        (
            {"name": "sliding_window", "window": {"height": 64}, "min_overlap": {"y": 100}},
            "mode.min_overlap.y: 100 must be less than mode.window.height (64), "
            "or the stride (window - min_overlap) would be below 1",
        ),
        ({"name": "sliding_window", "min_overlap": {"x": -1}}, "mode.min_overlap.x: -1 is less than the minimum of 0"),
        ({"name": "sliding_window", "batch_size": 0}, "mode.batch_size: 0 is less than the minimum of 1"),
        ({"name": "sliding_window", "batch_size": 1025}, "mode.batch_size: 1025 is greater than the maximum of 1024"),
        ({"name": "sliding_window", "class_name": ""}, "mode.class_name: '' must not be empty"),
        (
            {"name": "roi", "window": {"width": 64, "height": 64}},
            "mode.window: unknown key (allowed: bounds, class_name, model_classes, model_tags, name, save, "
            "save_probabilities, tta)",
        ),
        (
            {"name": "full_image", "bounds": {}},
            "mode.bounds: unknown key (allowed: model_classes, model_tags, name, save_probabilities, tta)",
        ),
        (
            {"name": "sliding_window", "padding": {}},
            "mode.padding: unknown key (allowed: batch_size, class_name, min_overlap, model_classes, model_tags, "
            "name, save, save_probabilities, tta, window)",
        ),
        (
            {"name": "bboxes", "class_name": "box"},
            "mode.class_name: unknown key (allowed: add_suffix, from_classes, model_classes, model_tags, name, "
            "padding, save, save_probabilities, tta)",
        ),
        (
            {"name": "roi", "source": "roi"},
            "mode.source: unknown key (allowed: bounds, class_name, model_classes, model_tags, name, save, "
            "save_probabilities, tta)",
        ),
        (
            {"model_classes": {"add_sufix": "_x"}},
            "mode.model_classes.add_sufix: unknown key (did you mean 'add_suffix'?)",
        ),
        (
            {"model_classes": {"save_classes": "all"}},
            "mode.model_classes.save_classes: 'all' is not \"__all__\" or a list of titles",
        ),
        (
            {"model_classes": {"save_classes": ["kiwi", 3]}},
            "mode.model_classes.save_classes: ['kiwi', 3] is not \"__all__\" or a list of titles",
        ),
        ({"model_classes": {"add_suffix": None}}, "mode.model_classes.add_suffix: None is not of type 'string'"),
        (
            {"name": "bboxes", "from_classes": [""]},
            "mode.from_classes: [''] is not \"__all__\" or a list of titles",
        ),
        ({"model_tags": {"save_names": 1}}, "mode.model_tags.save_names: 1 is not \"__all__\" or a list of titles"),
        ({"save_probabilities": 1}, "mode.save_probabilities: 1 is not of type 'boolean'"),
        ({"name": "roi", "save": "yes"}, "mode.save: 'yes' is not of type 'boolean'"),
    ],
)
def test_each_bad_mode_value_names_its_key(tmp_path, mode, expected):
    assert problems_of(tmp_path, {"model": {}, "mode": mode}) == [expected]


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"model": {"gpu_device": -1}}, "model.gpu_device: -1 is less than the minimum of 0"),
        ({"model": {"gpu_device": "0"}}, "model.gpu_device: '0' is not of type 'integer'"),
        (
            {"model": {"gpu_device": 0, "gpu_devices": [0]}},
            "model.gpu_devices: unknown key (did you mean 'gpu_device'?)",
        ),
        ({"model": 0}, "model: 0 is not of type 'object'"),
        ({"model": {}, "mode": "roi"}, "mode: 'roi' is not of type 'object'"),
        ({"model": {}, "allow_corrupted_images": -1}, "allow_corrupted_images: -1 is less than the minimum of 0"),
        (
            {"model": {}, "save_probabilities": True},
            "save_probabilities: unknown key (allowed: allow_corrupted_images, mode, model)",
        ),
    ],
)
def test_each_bad_top_level_value_names_its_key(tmp_path, config, expected):
    assert problems_of(tmp_path, config) == [expected]


def test_all_violations_at_once_sorted_by_path(tmp_path):
    user = {
        "model": {"gpu_device": -2},
        "mode": {
            "name": "sliding_window",
            "window": {"width": 5000, "height": 64},
            "min_overlap": {"x": 10, "y": 64},
            "bounds": {"left": "10%"},
            "model_classes": {"save_names": "__all__", "add_sufix": "_u"},
        },
        "allow_corrupted_images": 1.5,
    }
    assert problems_of(tmp_path, user) == [
        "allow_corrupted_images: 1.5 is not of type 'integer'",
        "mode.bounds: unknown key (allowed: batch_size, class_name, min_overlap, model_classes, model_tags, name, "
        "save, save_probabilities, tta, window)",
        "mode.min_overlap.y: 64 must be less than mode.window.height (64), "
        "or the stride (window - min_overlap) would be below 1",
        "mode.model_classes.add_sufix: unknown key (did you mean 'add_suffix'?)",
        "mode.window.width: 5000 is greater than the maximum of 4096",
        "model.gpu_device: -2 is less than the minimum of 0",
    ]


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
    validate(DEFAULTS[name], INFERENCE_SCHEMA, "defaults")
    assert load(tmp_path, DEFAULTS[name]) == DEFAULTS[name]


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "task_config.json"
    with pytest.raises(TaskError) as info:
        load_inference_config(path)
    assert str(info.value) == f"{path}: file not found"


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


@pytest.mark.parametrize(
    "value", ["10", "10 %", " 10px", "10px ", "px", "%", "10.5%", "10PX", "+10px", "10px\n", 10, None]
)
def test_parse_side_rejects_what_the_schema_rejects(value):
    with pytest.raises(TaskError) as info:
        parse_side(value, 100, "mode.padding.top")
    assert info.value.where == "mode.padding.top"
    assert info.value.message == f"{value!r} is not a side like '10px' or '10%'"


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
