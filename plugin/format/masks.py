"""Annotation -> class-index mask (uint8: background 0, classes 1..N, neutral 255), and the `masks` command."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from isal import isal_zlib

from plugin.errors import TaskError
from plugin.files import refuse_symlink, write_file, write_json
from plugin.format.classes import ClassMapping, create_mapping
from plugin.format.geometry import draw
from plugin.format.images import PNG_SIGNATURE, read_image_size
from plugin.format.project import (
    Annotation,
    Item,
    ProjectMeta,
    check_image_size,
    find_project,
    list_items,
    read_annotation,
    read_meta,
)
from plugin.parallel import Failure, ordered_map, resolve_workers

# Below OUT: the masks of a run until every one is written.
STAGING = ".partial"


def rasterize(ann: Annotation, mapping: ClassMapping) -> np.ndarray:
    """uint8 (H, W) of the annotation's size; objects are drawn in JSON order, a later one overwrites."""
    return draw_labels(ann, mapping.index_of)


def draw_labels(
    ann: Annotation, index_of: Callable[[str], int | None], mask: np.ndarray | None = None
) -> np.ndarray:
    """uint8 (H, W) of the annotation's size, 0 where nothing is drawn; each label is drawn in JSON order
    with index_of(its class title), and skipped where that is None. `mask`: a zeroed (H, W) array to
    draw into (it may be a view) instead of a new one."""
    mask = np.zeros((ann.height, ann.width), np.uint8) if mask is None else mask
    for label in ann.labels:
        idx = index_of(label.class_title)
        if idx is not None:
            draw(mask, label.geometry, idx)
    return mask


def write_masks(project_dir: Path, out_dir: Path, background: str, neutral: str, workers: int | None = None) -> int:
    """OUT/<dataset>/<image file name>.png for every image, plus OUT/class_title_to_idx.json (neutral
    included); returns the number of masks written. project_dir may also be a folder holding one project.
    Each annotation is checked against its image's size, as training checks it; nothing is written
    through a symbolic link (OUT, its dataset folders and files). `workers` processes share the
    images (None: one per available core); the first failing image, in item order, raises.

    The masks are drawn into OUT/.partial/ and moved into place only when every one is written, so a
    failed run adds no mask (workers run ahead of the failing image) and leaves OUT's files as they were.
    """
    project_dir, out_dir = find_project(Path(project_dir)), Path(out_dir)
    staging = out_dir / STAGING
    for path in (out_dir, staging):
        refuse_symlink(path)
    meta = read_meta(project_dir)
    mapping = create_mapping(meta, background, neutral)
    items = list_items(project_dir)
    shutil.rmtree(staging, ignore_errors=True)
    job = partial(_write_mask, meta=meta, mapping=mapping, out_dir=staging)
    try:
        for failure in ordered_map(job, items, resolve_workers(workers, len(items))):
            if failure is not None:
                raise failure.error()
        targets = [(staging / item.dataset / f"{item.name}.png", out_dir / item.dataset / f"{item.name}.png")
                   for item in items]
        for dataset in sorted({item.dataset for item in items}):
            refuse_symlink(out_dir / dataset)
        for _, target in targets:
            refuse_symlink(target)
        for source, target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_json(out_dir / "class_title_to_idx.json", mapping.with_neutral())
    return len(items)


def _write_mask(item: Item, meta: ProjectMeta, mapping: ClassMapping, out_dir: Path) -> Failure | None:
    try:
        ann = read_annotation(item.ann_path, meta)
        check_image_size(item, ann, *read_image_size(item.image_path))
        # Drawn straight into the PNG's scanlines: column 0 is each row's filter byte (0, none).
        scanlines = np.zeros((ann.height, ann.width + 1), np.uint8)
        draw_labels(ann, mapping.index_of, scanlines[:, 1:])
        write_file(out_dir / item.dataset / f"{item.name}.png", encode_png(scanlines))
    except TaskError as exc:
        return Failure.of(exc)
    return None


def encode_png(scanlines: np.ndarray) -> bytes:
    """8-bit grayscale PNG of scanlines[:, 1:]; scanlines[:, 0] holds each row's filter type.

    Unfiltered rows deflated by ISA-L at level 1: a class mask is long runs of one value, which row
    filters only blur, and ISA-L deflates them about 8x faster than zlib at its fastest level (the
    file is about as small). OpenCV offers neither, and PNG encoding was half of the command's time.
    """
    height, width = scanlines.shape[0], scanlines.shape[1] - 1
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # depth 8, grayscale, no interlace
    data = isal_zlib.compress(np.ascontiguousarray(scanlines), 1)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
