"""The project on disk: finding it, meta.json, items, annotations and images, old exports included."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from plugin.errors import TaskError
from plugin.format.geometry import Bitmap, Polygon, Rectangle, encode_bitmap
from plugin.format.images import read_image
from plugin.format.project import (
    find_project,
    list_items,
    read_annotation,
    read_image_tags,
    read_meta,
)

ISBI = Path(__file__).resolve().parent.parent.parent / "shared/data/isbi2012-membranes"

CLASSES = [
    {"title": "kiwi", "shape": "polygon", "color": "#208C1C"},
    {"title": "box", "shape": "rectangle", "color": "#0000FF"},
    {"title": "blob", "shape": "bitmap", "color": "#00FF00"},
    {"title": "wire", "shape": "line", "color": "#FF00FF"},
    {"title": "thing", "shape": "any", "color": "#FFFF00"},
]


def write_meta(project: Path, classes: list | None = None, **extra: object) -> None:
    project.mkdir(parents=True, exist_ok=True)
    (project / "meta.json").write_text(json.dumps({"classes": CLASSES if classes is None else classes, **extra}))


def add_image(project: Path, dataset: str, name: str, ann: dict | None = None, ann_name: str | None = None,
              size: tuple[int, int] = (6, 8)) -> None:
    """A real PNG/JPEG file in <dataset>/img and its annotation in <dataset>/ann (None: no annotation)."""
    (project / dataset / "img").mkdir(parents=True, exist_ok=True)
    (project / dataset / "ann").mkdir(parents=True, exist_ok=True)
    image = np.zeros((*size, 3), np.uint8)
    ok, data = cv2.imencode(Path(name).suffix.lower(), image)
    assert ok
    (project / dataset / "img" / name).write_bytes(data.tobytes())
    if ann is not None:
        (project / dataset / "ann" / (ann_name or f"{name}.json")).write_text(json.dumps(ann))


def annotation(objects: list | None = None, tags: list | None = None, height: int = 6, width: int = 8) -> dict:
    tags = [] if tags is None else tags
    return {"size": {"height": height, "width": width}, "tags": tags, "objects": objects or []}


def write_ann(tmp_path: Path, ann: dict) -> Path:
    path = tmp_path / "x.png.json"
    path.write_text(json.dumps(ann))
    return path


@pytest.fixture
def meta(tmp_path: Path):
    write_meta(tmp_path / "meta_project")
    return read_meta(tmp_path / "meta_project")


# --- find_project -----------------------------------------------------------------------------------

def test_find_project_accepts_the_project_or_one_project_inside(tmp_path: Path) -> None:
    write_meta(tmp_path / "direct")
    assert find_project(tmp_path / "direct") == tmp_path / "direct"
    write_meta(tmp_path / "data" / "my project")
    (tmp_path / "data" / "stray").mkdir()
    assert find_project(tmp_path / "data") == tmp_path / "data" / "my project"
    write_meta(tmp_path / "deeper" / "export" / "proj")
    assert find_project(tmp_path / "deeper") == tmp_path / "deeper" / "export" / "proj"


def test_find_project_errors(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(TaskError, match="no project in data/") as info:
        find_project(tmp_path / "empty")
    assert info.value.where == str(tmp_path / "empty")
    write_meta(tmp_path / "two" / "a")
    write_meta(tmp_path / "two" / "b")
    with pytest.raises(TaskError, match="found 2 projects"):
        find_project(tmp_path / "two")
    with pytest.raises(TaskError, match="does not exist"):
        find_project(tmp_path / "missing")


# --- meta.json --------------------------------------------------------------------------------------

def test_read_meta_classes_and_tags(tmp_path: Path) -> None:
    write_meta(tmp_path, tags=[{"name": "train", "value_type": "none", "color": "#00FF00"}])
    meta = read_meta(tmp_path)
    assert [c.title for c in meta.classes] == ["kiwi", "box", "blob", "wire", "thing"]
    assert meta.class_by_title("box").shape == "rectangle"
    assert meta.class_by_title("kiwi").color == "#208C1C"
    assert meta.class_by_title("nope") is None
    assert [t["name"] for t in meta.tags] == ["train"]
    assert meta.raw["classes"] == CLASSES


def test_read_meta_old_tag_sections(tmp_path: Path) -> None:
    write_meta(tmp_path, img_tags=["train", {"name": "val", "value_type": "none"}], obj_tags=["train", "crowd"])
    assert [t["name"] for t in read_meta(tmp_path).tags] == ["train", "val", "crowd"]
    write_meta(tmp_path, tags=[{"name": "a"}], img_tags=["b"])
    with pytest.raises(TaskError, match="mixes"):
        read_meta(tmp_path)


@pytest.mark.parametrize(
    ("meta_text", "message"),
    [
        ('{"classes": [', "not valid JSON: .* line 1, column 14"),
        ('[]', "expected a JSON object at the top level, found an array"),
        ('{"classes": [{"title": "a", "shape": "polygon"}]}', "color"),
        ('{"classes": [{"title": "a", "shape": "polygon", "color": "#000000"},'
         ' {"title": "a", "shape": "bitmap", "color": "#000000"}]}', "appears twice"),
    ],
)
def test_read_meta_errors_name_the_file(tmp_path: Path, meta_text: str, message: str) -> None:
    (tmp_path / "meta.json").write_text(meta_text)
    with pytest.raises(TaskError, match=message) as info:
        read_meta(tmp_path)
    assert info.value.where == str(tmp_path / "meta.json")


# --- list_items -------------------------------------------------------------------------------------

def test_list_items_sorted_with_both_annotation_namings(tmp_path: Path) -> None:
    write_meta(tmp_path)
    add_image(tmp_path, "ds_b", "z.png", annotation())
    add_image(tmp_path, "ds_a", "b.JPG", annotation())
    add_image(tmp_path, "ds_a", "a.png", annotation(), ann_name="a.json")  # older exports: the stem
    (tmp_path / "ds_a" / "img" / "notes.txt").write_text("not an image")
    (tmp_path / "ds_a" / "img" / "._a.png").write_bytes(b"macOS metadata")
    (tmp_path / "ds_a" / "ann" / "._a.png.json").write_bytes(b"macOS metadata")
    (tmp_path / ".hidden").mkdir()
    items = list_items(tmp_path)
    assert [(i.dataset, i.name) for i in items] == [("ds_a", "a.png"), ("ds_a", "b.JPG"), ("ds_b", "z.png")]
    assert items[0].ann_path == tmp_path / "ds_a" / "ann" / "a.json"
    assert items[1].image_path == tmp_path / "ds_a" / "img" / "b.JPG"
    assert items[1].ann_path == tmp_path / "ds_a" / "ann" / "b.JPG.json"


def test_full_name_annotation_wins_over_the_stem(tmp_path: Path) -> None:
    write_meta(tmp_path)
    add_image(tmp_path, "ds", "a.png", annotation())
    add_image(tmp_path, "ds", "a.jpg", annotation(), ann_name="a.json")
    items = list_items(tmp_path)
    # a.png takes a.png.json (the full name first), which leaves a.json to a.jpg.
    assert [i.ann_path.name for i in items] == ["a.json", "a.png.json"]


def test_image_without_annotation_is_an_error(tmp_path: Path) -> None:
    write_meta(tmp_path)
    add_image(tmp_path, "ds", "a.png", annotation())
    add_image(tmp_path, "ds", "b.png", None)
    with pytest.raises(TaskError, match=r"no annotation: expected ann/b\.png\.json") as info:
        list_items(tmp_path)
    assert info.value.where == str(tmp_path / "ds" / "img" / "b.png")


def test_annotation_without_image_is_an_error(tmp_path: Path) -> None:
    write_meta(tmp_path)
    add_image(tmp_path, "ds", "a.png", annotation())
    (tmp_path / "ds" / "ann" / "gone.png.json").write_text(json.dumps(annotation()))
    with pytest.raises(TaskError, match="has no image") as info:
        list_items(tmp_path)
    assert info.value.where == str(tmp_path / "ds" / "ann" / "gone.png.json")


def test_annotation_claimed_by_two_images_is_an_error(tmp_path: Path) -> None:
    write_meta(tmp_path)
    add_image(tmp_path, "ds", "a.png", annotation(), ann_name="a.json")
    add_image(tmp_path, "ds", "a.jpg", None)
    with pytest.raises(TaskError, match="two images: a.jpg and a.png"):
        list_items(tmp_path)


def test_dataset_layout_errors(tmp_path: Path) -> None:
    write_meta(tmp_path)
    (tmp_path / "not_a_dataset").mkdir()
    with pytest.raises(TaskError, match="project is empty"):
        list_items(tmp_path)
    (tmp_path / "half" / "img").mkdir(parents=True)
    with pytest.raises(TaskError, match="no ann/ folder") as info:
        list_items(tmp_path)
    assert info.value.where == str(tmp_path / "half")


# --- annotations ------------------------------------------------------------------------------------

def test_read_annotation_parses_and_crops_in_json_order(tmp_path: Path, meta) -> None:
    objects = [
        {"classTitle": "box", "tags": [], "geometryType": "rectangle",
         "points": {"exterior": [[-2, 1], [3, 9]], "interior": []}},
        # Old exports: no geometryType; the class's shape decides.
        {"classTitle": "kiwi", "tags": [], "points": {"exterior": [[1, 1], [4, 1], [4, 4]], "interior": []}},
        {"classTitle": "blob", "tags": [], "bitmap": encode_bitmap(np.ones((2, 2), bool), (6, 4))},
        {"classTitle": "thing", "tags": [], "geometryType": "rectangle",
         "points": {"exterior": [[0, 0], [1, 1]], "interior": []}},
    ]
    ann = read_annotation(write_ann(tmp_path, annotation(objects, tags=[{"name": "train", "value": None}])), meta)
    assert (ann.height, ann.width, ann.tags) == (6, 8, {"train"})
    assert [label.class_title for label in ann.labels] == ["box", "kiwi", "blob", "thing"]
    assert ann.labels[0].geometry == Rectangle(0, 1, 3, 5)
    assert isinstance(ann.labels[1].geometry, Polygon)
    blob = ann.labels[2].geometry
    assert isinstance(blob, Bitmap) and blob.origin == (6, 4) and blob.mask.shape == (2, 2)
    assert ann.labels[3].geometry == Rectangle(0, 0, 1, 1)


def test_objects_outside_the_image_are_dropped(tmp_path: Path, meta) -> None:
    objects = [{"classTitle": "box", "tags": [], "points": {"exterior": [[10, 10], [12, 12]], "interior": []}}]
    assert read_annotation(write_ann(tmp_path, annotation(objects)), meta).labels == []


def test_tags_as_dicts_bare_strings_or_absent(tmp_path: Path, meta) -> None:
    doc = annotation(tags=[{"name": "train", "value": None}, {"name": "val"}, "legacy"])
    path = write_ann(tmp_path, doc)
    assert read_annotation(path, meta).tags == {"train", "val", "legacy"}
    assert read_image_tags(path) == {"train", "val", "legacy"}
    del doc["tags"]
    assert read_image_tags(write_ann(tmp_path, doc)) == set()
    with pytest.raises(TaskError, match=r"tags\[0\]"):
        read_image_tags(write_ann(tmp_path, annotation(tags=[{"value": 1}])))


def test_unknown_class_names_the_file_and_class(tmp_path: Path, meta) -> None:
    path = write_ann(tmp_path, annotation([{"classTitle": "pear", "tags": [], "points": {}}]))
    with pytest.raises(TaskError, match=r"objects\[0\] has class 'pear', which meta.json does not define") as info:
        read_annotation(path, meta)
    assert info.value.where == str(path)


def test_malformed_geometry_names_the_file_object_and_class(tmp_path: Path, meta) -> None:
    objects = [
        {"classTitle": "box", "tags": [], "points": {"exterior": [[0, 0], [1, 1]], "interior": []}},
        {"classTitle": "box", "tags": [], "points": {"exterior": [[0, 0]], "interior": []}},
    ]
    path = write_ann(tmp_path, annotation(objects))
    with pytest.raises(TaskError, match="exactly 2 points") as info:
        read_annotation(path, meta)
    assert info.value.where == f"{path}: objects[1] (class 'box')"
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"size": {"height": 0, "width": 5}, "tags": [], "objects": []}, "'size'"),
        ({"size": {"height": 5, "width": 5}, "tags": []}, "'objects'"),
        ({"size": {"height": 5, "width": 5}, "tags": [], "objects": [{"tags": []}]}, "no classTitle"),
    ],
)
def test_bad_annotation_structure(tmp_path: Path, meta, doc: dict, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        read_annotation(write_ann(tmp_path, doc), meta)


def test_undrawable_objects_are_skipped_with_one_warning_per_class(tmp_path: Path, caplog) -> None:
    classes = [{"title": "wire_once", "shape": "line", "color": "#FF00FF"},
               {"title": "free_once", "shape": "any", "color": "#FFFF00"},
               {"title": "kiwi", "shape": "polygon", "color": "#208C1C"}]
    write_meta(tmp_path / "p", classes)
    meta = read_meta(tmp_path / "p")
    line = {"classTitle": "wire_once", "tags": [], "points": {"exterior": [[0, 0], [5, 5]], "interior": []}}
    untyped = {"classTitle": "free_once", "tags": [], "points": {"exterior": [[0, 0], [5, 5]], "interior": []}}
    kiwi = {"classTitle": "kiwi", "tags": [], "points": {"exterior": [[0, 0], [3, 0], [3, 3]], "interior": []}}
    with caplog.at_level(logging.WARNING, logger="plugin.format.project"):
        for _ in range(2):
            ann = read_annotation(write_ann(tmp_path, annotation([line, untyped, line, kiwi])), meta)
            assert [label.class_title for label in ann.labels] == ["kiwi"]
    warned = [r.class_title for r in caplog.records if hasattr(r, "class_title")]
    assert warned == ["wire_once", "free_once"]


# --- the real sample project ------------------------------------------------------------------------

def test_real_project_reads() -> None:
    if not ISBI.is_dir():
        pytest.skip(f"sample data not found: {ISBI}")
    assert find_project(ISBI) == ISBI
    meta = read_meta(ISBI)
    items = list_items(ISBI)
    assert len(items) == 24 and items[0].name == "slice_00.png" and items[0].dataset == "slices"
    ann = read_annotation(items[0].ann_path, meta)
    assert (ann.height, ann.width, ann.tags) == (512, 512, {"train"})
    assert [type(label.geometry) for label in ann.labels] == [Bitmap] * 4
    assert read_image_tags(items[2].ann_path) == {"val"}
    assert read_image(items[0].image_path).shape == (512, 512, 3)
