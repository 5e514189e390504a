"""Applying a mode to images, for the inference task and the model server alike: the output classes
a mode adds (plan_output), how it batches images (batching) and its predictions (predict).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from plugin.config.typed import MATCH_ALL, Mode
from plugin.errors import TaskError
from plugin.format.classes import BACKGROUND_COLOR
from plugin.format.project import ProjectMeta
from plugin.inference import modes
from plugin.inference.items import OutputPlan, ReadItem
from plugin.inference.predictor import Predictor


def plan_output(mode: Mode, predictor: Predictor, meta: ProjectMeta) -> OutputPlan:
    """Output class titles and meta entries; errors for unknown classes and for title clashes."""
    save, suffix = mode.save_classes, mode.class_suffix
    if save != MATCH_ALL:
        unknown = [t for t in save if t not in predictor.class_titles]
        if unknown:
            raise TaskError(
                f"the model has no class {', '.join(map(repr, unknown))}; its classes are "
                f"{', '.join(map(repr, predictor.class_titles))}",
                where="mode.model_classes.save_classes",
            )
    # Index 0 is background by construction of the class mapping, in legacy checkpoints too.
    titles = {
        idx: f"{title}{suffix}"
        for idx, title in enumerate(predictor.class_titles)
        if idx != 0 and (save == MATCH_ALL or title in save)
    }
    colors = {idx: predictor.color_of(predictor.class_titles[idx]) for idx in titles}
    new_classes = [_meta_class(out, "bitmap", colors[idx]) for idx, out in titles.items()]
    sources = _bbox_sources(mode, meta) if mode.name == "bboxes" else []
    box_suffix = mode.box_suffix if mode.name == "bboxes" and mode.save else None
    box_class = mode.class_name if mode.name != "bboxes" and mode.save else None
    if box_suffix is not None:
        new_classes += [_meta_class(f"{t}{box_suffix}", "rectangle", meta.class_by_title(t).color) for t in sources]
    if box_class is not None:
        new_classes.append(_meta_class(box_class, "rectangle", BACKGROUND_COLOR))
    _refuse_clashes(new_classes, meta)
    return OutputPlan(titles, tuple(new_classes), colors, save_probabilities=mode.save_probabilities,
                      box_class=box_class, box_suffix=box_suffix, bbox_sources=frozenset(sources))


def _refuse_clashes(new_classes: list[dict], meta: ProjectMeta) -> None:
    existing = {c.title for c in meta.classes}
    seen: set[str] = set()
    for entry in new_classes:
        if entry["title"] in existing or entry["title"] in seen:
            raise TaskError(
                f"the output class {entry['title']!r} already exists in the input project; choose another "
                "add_suffix (or class_name) so predictions do not mix with the project's own objects",
                where="mode.model_classes.add_suffix" if entry["shape"] == "bitmap" else "mode",
            )
        seen.add(entry["title"])


def _meta_class(title: str, shape: str, color: str) -> dict:
    return {"title": title, "shape": shape, "color": color, "geometry_config": {}}


def _bbox_sources(mode: Mode, meta: ProjectMeta) -> list[str]:
    wanted = mode.from_classes
    if wanted == MATCH_ALL:
        return [c.title for c in meta.classes]
    unknown = [t for t in wanted if meta.class_by_title(t) is None]
    if unknown:
        raise TaskError(
            f"the project has no class {', '.join(map(repr, unknown))}", where="mode.from_classes"
        )
    return list(wanted)


def batching(mode: Mode, predictor: Predictor) -> tuple[int, Callable[[Path | bytes], torch.Tensor] | None]:
    """(images per forward, what the reader threads prepare of each image). full_image of a
    resize-trained model batches mode.batch_size images, resized and normalised by the readers so that
    the device's thread only stacks them; for a crop-trained model batch_size counts windows, and every
    other mode predicts one image at a time."""
    if mode.name == "full_image" and not predictor.scale.crops:
        return mode.batch_size, predictor.network_input_of
    return 1, None


def predict(mode: Mode, predictor: Predictor, batch: list[ReadItem]) -> list[modes.Prediction]:
    """The mode's predictions for a batch of images (one image unless `batching` says more);
    a sliding_window mode has its window resolved (window_plan)."""
    if mode.name == "full_image":
        inputs = [read.inputs for read in batch] if all(read.inputs is not None for read in batch) else None
        return modes.full_images(predictor, [read.image for read in batch], mode.batch_size, inputs,
                                 [read.size for read in batch])
    return [_predict_one(mode, predictor, read) for read in batch]


def _predict_one(mode: Mode, predictor: Predictor, read: ReadItem) -> modes.Prediction:
    if mode.name == "roi":
        return modes.roi(predictor, read.image, mode.bounds)
    if mode.name == "bboxes":
        return modes.bboxes(predictor, read.image, read.labels, mode.padding)
    return modes.sliding_window(predictor, read.image, mode.window, mode.min_overlap, mode.batch_size)
