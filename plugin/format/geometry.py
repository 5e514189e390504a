"""Supervisely geometries: parse them from annotation JSON, crop them to the image and draw them into a
class mask pixel for pixel as SDK 6.74 does; encode and decode bitmaps.

Coordinates are [x, y] = [column, row] everywhere, as in the JSON.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import struct
import zlib
from dataclasses import dataclass

import cv2
import numpy as np
import shapely
from PIL import Image
from shapely.geometry import Polygon as ShapelyPolygon

from plugin.errors import TaskError
from plugin.format.images import PNG_SIGNATURE, check_image_pixels, check_png_chunks

log = logging.getLogger(__name__)

# A few hundred bytes of base64 can inflate to gigabytes (zlib bomb, then a PNG bomb inside it):
# cap both the inflated PNG and the pixels it may declare (those of an image, images.max_image_pixels).
MAX_BITMAP_BYTES = 256 * 2**20

DRAWN_SHAPES = frozenset({"polygon", "rectangle", "bitmap", "multipolygon"})
# Every shape name the SDK knows; a class shape outside this set is read as "any", as the SDK does.
KNOWN_SHAPES = DRAWN_SHAPES | {
    "any", "line", "point", "graph", "cuboid", "cuboid_2d", "cuboid_3d", "point_3d", "polyline_3d",
    "oriented_bbox", "alpha_mask", "mask_3d", "pointcloud", "closed_surface_mesh", "multichannelBitmap",
}

# A hole reaching further than this beyond the image is cropped before it is drawn (_hole_in_image);
# nearer ones are drawn as the SDK draws them. OpenCV fills 2^16 rows above the image in about 0.5 ms.
_FAR = 2**16
_BITMAP_PALETTE = [0, 0, 0, 255, 255, 255]


# eq=False: numpy fields make the generated __eq__ ambiguous; identity is what callers need.
@dataclass(frozen=True, eq=False)
class Polygon:
    exterior: np.ndarray  # (N, 2) int32 [x, y]
    interiors: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class Rectangle:
    left: int
    top: int
    right: int  # inclusive
    bottom: int  # inclusive


@dataclass(frozen=True, eq=False)
class Bitmap:
    origin: tuple[int, int]  # (x, y) = (col, row) of mask[0, 0]; may be negative before cropping
    mask: np.ndarray  # bool (h, w)


@dataclass(frozen=True, eq=False)
class MultiPolygon:
    """Only a parse result: crop_to_image turns it into its Polygon parts, each drawn on its own."""

    parts: tuple[Polygon, ...]


Geometry = Polygon | Rectangle | Bitmap


def object_shape(obj: dict, class_shape: str) -> str | None:
    """The geometry type an object is parsed as: the class shape, or for `any` (and shapes the SDK does
    not know) the object's own geometryType / shape; None when an `any` object names none."""
    if class_shape in KNOWN_SHAPES and class_shape != "any":
        return class_shape
    own = obj.get("geometryType", obj.get("shape"))
    return own if isinstance(own, str) else None


