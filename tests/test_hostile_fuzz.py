"""Fuzzing the annotation parser, the config loaders and the image reader: whatever the input, nothing
escapes but TaskError. Each test is bounded by its example count (about ten seconds here)."""

from __future__ import annotations

import base64
import copy
import io
import json
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from plugin.config.load import merged_inference_config, merged_train_config
from plugin.errors import TaskError
from plugin.format.classes import create_mapping
from plugin.format.geometry import encode_bitmap
from plugin.format.images import read_image, read_image_size
from plugin.format.masks import rasterize
from plugin.format.project import parse_annotation, read_annotation, read_meta
from tests.test_hostile_images import bitmap_bomb

# No example database: the repo stays clean, and every run draws new examples. The deadline, hundreds
# of times what an example takes, catches inputs that stall rather than fail.
FUZZ = settings(
    max_examples=1000, deadline=timedelta(seconds=2), database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8) | st.sampled_from([0, -1, 1, 2**31 - 1, 2**31, -(2**31), 2**63, 0.5, -0.0, 1e308, ""])
)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)

CLASSES = [
    {"title": "poly", "shape": "polygon", "color": "#FF0000"},
    {"title": "rect", "shape": "rectangle", "color": "#00FF00"},
    {"title": "bmp", "shape": "bitmap", "color": "#0000FF"},
    {"title": "multi", "shape": "multipolygon", "color": "#FFFF00"},
    {"title": "any", "shape": "any", "color": "#00FFFF"},
    {"title": "line", "shape": "line", "color": "#FF00FF"},
    {"title": "odd", "shape": "no such shape", "color": "#808080"},
    {"title": "neutral", "shape": "polygon", "color": "#FFFFFF"},
]
SHAPES = ["polygon", "rectangle", "bitmap", "multipolygon", "line", "point", "any", "graph"]


def _bitmap_data(rows: list[list[bool]]) -> str:
    return encode_bitmap(np.array(rows))["data"]


BITMAP_DATA = st.sampled_from([
    _bitmap_data([[True]]),
    _bitmap_data([[True, False], [False, True]]),
    bitmap_bomb(),
    base64.b64encode(zlib.compress(b"\x89PNG\r\n\x1a\n")).decode(),  # a signature and nothing more
    base64.b64encode(zlib.compress(b"GIF89a")).decode(),
    "", "not base64!",
]) | st.text(max_size=12)
# Coordinates near a 64-pixel image, and some at the int32 edges where OpenCV and shapely break
# (beyond them, in PAIR below, a coordinate is refused).
COORD = st.integers(-8, 72) | st.floats(-100, 100) | st.sampled_from([2**31 - 1, -(2**31 - 1), 2**20, -(2**20), 0.5])
COORD_PAIR = st.lists(COORD, min_size=2, max_size=2)
IN_IMAGE = st.lists(st.lists(st.integers(0, 63), min_size=2, max_size=2), min_size=1, max_size=6)
COORD_RING = st.lists(COORD_PAIR, min_size=1, max_size=6) | IN_IMAGE
# A polygon inside the image is drawn as it is, holes and all.
POLYGON = st.fixed_dictionaries({"exterior": IN_IMAGE | COORD_RING, "interior": st.lists(COORD_RING, max_size=2)})
# Objects of each drawn type, well-formed but for their values...
DRAWN = st.one_of(
    st.fixed_dictionaries({"classTitle": st.just("poly"), "points": POLYGON}),
    st.fixed_dictionaries({"classTitle": st.just("rect"), "points": st.fixed_dictionaries(
        {"exterior": st.lists(COORD_PAIR, min_size=2, max_size=2)})}),
    st.fixed_dictionaries({"classTitle": st.just("bmp"), "bitmap": st.fixed_dictionaries(
        {"origin": COORD_PAIR, "data": BITMAP_DATA})}),
    st.fixed_dictionaries({"classTitle": st.just("multi"), "parts": st.lists(POLYGON, min_size=1, max_size=3)}),
    st.fixed_dictionaries({"classTitle": st.sampled_from(["any", "odd", "line"]),
                           "geometryType": st.sampled_from(SHAPES), "points": POLYGON}),
)
WELL_FORMED = st.fixed_dictionaries({
    "size": st.fixed_dictionaries({"height": st.integers(1, 64), "width": st.integers(1, 64)}),
    "objects": st.lists(DRAWN, max_size=4),
    "tags": st.lists(st.text(max_size=5) | st.fixed_dictionaries({"name": st.text(max_size=5)}), max_size=2),
})
# ...and documents with garbage at any level.
PAIR = COORD_PAIR | st.lists(SCALARS | st.sampled_from([2**31, -(2**31), 1e300]), min_size=2, max_size=2) | JSON
RING = st.lists(PAIR, max_size=6) | IN_IMAGE | JSON
POINTS = st.fixed_dictionaries({"exterior": RING}, optional={"interior": st.lists(RING, max_size=2) | JSON}) | JSON
OBJECT = DRAWN | JSON | st.fixed_dictionaries(
    {"classTitle": st.sampled_from([c["title"] for c in CLASSES]) | JSON},
    optional={
        "points": POINTS,
        "bitmap": st.fixed_dictionaries({"origin": PAIR, "data": BITMAP_DATA}) | JSON,
        "parts": st.lists(POINTS, max_size=3) | JSON,
        "geometryType": st.sampled_from(SHAPES) | JSON,
        "shape": st.sampled_from(SHAPES) | JSON,
        "tags": JSON,
    },
)
SIZE = st.fixed_dictionaries({"height": st.integers(1, 64) | JSON, "width": st.integers(1, 64) | JSON}) | JSON
ANNOTATION = WELL_FORMED | st.fixed_dictionaries(
    {"size": SIZE, "objects": st.lists(OBJECT, max_size=5) | JSON},
    optional={"tags": st.lists(st.text(max_size=5) | st.fixed_dictionaries({"name": JSON}), max_size=3) | JSON},
) | st.dictionaries(st.text(max_size=8), JSON, max_size=4)


