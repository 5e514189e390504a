"""`sly-unet augment-preview`: augmented training samples as the network gets them, with the mask overlaid."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from plugin.errors import TaskError
from plugin.format.classes import BACKGROUND_COLOR, NEUTRAL_INDEX, ClassMapping
from plugin.format.project import ProjectMeta
from plugin.task_dir import TaskDir
from plugin.training.task import create_dataset, read_splits

_ALPHA = 0.5


def write_preview(task: TaskDir, out_dir: Path, n: int) -> list[Path]:
    """N PNGs, each an augmented image beside itself with the mask overlaid.

    PNG i is training sample i % len in epoch i // len, so with N above the number of images each
    image shows up again, augmented as in a later epoch.
    """
    config, meta, mapping, splits = read_splits(task)  # with the scale training resolves
    # Only the images shown need their masks rasterized.
    dataset = create_dataset("train", splits["train"][:n], meta, mapping, config)
    colors = class_colors(meta, mapping)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(n):
        dataset.set_epoch(i // len(dataset))
        index = i % len(dataset)
        image, mask = dataset.sample(index)
        path = out_dir / f"{i:03d}_{Path(dataset.items[index].name).stem}.png"
        panel = np.concatenate([image, overlay(image, mask, colors)], axis=1)
        cv2.imwrite(str(path), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
        written.append(path)
    return written


def class_colors(meta: ProjectMeta, mapping: ClassMapping) -> dict[int, tuple[int, int, int]]:
    """Mask index -> RGB from meta.json; a background class not in meta.json gets the model's background colour."""
    colors = {}
    for title, index in mapping.title_to_idx.items():
        obj_class = meta.class_by_title(title)
        colors[index] = _rgb(obj_class.color if obj_class is not None else BACKGROUND_COLOR, title)
    return colors


def overlay(image: np.ndarray, mask: np.ndarray, colors: dict[int, tuple[int, int, int]]) -> np.ndarray:
    """The image with each class blended in its colour, background left as is, neutral hatched black and white."""
    out = image.astype(np.float32)
    for index, color in colors.items():
        if index == 0:
            continue
        hit = mask == index
        out[hit] = (1 - _ALPHA) * out[hit] + _ALPHA * np.array(color, np.float32)
    # Stripes, not a colour: the neutral class's own colour may be close to another class's, and the
    # pixels that geometric steps bring in from outside the image are neutral too.
    rows, cols = np.indices(mask.shape)
    stripes = np.where((rows + cols) // 4 % 2 == 0, 255.0, 0.0)
    neutral = mask == NEUTRAL_INDEX
    out[neutral] = stripes[neutral][:, None]
    return out.round().astype(np.uint8)


def _rgb(hex_color: str, title: str) -> tuple[int, int, int]:
    value = hex_color.lstrip("#")
    if not re.fullmatch(r"[0-9a-fA-F]{6}", value):
        raise TaskError(f"class {title!r} has the colour {hex_color!r}, not one like '#FF0000'", where="meta.json")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)
