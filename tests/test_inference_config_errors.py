"""Inference config bad input: each bad value names its key, error formatting, missing file, bad sides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plugin.config.load import merged_inference_config, read_inference_config
from plugin.errors import TaskError
from plugin.inference.modes import parse_side, window_plan
from tests.test_inference_config import LEGACY_MODEL, write_config


def problems_of(tmp_path: Path, config: object) -> list[str]:
    path = write_config(tmp_path, config)
    with pytest.raises(TaskError) as info:
        merged_inference_config(path)
    assert info.value.where == str(path)
    header, *lines = info.value.message.splitlines()
    count = len(lines)
    assert header == f"invalid config ({count} problem{'s' if count > 1 else ''}):"
    return [line.strip() for line in lines]


def test_an_overlap_as_wide_as_the_models_window_names_its_key(tmp_path):
    path = tmp_path / "task_config.json"
    path.write_text(json.dumps({"model": {}, "mode": {"name": "sliding_window", "min_overlap": {"x": 128}}}))
    typed = read_inference_config(path).mode
    with pytest.raises(TaskError) as err:
        window_plan(LEGACY_MODEL, typed.window, typed.min_overlap)
    assert err.value.where == "mode.min_overlap.x"
    assert "128 must be less than the window's side (128)" in str(err.value)


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
        ({"name": "sliding_window", "window": {"width": 64.5}}, "mode.window.width: 64.5 is not of type 'integer', 'null'"),
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
            "mode.bounds: unknown key (allowed: batch_size, model_classes, model_tags, name, save_probabilities, tta)",
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
            "save_probabilities: unknown key (allowed: allow_corrupted_images, max_image_pixels, mode, model)",
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


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "task_config.json"
    with pytest.raises(TaskError) as info:
        merged_inference_config(path)
    assert str(info.value) == f"{path}: file not found"


@pytest.mark.parametrize(
    "value", ["10", "10 %", " 10px", "10px ", "px", "%", "10.5%", "10PX", "+10px", "10px\n", 10, None]
)
def test_parse_side_rejects_what_the_schema_rejects(value):
    with pytest.raises(TaskError) as info:
        parse_side(value, 100, "mode.padding.top")
    assert info.value.where == "mode.padding.top"
    assert info.value.message == f"{value!r} is not a side like '10px' or '10%'"