@pytest.fixture(scope="module")
def meta_and_mapping(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz_meta")
    (root / "meta.json").write_text(json.dumps({"classes": CLASSES, "tags": []}))
    meta = read_meta(root)
    return meta, create_mapping(meta, "bg", "neutral")


def parse_and_draw(doc: dict, meta_and_mapping, path: Path) -> None:
    meta, mapping = meta_and_mapping
    try:
        ann = parse_annotation(doc, meta, path)
    except TaskError:
        return
    if ann.height * ann.width <= 2**16:  # what a mask of the declared size costs is the limit's business
        assert rasterize(ann, mapping).shape == (ann.height, ann.width)


@FUZZ
@given(doc=ANNOTATION)
def test_fuzzed_annotations_raise_only_task_errors(meta_and_mapping, doc) -> None:
    parse_and_draw(doc, meta_and_mapping, Path("ann.json"))


@FUZZ
@given(data=st.binary(max_size=200) | (st.text(max_size=200) | ANNOTATION.map(json.dumps)).map(str.encode))
def test_fuzzed_annotation_files_raise_only_task_errors(tmp_path, meta_and_mapping, data: bytes) -> None:
    path = tmp_path / "ann.json"
    path.write_bytes(data)
    try:
        ann = read_annotation(path, meta_and_mapping[0])
    except TaskError as exc:
        assert exc.where.startswith(str(path))  # the file, or an object in it
    else:
        assert ann.height > 0 and ann.width > 0


@st.composite
def mutated(draw: st.DrawFn, base: dict) -> dict:
    """base with one to three random edits: a value replaced, a key removed, or a key added, at any depth."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        container, key = doc, None
        while True:
            keys = list(container) if isinstance(container, dict) else list(range(len(container)))
            if not keys:
                key = None
                break
            key = draw(st.sampled_from(keys))
            child = container[key]
            if not (isinstance(child, (dict, list)) and child and draw(st.booleans())):
                break
            container = child
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if key is not None and action == "replace":
            container[key] = draw(JSON)
        elif key is not None and action == "delete":
            del container[key]
        elif isinstance(container, dict):
            container[draw(st.text(max_size=8) | st.sampled_from(sorted(base)))] = draw(JSON)
        else:
            container.append(draw(JSON))
    return doc


def load_only_task_errors(load, path: Path, doc: object) -> None:
    path.write_text(json.dumps(doc))
    try:
        load(path)
    except TaskError as exc:
        assert exc.where == str(path)


@pytest.fixture(scope="module")
def full_configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """The configs as the loaders return them (every key present): the bases that fuzzing mutates."""
    root = tmp_path_factory.mktemp("fuzz_configs")
    path = root / "c.json"
    bases: dict[str, list[dict]] = {"train": [], "inference": []}
    train = [{}, {"lr_decreasing": {"patience": 2, "lr_divisor": 5}}, {"augmentations": False}]
    for doc in train:
        path.write_text(json.dumps(doc))
        bases["train"].append(merged_train_config(path))
    for name in ("full_image", "roi", "bboxes", "sliding_window"):
        path.write_text(json.dumps({"mode": {"name": name}}))
        bases["inference"].append(merged_inference_config(path))
    # The legacy v1 layout: mode.source, model_classes and the model's keys at the top level.
    bases["inference"].append({"mode": {"source": "sliding_window", "window": {"width": 64, "height": 64}},
                               "model_classes": {"save_classes": "__all__", "add_suffix": "_unet"}, "gpu_device": 0})
    return bases


def some_keys_of(base: dict) -> st.SearchStrategy[dict]:
    return st.dictionaries(st.sampled_from(sorted(base)) | st.text(max_size=8), JSON, max_size=4)


@pytest.mark.parametrize("kind, load", [("train", merged_train_config), ("inference", merged_inference_config)])
@FUZZ
@given(data=st.data())
def test_fuzzed_configs_raise_only_task_errors(tmp_path, full_configs, kind, load, data) -> None:
    base = data.draw(st.sampled_from(full_configs[kind]))
    doc = data.draw(mutated(base) | some_keys_of(base) | JSON)
    load_only_task_errors(load, tmp_path / "task_config.json", doc)


def _sample_files() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    files = []
    for kind, options in (("PNG", {}), ("JPEG", {"quality": 90}), ("WEBP", {}), ("TIFF", {}), ("BMP", {})):
        buffer = io.BytesIO()
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(rgb).save(buffer, format=kind, **({"exif": exif.tobytes()} if kind != "BMP" else {}), **options)
        files.append(buffer.getvalue())
    return files


SAMPLE_FILES = _sample_files()


@st.composite
def damaged_image(draw: st.DrawFn) -> bytes:
    """A small file of an accepted format with bytes overwritten, cut short or garbage appended."""
    data = bytearray(draw(st.sampled_from(SAMPLE_FILES)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    data = data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data
    return bytes(data) + draw(st.binary(max_size=16))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on the damage
@FUZZ
@given(data=damaged_image() | st.binary(max_size=64))
def test_fuzzed_image_files_raise_only_task_errors(tmp_path, data: bytes) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(data)
    for read in (read_image, read_image_size):
        try:
            read(path)
        except TaskError as exc:
            assert exc.where == str(path)
