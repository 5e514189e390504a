"""Geometry parsing, cropping, drawing and the bitmap codec, against hand-computed pixels."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from plugin.errors import TaskError
from plugin.format import geometry
from plugin.format.geometry import (
    Bitmap,
    MultiPolygon,
    Polygon,
    Rectangle,
    bitmap_to_json,
    bounding_box,
    crop_to_image,
    decode_bitmap,
    draw,
    encode_bitmap,
    parse_geometry,
)

ISBI_ANN = Path(__file__).resolve().parent.parent.parent / "shared/data/isbi2012-membranes/slices/ann/slice_00.png.json"


def polygon_obj(exterior: list, interior: list | None = None) -> dict:
    return {"classTitle": "c", "tags": [], "points": {"exterior": exterior, "interior": interior or []}}


def render(obj: dict, shape: str, height: int, width: int, value: int = 1) -> np.ndarray:
    """parse -> crop -> draw, as an annotation is read and rasterized."""
    mask = np.zeros((height, width), np.uint8)
    for piece in crop_to_image(parse_geometry(obj, shape, "test"), height, width):
        draw(mask, piece, value)
    return mask


def box(height: int, width: int, rows: range, cols: range) -> np.ndarray:
    out = np.zeros((height, width), np.uint8)
    out[rows.start:rows.stop, cols.start:cols.stop] = 1
    return out


def png_b64(image: np.ndarray) -> str:
    ok, png = cv2.imencode(".png", image)
    assert ok
    return base64.b64encode(zlib.compress(png.tobytes())).decode()


# --- polygons ---------------------------------------------------------------------------------------

def test_spec_example_a_polygon_with_hole_and_float_vertex() -> None:
    obj = polygon_obj([[1.6, 1.5], [8, 1], [8, 8], [1, 8]], [[[3, 3], [5, 3], [5, 5], [3, 5]]])
    mask = render(obj, "polygon", 10, 12)
    expected = box(10, 12, range(1, 9), range(1, 9)) - box(10, 12, range(3, 6), range(3, 6))
    assert mask.sum() == 55
    np.testing.assert_array_equal(mask, expected)


def test_vertices_are_floored() -> None:
    geom = parse_geometry(polygon_obj([[10.9, -2.5], [3.0, 4.999], [-0.1, 7]]), "polygon", "t")
    np.testing.assert_array_equal(geom.exterior, [[10, -3], [3, 4], [-1, 7]])
    assert geom.exterior.dtype == np.int32


def test_overlapping_holes_stay_filled_where_both_cover() -> None:
    # Holes (2..6)^2 and (4..8)^2, filled in one call: even-odd leaves their overlap filled, except
    # the hole borders, which go with the holes. Only (5, 5) is strictly inside both.
    obj = polygon_obj(
        [[0, 0], [11, 0], [11, 11], [0, 11]],
        [[[2, 2], [6, 2], [6, 6], [2, 6]], [[4, 4], [8, 4], [8, 8], [4, 8]]],
    )
    mask = render(obj, "polygon", 12, 12)
    expected = np.ones((12, 12), np.uint8)
    expected[2:7, 2:7] = 0
    expected[4:9, 4:9] = 0
    expected[5, 5] = 1
    np.testing.assert_array_equal(mask, expected)


def test_pentagram_centre_is_empty() -> None:
    angles = np.deg2rad(-90 + 144 * np.arange(5))  # every second vertex of a pentagon
    star = [[20 + 18 * np.cos(a), 20 + 18 * np.sin(a)] for a in angles]
    mask = render(polygon_obj(star), "polygon", 41, 41)
    assert mask[20, 20] == 0  # the inner pentagon is crossed twice: even-odd leaves it out
    assert mask[5, 20] == 1  # the top tip
    assert mask[14, 35] == 1 and mask[14, 4] == 1  # the right and left tips


def test_polygon_inside_is_kept_unchanged() -> None:
    poly = parse_geometry(polygon_obj([[0, 0], [9, 0], [0, 9]]), "polygon", "t")
    assert crop_to_image(poly, 10, 10) == [poly]


def test_polygon_crossing_the_border_is_clipped() -> None:
    # Rows 2..6, cols -5..5: the part inside is rows 2..6, cols 0..5.
    mask = render(polygon_obj([[-5, 2], [5, 2], [5, 6], [-5, 6]]), "polygon", 10, 10)
    np.testing.assert_array_equal(mask, box(10, 10, range(2, 7), range(0, 6)))
    # A 45-degree triangle cut at x = 0: (0, 0), (6, 0), (0, 6) -> 7 + 6 + ... + 1 pixels.
    mask = render(polygon_obj([[-4, 0], [6, 0], [-4, 10]]), "polygon", 10, 10)
    ys, xs = np.nonzero(mask)
    assert mask.sum() == 28 and (xs + ys <= 6).all()


def test_clipped_vertices_round_half_to_even() -> None:
    # Hypotenuse x = 7 - 2y meets x = 0 at y = 3.5 -> 4; x = 5 - 2y meets it at y = 2.5 -> 2.
    for exterior, corner in (([[-3, 0], [7, 0], [-3, 5]], [0, 4]), ([[-5, 0], [5, 0], [-5, 5]], [0, 2])):
        [piece] = crop_to_image(parse_geometry(polygon_obj(exterior), "polygon", "t"), 10, 10)
        assert sorted(piece.exterior.tolist()) == sorted([[0, 0], [exterior[1][0], 0], corner])


def test_polygon_cut_by_the_border_into_two_parts() -> None:
    # An arch whose bridge lies above the image: two legs remain, each its own polygon.
    arch = [[1, -5], [8, -5], [8, 3], [6, 3], [6, -2], [3, -2], [3, 3], [1, 3]]
    pieces = crop_to_image(parse_geometry(polygon_obj(arch), "polygon", "t"), 10, 10)
    assert len(pieces) == 2 and all(isinstance(p, Polygon) for p in pieces)
    mask = render(polygon_obj(arch), "polygon", 10, 10)
    np.testing.assert_array_equal(mask, box(10, 10, range(0, 4), range(1, 4)) + box(10, 10, range(0, 4), range(6, 9)))


def test_polygon_entirely_outside_is_dropped() -> None:
    assert crop_to_image(parse_geometry(polygon_obj([[20, 20], [30, 20], [30, 30]]), "polygon", "t"), 10, 10) == []


def test_draw_matches_a_full_size_fill_for_random_polygons() -> None:
    # The SDK fills a full-size canvas; draw() fills only the rings' bbox. Holes that leave the
    # exterior and the image, and self-intersections, must not change a pixel.
    rng = np.random.default_rng(7)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(8, 60, 2))
        exterior = rng.integers(-40, 100, (int(rng.integers(3, 9)), 2)).astype(np.int32)
        holes = tuple(rng.integers(-60, 120, (int(rng.integers(3, 7)), 2)).astype(np.int32) for _ in range(2))
        canvas = np.zeros((height, width), np.uint8)
        cv2.fillPoly(canvas, [exterior], 1)
        cv2.fillPoly(canvas, list(holes), 0)
        expected = np.where(canvas == 1, 9, 3).astype(np.uint8)
        mask = np.full((height, width), 3, np.uint8)
        draw(mask, Polygon(exterior, holes), 9)
        np.testing.assert_array_equal(mask, expected)


def test_a_hole_reaching_far_beyond_the_image_is_drawn_at_once() -> None:
    # OpenCV's fill walks every row from a ring's top: from y = -2^31 that took 15 s for one object.
    edge = 2**31 - 1
    far = polygon_obj([[0, 0], [60, 0], [60, 60], [0, 60]], [[[-edge, -edge], [edge, -edge], [edge, edge]]])
    start = time.perf_counter()
    mask = render(far, "polygon", 64, 64)
    assert time.perf_counter() - start < 1
    # In the image the hole is what lies above the diagonal y = x, as for a near hole of that shape.
    near = polygon_obj([[0, 0], [60, 0], [60, 60], [0, 60]], [[[-1000, -1000], [1000, -1000], [1000, 1000]]])
    np.testing.assert_array_equal(mask, render(near, "polygon", 64, 64))
    assert mask.sum() == 1830


def test_multipolygon_draws_each_part_on_its_own() -> None:
    # Part 2 lies in part 1's hole: drawn separately, the hole does not erase it.
    obj = {"classTitle": "c", "tags": [], "parts": [
        {"exterior": [[0, 0], [9, 0], [9, 9], [0, 9]], "interior": [[[2, 2], [7, 2], [7, 7], [2, 7]]]},
        {"exterior": [[4, 4], [5, 4], [5, 5], [4, 5]]},
    ]}
    geom = parse_geometry(obj, "multipolygon", "t")
    assert isinstance(geom, MultiPolygon) and len(geom.parts) == 2
    expected = box(10, 10, range(0, 10), range(0, 10)) - box(10, 10, range(2, 8), range(2, 8))
    expected[4:6, 4:6] = 1
    np.testing.assert_array_equal(render(obj, "multipolygon", 10, 10), expected)


# --- rectangles -------------------------------------------------------------------------------------

def test_rectangle_is_inclusive_in_either_point_order() -> None:
    obj = polygon_obj([[6, 5], [2, 1]])
    assert parse_geometry(obj, "rectangle", "t") == Rectangle(2, 1, 6, 5)
    mask = render(obj, "rectangle", 8, 8, value=4)
    reference = np.zeros((8, 8), np.uint8)
    cv2.rectangle(reference, (2, 1), (6, 5), 4, cv2.FILLED)
    np.testing.assert_array_equal(mask, reference)
    assert mask.sum() == 4 * 5 * 5


def test_rectangle_partly_outside_is_cropped_and_outside_dropped() -> None:
    rect = parse_geometry(polygon_obj([[-3, 2], [4, 20]]), "rectangle", "t")
    assert crop_to_image(rect, 10, 10) == [Rectangle(0, 2, 4, 9)]
    assert crop_to_image(Rectangle(10, 0, 12, 3), 10, 10) == []


# --- bitmaps ----------------------------------------------------------------------------------------

def test_spec_example_c_bitmap_round_trip() -> None:
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:4] = True
    encoded = encode_bitmap(mask, (10, 20))
    assert encoded["origin"] == [11, 21]
    assert encoded["data"].startswith("eJ")
    png = zlib.decompress(base64.b64decode(encoded["data"]))
    width, height, depth, colour_type = struct.unpack(">IIBB", png[16:26])
    assert (width, height, depth, colour_type) == (3, 2, 1, 3)  # 1-bit palette PNG
    with Image.open(io.BytesIO(png)) as image:
        assert image.getpalette()[:6] == [0, 0, 0, 255, 255, 255]
        assert image.info["transparency"] == 0
    geom = parse_geometry({"classTitle": "c", "tags": [], "bitmap": encoded}, "bitmap", "t")
    assert geom.origin == (11, 21) and geom.mask.shape == (2, 3) and geom.mask.all()
    drawn = np.zeros((30, 20), np.uint8)
    draw(drawn, geom, 1)
    np.testing.assert_array_equal(drawn, box(30, 20, range(21, 23), range(11, 14)))


def test_bitmap_to_json_is_the_sdk_object_payload() -> None:
    payload = bitmap_to_json(Bitmap((3, 4), np.ones((2, 2), bool)))
    assert payload["shape"] == payload["geometryType"] == "bitmap"
    assert payload["bitmap"]["origin"] == [3, 4]
    np.testing.assert_array_equal(decode_bitmap(payload["bitmap"]["data"]), np.ones((2, 2), bool))


def test_bitmap_with_negative_origin_is_cropped() -> None:
    mask = np.zeros((3, 4), bool)
    mask[:, 1:] = True  # the true part starts at x = -1
    obj = {"classTitle": "c", "tags": [], "bitmap": encode_bitmap(mask, (-2, -1))}
    [piece] = crop_to_image(parse_geometry(obj, "bitmap", "t"), 5, 5)
    assert piece.origin == (0, 0) and piece.mask.shape == (2, 2)
    np.testing.assert_array_equal(render(obj, "bitmap", 5, 5), box(5, 5, range(0, 2), range(0, 2)))


def test_bitmap_whose_visible_part_is_empty_is_dropped() -> None:
    mask = np.zeros((3, 3), bool)
    mask[0, 0] = mask[2, 2] = True
    # At origin (-1, 1) in a 3x3 image, the visible window is mask rows 0..1, cols 1..2: all false.
    assert crop_to_image(Bitmap((-1, 1), mask), 3, 3) == []
    # At origin (-2, -2) only mask[2, 2] is visible; it lands on pixel (0, 0).
    [piece] = crop_to_image(Bitmap((-2, -2), mask), 3, 3)
    assert piece.origin == (0, 0) and piece.mask.tolist() == [[True]]


def test_decode_grey_and_alpha_images() -> None:
    grey = np.array([[0, 255], [1, 0]], np.uint8)
    np.testing.assert_array_equal(decode_bitmap(png_b64(grey)), [[False, True], [True, False]])
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[..., :3] = 255  # colour is ignored, only alpha counts
    bgra[1, 1, 3] = 200
    np.testing.assert_array_equal(decode_bitmap(png_b64(bgra)), [[False, False], [False, True]])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("not base64!", "base64"),
        (base64.b64encode(b"plain bytes").decode(), "zlib"),
        (base64.b64encode(zlib.compress(b"not a png")).decode(), "readable image"),
        (base64.b64encode(zlib.compress(b"x" * 100)[:-6]).decode(), "truncated"),
        (png_b64(np.full((2, 2, 3), 255, np.uint8)), "wrong internal mask format"),
        (png_b64(np.zeros((2, 2), np.uint8)), "empty"),
    ],
)
def test_bad_bitmap_data_is_an_error(data: str, message: str) -> None:
    with pytest.raises(TaskError, match=message) as info:
        decode_bitmap(data, "ann.json: objects[0]")
    assert info.value.where == "ann.json: objects[0]"


def test_zlib_bomb_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(geometry, "MAX_BITMAP_BYTES", 1 << 20)
    bomb = base64.b64encode(zlib.compress(bytes(2 << 20))).decode()
    with pytest.raises(TaskError, match="inflates to more than"):
        decode_bitmap(bomb)


def test_png_declaring_huge_size_is_refused() -> None:
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 1, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(header)) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    data = base64.b64encode(zlib.compress(b"\x89PNG\r\n\x1a\n" + chunk)).decode()
    with pytest.raises(TaskError, match="over"):
        decode_bitmap(data)


def test_encode_refuses_an_empty_mask() -> None:
    with pytest.raises(ValueError):
        encode_bitmap(np.zeros((3, 3), bool))


def test_real_bitmap_decodes_and_reencodes_byte_for_byte() -> None:
    if not ISBI_ANN.is_file():
        pytest.skip(f"sample data not found: {ISBI_ANN}")
    objects = json.loads(ISBI_ANN.read_text())["objects"]
    for obj in objects:
        mask = decode_bitmap(obj["bitmap"]["data"])
        # The SDK writes tight crops: the first and last rows and columns hold true pixels.
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        assert encode_bitmap(mask, tuple(obj["bitmap"]["origin"])) == obj["bitmap"]
    assert decode_bitmap(objects[0]["bitmap"]["data"]).shape == (512, 512)


# --- parser choice and malformed objects ------------------------------------------------------------

@pytest.mark.parametrize("shape", ["line", "point", "graph", "cuboid", "oriented_bbox", "alpha_mask", "any"])
def test_types_masks_do_not_draw_are_skipped(shape: str) -> None:
    obj = {"classTitle": "c", "tags": [], "points": {"exterior": [[0, 0], [5, 5]], "interior": []}}
    assert parse_geometry(obj, shape, "t") is None


def test_only_any_classes_use_the_object_type() -> None:
    rect = {"classTitle": "c", "tags": [], "geometryType": "rectangle",
            "points": {"exterior": [[0, 0], [2, 2]], "interior": []}}
    assert parse_geometry(rect, "any", "t") == Rectangle(0, 0, 2, 2)
    # The class decides: a rectangle-typed object of a polygon class is read as a polygon.
    assert isinstance(parse_geometry(rect, "polygon", "t"), Polygon)
    old_key = {"classTitle": "c", "tags": [], "shape": "rectangle", "points": rect["points"]}
    assert parse_geometry(old_key, "any", "t") == Rectangle(0, 0, 2, 2)
    # A shape the SDK does not know is read as `any`.
    assert parse_geometry(rect, "brand_new_shape", "t") == Rectangle(0, 0, 2, 2)
    assert parse_geometry({"classTitle": "c", "tags": [], "geometryType": "line", "points": {}}, "any", "t") is None


@pytest.mark.parametrize(
    ("obj", "shape", "message"),
    [
        ({"classTitle": "c", "tags": []}, "polygon", "'points' is missing"),
        ({"classTitle": "c", "tags": [], "points": [[0, 0]]}, "polygon", "'points' must be a JSON object, not list"),
        (polygon_obj([["a", "b"], [1, 2], [3, 4]]), "polygon", "points.exterior"),
        (polygon_obj([[1, 2], [3]]), "polygon", "points.exterior"),
        (polygon_obj([]), "polygon", "points.exterior"),
        (polygon_obj([[0, 0], [1, 1], [2, 0]], [[[0, 0], [1, None]]]), "polygon", r"points.interior\[0\]"),
        (polygon_obj([[0, 0], [1, 1], [2, 2]]), "rectangle", "exactly 2 points"),
        (polygon_obj([[0, 0], [float("nan"), 1]]), "rectangle", "finite"),
        ({"classTitle": "c", "tags": [], "bitmap": {"origin": [0, 0]}}, "bitmap", "base64 string"),
        ({"classTitle": "c", "tags": [], "bitmap": {"data": "eJ"}}, "bitmap", r"origin must be \[x, y\]"),
        ({"classTitle": "c", "tags": [], "bitmap": {"origin": [0, 0], "data": "abc"}}, "bitmap", "base64"),
        ({"classTitle": "c", "tags": [], "parts": []}, "multipolygon", "empty"),
    ],
)
def test_malformed_geometry_is_an_error_naming_the_object(obj: dict, shape: str, message: str) -> None:
    with pytest.raises(TaskError, match=message) as info:
        parse_geometry(obj, shape, "a.png.json: objects[3] (class 'c')")
    assert info.value.where == "a.png.json: objects[3] (class 'c')"


def test_short_rings_are_padded_like_the_sdk() -> None:
    geom = parse_geometry(polygon_obj([[1, 1], [4, 1]]), "polygon", "t")
    np.testing.assert_array_equal(geom.exterior, [[1, 1], [4, 1], [4, 1]])
    mask = np.zeros((3, 6), np.uint8)
    draw(mask, geom, 1)
    np.testing.assert_array_equal(mask, box(3, 6, range(1, 2), range(1, 5)))


def test_bounding_box_of_each_geometry() -> None:
    assert bounding_box(Rectangle(1, 2, 5, 7)) == Rectangle(1, 2, 5, 7)
    assert bounding_box(Bitmap((4, 3), np.ones((2, 5), bool))) == Rectangle(4, 3, 8, 4)
    ring = np.array([[2, 9], [6, 1], [10, 4]], np.int32)
    assert bounding_box(Polygon(ring, (np.array([[5, 4], [6, 4], [6, 5]], np.int32),))) == Rectangle(2, 1, 10, 9)