def parse_geometry(obj: dict, shape: str, where: str) -> Geometry | MultiPolygon | None:
    """The object's geometry, vertices floored as SDK 6.74 does; None for a type masks do not draw."""
    kind = object_shape(obj, shape)
    if kind == "polygon":
        points = _field(obj, "points", dict, where)
        return _parse_polygon(points, "points", where)
    if kind == "multipolygon":
        parts = _field(obj, "parts", list, where)
        if not parts:
            raise TaskError("multipolygon 'parts' is empty", where)
        return MultiPolygon(tuple(
            _parse_polygon(_field(parts, k, dict, where, f"parts[{k}]"), f"parts[{k}]", where)
            for k in range(len(parts))
        ))
    if kind == "rectangle":
        points = _field(obj, "points", dict, where)
        corners = _coords(points.get("exterior"), "points.exterior", where)
        if len(corners) != 2:
            raise TaskError(f"a rectangle needs exactly 2 points in points.exterior, got {len(corners)}", where)
        (x0, y0), (x1, y1) = corners.tolist()
        return Rectangle(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    if kind == "bitmap":
        payload = _field(obj, "bitmap", dict, where)
        origin = payload.get("origin")
        if not isinstance(origin, list) or len(origin) != 2:
            raise TaskError("bitmap.origin must be [x, y]", where)
        ((x, y),) = _coords([origin], "bitmap.origin", where).tolist()
        data = payload.get("data")
        if not isinstance(data, str):
            raise TaskError("bitmap.data must be a base64 string", where)
        return _tight_bitmap(decode_bitmap(data, where), (x, y))
    return None


def crop_to_image(geom: Geometry | MultiPolygon, height: int, width: int) -> list[Geometry]:
    """The parts of geom inside rows 0..height-1, cols 0..width-1, exactly as the SDK crops on load."""
    if isinstance(geom, Rectangle):
        box = _clip_box(geom.left, geom.top, geom.right, geom.bottom, height, width)
        return [] if box is None else [Rectangle(*box)]
    if isinstance(geom, Bitmap):
        x, y = geom.origin
        h, w = geom.mask.shape
        box = _clip_box(x, y, x + w - 1, y + h - 1, height, width)
        if box is None:
            return []
        left, top, right, bottom = box
        if box == (x, y, x + w - 1, y + h - 1):
            return [geom]
        sub = geom.mask[top - y:bottom - y + 1, left - x:right - x + 1]
        return [_tight_bitmap(sub, (left, top))] if sub.any() else []
    # The SDK keeps a vector geometry untouched when its bbox (exterior only) lies inside the image;
    # otherwise every polygon (every part of a multipolygon) goes through shapely.
    parts = geom.parts if isinstance(geom, MultiPolygon) else (geom,)
    exterior = np.concatenate([p.exterior for p in parts])
    (x0, y0), (x1, y1) = exterior.min(0), exterior.max(0)
    if x0 >= 0 and y0 >= 0 and x1 <= width - 1 and y1 <= height - 1:
        return list(parts)
    return [piece for part in parts for piece in _clip_polygon(part, height, width)]


def draw(mask: np.ndarray, geom: Geometry | MultiPolygon, value: int) -> None:
    """Paint geom with value into the uint8 (H, W) mask, in place; pixels outside the mask are ignored."""
    height, width = mask.shape
    if isinstance(geom, Rectangle):
        box = _clip_box(geom.left, geom.top, geom.right, geom.bottom, height, width)
        if box is not None:
            left, top, right, bottom = box
            mask[top:bottom + 1, left:right + 1] = value
    elif isinstance(geom, Bitmap):
        x, y = geom.origin
        h, w = geom.mask.shape
        box = _clip_box(x, y, x + w - 1, y + h - 1, height, width)
        if box is not None:
            left, top, right, bottom = box
            sub = geom.mask[top - y:bottom - y + 1, left - x:right - x + 1]
            np.copyto(mask[top:bottom + 1, left:right + 1], value, where=sub)
    elif isinstance(geom, MultiPolygon):
        for part in geom.parts:
            _fill_polygon(mask, part, value)
    else:
        _fill_polygon(mask, geom, value)


def decode_bitmap(data: str, where: str = "") -> np.ndarray:
    """bool mask from the SDK's base64(zlib(PNG)); the alpha channel is the mask when there is one."""
    try:
        packed = base64.b64decode(data)
    except (binascii.Error, ValueError):
        raise TaskError("bitmap.data is not valid base64", where) from None
    inflater = zlib.decompressobj()
    try:
        png = inflater.decompress(packed, MAX_BITMAP_BYTES)
    except zlib.error as exc:
        raise TaskError(f"bitmap.data is not zlib-compressed: {exc}", where) from None
    if inflater.unconsumed_tail:
        raise TaskError(f"bitmap.data inflates to more than {MAX_BITMAP_BYTES} bytes", where)
    if not inflater.eof:
        raise TaskError("bitmap.data is a truncated zlib stream", where)
    # The SDK writes PNG; any other format OpenCV decodes would be a bomb whose size nothing checked.
    if len(png) < 24 or not png.startswith(PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise TaskError("bitmap.data does not hold a readable image: it is not a PNG", where)
    png_width, png_height = struct.unpack(">II", png[16:24])
    check_image_pixels(png_width, png_height, "the bitmap's PNG", where)
    check_png_chunks(io.BytesIO(png), "the bitmap's PNG", where)
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise TaskError("bitmap.data does not hold a readable image", where)
    if image.ndim == 3 and image.shape[2] >= 4:
        mask = image[:, :, 3] != 0
    elif image.ndim == 2:
        mask = image != 0
    else:
        raise TaskError(f"wrong internal mask format: an image with {image.shape[2]} channels and no alpha", where)
    if not mask.any():
        raise TaskError("bitmap mask is empty", where)
    return mask


def bounding_box(geom: Geometry) -> Rectangle:
    """The inclusive box around a geometry (a polygon's exterior, a bitmap's mask array)."""
    if isinstance(geom, Rectangle):
        return geom
    if isinstance(geom, Bitmap):
        x, y = geom.origin
        h, w = geom.mask.shape
        return Rectangle(x, y, x + w - 1, y + h - 1)
    (x0, y0), (x1, y1) = geom.exterior.min(0), geom.exterior.max(0)
    return Rectangle(int(x0), int(y0), int(x1), int(y1))


def encode_bitmap(mask: np.ndarray, origin: tuple[int, int] = (0, 0)) -> dict:
    """{"origin": [x, y], "data": "eJ..."} as the SDK writes it: cropped to the true pixels, 1-bit palette PNG
    with index 0 transparent, zlib, base64. origin is where mask[0, 0] lies in the image."""
    mask = np.asarray(mask, dtype=bool)
    box = true_box(mask)
    if box is None:
        raise ValueError("cannot encode an empty bitmap")
    top, bottom, left, right = box
    crop = mask[top:bottom + 1, left:right + 1]
    image = Image.frombytes("P", (crop.shape[1], crop.shape[0]), crop.astype(np.uint8).tobytes())
    # A 2-colour palette makes Pillow write a 1-bit PNG, the SDK's format.
    image.putpalette(_BITMAP_PALETTE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0, optimize=False)
    data = base64.b64encode(zlib.compress(buffer.getvalue())).decode("ascii")
    return {"origin": [int(origin[0]) + left, int(origin[1]) + top], "data": data}


def bitmap_to_json(bitmap: Bitmap) -> dict:
    """The geometry keys of an object as SDK 6.74 writes a bitmap label (classTitle, tags... are the caller's)."""
    return {"bitmap": encode_bitmap(bitmap.mask, bitmap.origin), "shape": "bitmap", "geometryType": "bitmap"}


def _field(container: dict | list, key: str | int, kind: type, where: str, name: str | None = None):
    value = container.get(key) if isinstance(container, dict) else container[key]
    if not isinstance(value, kind):
        label = name or repr(key)
        if value is None:
            raise TaskError(f"{label} is missing", where)
        expected = "object" if kind is dict else "array"
        raise TaskError(f"{label} must be a JSON {expected}, not {type(value).__name__}", where)
    return value


def _coords(value: object, name: str, where: str) -> np.ndarray:
    """(N, 2) int32 from [[x, y], ...], floored (SDK 6.74: 10.9 -> 10, -2.5 -> -3)."""
    try:
        array = np.asarray(value) if isinstance(value, list) else None
    except ValueError:  # ragged nesting
        array = None
    if array is None or array.dtype.kind not in "iuf" or array.ndim != 2 or array.shape[1] != 2 or not len(array):
        raise TaskError(f"{name} must be a non-empty list of [x, y] number pairs", where)
    array = np.floor(array)
    if not np.isfinite(array).all() or np.abs(array).max() >= 2**31:
        raise TaskError(f"{name} has a coordinate that is not a finite 32-bit number", where)
    return array.astype(np.int32)


def _ring(value: object, name: str, where: str) -> np.ndarray:
    ring = _coords(value, name, where)
    # SDK 6.74 pads a ring of 1-2 points by repeating its last point; the fill then draws the
    # degenerate segment, and shapely accepts the ring.
    if len(ring) < 3:
        ring = np.concatenate([ring, np.repeat(ring[-1:], 3 - len(ring), axis=0)])
    return ring


def _parse_polygon(points: dict, prefix: str, where: str) -> Polygon:
    exterior = _ring(points.get("exterior"), f"{prefix}.exterior", where)
    interior = points.get("interior", [])
    if not isinstance(interior, list):
        raise TaskError(f"{prefix}.interior must be a list of rings", where)
    holes = tuple(_ring(ring, f"{prefix}.interior[{k}]", where) for k, ring in enumerate(interior))
    return Polygon(exterior, holes)


def _clip_box(
    left: int, top: int, right: int, bottom: int, height: int, width: int
) -> tuple[int, int, int, int] | None:
    """Inclusive box intersected with the image, or None when nothing of it is inside."""
    left, top, right, bottom = max(left, 0), max(top, 0), min(right, width - 1), min(bottom, height - 1)
    return None if left > right or top > bottom else (left, top, right, bottom)


def true_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), inclusive, of the true pixels; None when there is none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not rows.size:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def _tight_bitmap(mask: np.ndarray, origin: tuple[int, int]) -> Bitmap:
    top, bottom, left, right = true_box(mask)
    if (top, left) == (0, 0) and (bottom, right) == (mask.shape[0] - 1, mask.shape[1] - 1):
        return Bitmap((int(origin[0]), int(origin[1])), mask)
    return Bitmap((int(origin[0]) + left, int(origin[1]) + top), mask[top:bottom + 1, left:right + 1])


def _clip_polygon(polygon: Polygon, height: int, width: int) -> list[Polygon]:
    """The SDK's crop of a polygon crossing the border: in (row, col) space, buffer(0), intersect with
    the image polygon, one Polygon per part, coordinates rounded half to even (Python round)."""
    window = ShapelyPolygon([(0, 0), (0, width - 1), (height - 1, width - 1), (height - 1, 0)])
    try:
        shape = ShapelyPolygon(polygon.exterior[:, ::-1], holes=[h[:, ::-1] for h in polygon.interiors])
        clipped = shape.buffer(0).intersection(window)
    except (shapely.errors.ShapelyError, ValueError) as exc:
        log.warning(f"a polygon could not be cropped to the image and is dropped: {exc}")
        return []
    pieces = []
    for part in _polygon_parts(clipped):
        exterior = _open_ring(part.exterior.coords)
        if len(exterior) < 3:
            continue
        holes = tuple(ring for ring in (_open_ring(h.coords) for h in part.interiors) if len(ring) > 2)
        pieces.append(Polygon(exterior, holes))
    return pieces


def _polygon_parts(geom: shapely.Geometry) -> list[ShapelyPolygon]:
    """Non-empty polygons of an intersection result; its lines and points are dropped, as by the SDK."""
    if isinstance(geom, ShapelyPolygon):
        return [] if geom.is_empty else [geom]
    if hasattr(geom, "geoms"):
        return [part for sub in geom.geoms for part in _polygon_parts(sub)]
    return []


def _open_ring(coords: object) -> np.ndarray:
    """(row, col) ring from shapely -> (N, 2) int32 [x, y] without the closing duplicate vertex."""
    ring = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if len(ring) >= 2 and (ring[0] == ring[-1]).all():
        ring = ring[:-1]
    # np.rint rounds halves to even, like Python's round in the SDK.
    return np.rint(ring[:, ::-1]).astype(np.int32)


def _fill_polygon(mask: np.ndarray, polygon: Polygon, value: int) -> None:
    """Same pixels as the SDK's cv2.fillPoly of the exterior with 1 on a blank canvas, then of all holes
    in one call with 0, then painting the canvas's 1s: pixels in the exterior and not in a hole (but for
    holes reaching far beyond the image, _hole_in_image)."""
    # The exterior is painted straight into the mask; then the holes give back what lay under them,
    # on a canvas over the holes' bbox only (holes are usually small). That canvas is pixel-identical
    # to a full-size one: a hole edge only leaves it where it also leaves the mask, so OpenCV clips
    # every edge at the same line.
    height, width = mask.shape
    holes = [ring for hole in polygon.interiors for ring in _hole_in_image(hole, height, width)]
    box = None
    if holes:
        rings = np.concatenate(holes)
        (x0, y0), (x1, y1) = rings.min(0), rings.max(0)
        box = _clip_box(int(x0), int(y0), int(x1), int(y1), height, width)
    if box is None:
        cv2.fillPoly(mask, [polygon.exterior], value)
        return
    left, top, right, bottom = box
    window = mask[top:bottom + 1, left:right + 1]
    before = window.copy()
    cv2.fillPoly(mask, [polygon.exterior], value)
    canvas = np.zeros(window.shape, np.uint8)
    cv2.fillPoly(canvas, holes, 1, offset=(-left, -top))
    np.copyto(window, before, where=canvas.view(bool))


def _hole_in_image(ring: np.ndarray, height: int, width: int) -> list[np.ndarray]:
    """A hole as drawn: itself, unless it reaches more than _FAR pixels beyond the image: then its parts
    cropped to the image.

    Holes are drawn uncropped, as the SDK draws them, because the exterior lies in the image
    (crop_to_image); a hole that leaves it changes no pixel outside the exterior. But OpenCV's fill
    takes time in proportion to how far above the image a ring starts (15 s from y = -2^31), so a few
    bytes of JSON per object would stall the rasterization.
    """
    (x0, y0), (x1, y1) = ring.min(0), ring.max(0)
    if x0 >= -_FAR and y0 >= -_FAR and x1 < width + _FAR and y1 < height + _FAR:
        return [ring]
    return [part.exterior for part in _clip_polygon(Polygon(ring), height, width)]
