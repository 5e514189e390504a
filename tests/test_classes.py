"""Class title -> index: the legacy order, neutral 255, out_classes, and the continue_training check."""

from __future__ import annotations

import pytest

from plugin.errors import TaskError
from plugin.format.classes import NEUTRAL_INDEX, check_continue_training, create_mapping
from plugin.format.project import ObjClass, ProjectMeta


def meta_of(*titles: str) -> ProjectMeta:
    classes = [ObjClass(title, "polygon", f"#00000{i}") for i, title in enumerate(titles)]
    return ProjectMeta(classes=classes, tags=[], raw={})


def test_background_zero_others_sorted_neutral_255() -> None:
    mapping = create_mapping(meta_of("zebra", "bg", "Apple", "neutral", "apple", "Zulu"), "bg", "neutral")
    # Python string order: upper case sorts before lower case.
    assert mapping.title_to_idx == {"bg": 0, "Apple": 1, "Zulu": 2, "apple": 3, "zebra": 4}
    assert mapping.num_classes == 5
    assert mapping.index_of("neutral") == NEUTRAL_INDEX == 255
    assert mapping.index_of("zebra") == 4 and mapping.index_of("bg") == 0
    assert "neutral" not in mapping.title_to_idx
    assert mapping.with_neutral() == {**mapping.title_to_idx, "neutral": 255}
    assert (mapping.background, mapping.neutral) == ("bg", "neutral")


def test_out_classes_in_meta_order_without_neutral() -> None:
    mapping = create_mapping(meta_of("zebra", "bg", "neutral", "apple"), "bg", "neutral")
    assert mapping.out_classes == [
        {"title": "zebra", "shape": "bitmap", "color": "#000000", "geometry_config": {}},
        {"title": "bg", "shape": "bitmap", "color": "#000001", "geometry_config": {}},
        {"title": "apple", "shape": "bitmap", "color": "#000003", "geometry_config": {}},
    ]


def test_background_missing_from_meta_is_added_last() -> None:
    mapping = create_mapping(meta_of("kiwi", "lemon"), "bg", "neutral")
    assert mapping.title_to_idx == {"bg": 0, "kiwi": 1, "lemon": 2}
    assert [c["title"] for c in mapping.out_classes] == ["kiwi", "lemon", "bg"]
    assert mapping.out_classes[-1] == {"title": "bg", "shape": "bitmap", "color": "#222222", "geometry_config": {}}


def test_mapping_errors() -> None:
    with pytest.raises(TaskError, match="must differ"):
        create_mapping(meta_of("a"), "x", "x")
    with pytest.raises(TaskError, match="at most 254"):
        create_mapping(meta_of(*(f"c{i:03d}" for i in range(255))), "bg", "neutral")
    assert create_mapping(meta_of(*(f"c{i:03d}" for i in range(254))), "bg", "neutral").num_classes == 255
    with pytest.raises(TaskError, match="'pear' has no index"):
        create_mapping(meta_of("kiwi"), "bg", "neutral").index_of("pear")


def test_continue_training_accepts_the_same_mapping() -> None:
    mapping = create_mapping(meta_of("kiwi", "lemon", "neutral"), "bg", "neutral")
    check_continue_training(mapping, {"bg": 0, "kiwi": 1, "lemon": 2}, "model/config.json")


def test_continue_training_mismatch_lists_the_differences() -> None:
    mapping = create_mapping(meta_of("kiwi", "lemon", "lime"), "bg", "neutral")
    saved = {"bg": 0, "kiwi": 2, "lemon": 1, "pear": 3}
    with pytest.raises(TaskError) as info:
        check_continue_training(mapping, saved, "model/config.json")
    assert info.value.where == "model/config.json"
    assert "do not match" in info.value.message
    assert "only in the model: 'pear'" in info.value.message
    assert "only in the project: 'lime'" in info.value.message
    assert "'kiwi' is 2 in the model, 1 in the project" in info.value.message
    assert "'lemon' is 1 in the model, 2 in the project" in info.value.message


@pytest.mark.parametrize("saved", [{}, {"bg": "0"}, {"bg": True}, {"bg": 0.0}])
def test_continue_training_needs_integer_indices(saved: dict) -> None:
    mapping = create_mapping(meta_of("kiwi"), "bg", "neutral")
    with pytest.raises(TaskError, match="integer indices") as info:
        check_continue_training(mapping, saved, "model/config.json")
    assert info.value.where == "model/config.json"
