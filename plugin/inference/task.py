"""The inference task: task dir -> config -> model -> mode -> predictions -> output project in results/.

The output project is built in tmp/ and renamed into results/<input project name>/ only when every
image is done, so a failed run never leaves a project that looks complete.
"""

from __future__ import annotations

import base64
import io
import logging
import shutil
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from plugin import agent_log
from plugin.config import read_inference_config
from plugin.errors import TaskError
from plugin.format.classes import BACKGROUND_COLOR
from plugin.format.geometry import Bitmap, Rectangle, bitmap_to_json
from plugin.format.images import read_image, set_max_image_pixels
from plugin.format.project import (
    Item,
    ProjectMeta,
    check_image_size,
    find_project,
    link_or_copy,
    list_items,
    parse_annotation,
    read_meta,
)
from plugin.inference import modes
from plugin.inference.predictor import Predictor, load_predictor
from plugin.jsonfile import read_json, refuse_symlink, write_json
from plugin.settings import MATCH_ALL, Mode
from plugin.task_dir import TaskDir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputPlan:
    """What goes into the output project besides the input's own objects."""

    titles: dict[int, str]  # model index -> "<class><suffix>", for the saved classes only (never background)
    new_classes: list[dict]  # meta.json entries added to the input meta
    box_class: str | None = None  # roi / sliding_window with save: the class of the saved boxes
    box_suffix: str | None = None  # bboxes with save: a box is saved as "<source class><box_suffix>"
    bbox_sources: frozenset[str] = frozenset()  # bboxes: the input classes whose boxes are predicted


@dataclass
class InferSummary:
    output_dir: Path
    images: int
    skipped: int
    objects: int


def infer_task(task: TaskDir) -> InferSummary:
    """Run the whole inference task of a task dir; raises TaskError on bad input."""
    log_path = task.tmp_dir / "inference_log.jsonl"
    # Everything is written below results/ and tmp/; a symbolic link on the way would send it elsewhere.
    for path in (task.results_dir, task.tmp_dir, log_path):
        refuse_symlink(path)
    agent_log.add_log_file(log_path)
    config = read_inference_config(task.config_path)
    set_max_image_pixels(config.max_image_pixels)
    project_dir = find_project(task.data_dir)
    staging = task.tmp_dir / f"{project_dir.name}.partial"
    output = task.results_dir / project_dir.name
    # Checked before the model loads, so that a bad output path fails at once.
    for path in (staging, output):
        refuse_symlink(path)
    mode = config.mode
    predictor = load_predictor(task.model_dir, config.gpu_device, mode.tta)
    if mode.name == "sliding_window":
        # Resolved once, so that a window at the wrong scale is warned about once, not per image.
        window, overlap = modes.window_plan(predictor, mode.window, mode.min_overlap)
        mode = replace(mode, window=window, min_overlap=overlap)
    meta = read_meta(project_dir)
    plan = plan_output(mode, predictor, meta)
    items = list_items(project_dir)

    shutil.rmtree(staging, ignore_errors=True)
    write_json(staging / "meta.json", {**meta.raw, "classes": list(meta.raw.get("classes", [])) + plan.new_classes})
    allowed, skipped, objects = config.allow_corrupted_images, 0, 0
    progress = agent_log.Progress("Model applying: ", len(items))
    for item in items:
        try:
            image = read_image(item.image_path)
        except TaskError as exc:
            skipped += 1
            if skipped > allowed:
                raise TaskError(f"{exc.message} (allow_corrupted_images is {allowed})", where=exc.where) from exc
            log.warning(f"skipping an unreadable image ({skipped} of {allowed} allowed): {exc}", extra={"file": str(item.image_path)})
            progress.tick()
            continue
        objects += apply_to_item(item, image, predictor, mode, meta, plan, staging)
        progress.tick()

    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists():
        shutil.rmtree(output)
    shutil.move(str(staging), output)
    agent_log.log_model_applied()
    return InferSummary(output, len(items) - skipped, skipped, objects)


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
    new_classes = [_meta_class(out, "bitmap", predictor.color_of(predictor.class_titles[idx])) for idx, out in titles.items()]
    plan = OutputPlan(titles, new_classes)
    if mode.name == "bboxes":
        sources = _bbox_sources(mode, meta)
        plan = replace(plan, bbox_sources=frozenset(sources))
        if mode.save:
            plan = replace(plan, box_suffix=mode.box_suffix)
            new_classes += [
                _meta_class(f"{t}{mode.box_suffix}", "rectangle", meta.class_by_title(t).color) for t in sources
            ]
    elif mode.save:
        plan = replace(plan, box_class=mode.class_name)
        new_classes.append(_meta_class(mode.class_name, "rectangle", BACKGROUND_COLOR))

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
    return plan


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


def predict(mode: Mode, predictor: Predictor, image: np.ndarray, labels: list) -> modes.Prediction:
    """The mode's prediction for one image; a sliding_window mode has its window resolved (window_plan)."""
    if mode.name == "full_image":
        return modes.full_image(predictor, image)
    if mode.name == "roi":
        return modes.roi(predictor, image, mode.bounds)
    if mode.name == "bboxes":
        return modes.bboxes(predictor, image, labels, mode.padding)
    return modes.sliding_window(predictor, image, mode.window, mode.min_overlap, mode.batch_size)


def apply_to_item(
    item: Item, image: np.ndarray, predictor: Predictor, mode: Mode, meta: ProjectMeta, plan: OutputPlan, out_dir: Path
) -> int:
    """Predict one image, write its annotation (original objects + predictions) and link the image."""
    doc = read_json(item.ann_path)
    ann = parse_annotation(doc, meta, item.ann_path)
    check_image_size(item, ann, *image.shape[:2])
    labels = [label for label in ann.labels if label.class_title in plan.bbox_sources]
    prediction = predict(mode, predictor, image, labels)

    new_objects = [*_box_objects(plan, prediction), *_class_objects(prediction, plan)]
    out_doc = {**doc, "objects": list(doc.get("objects", [])) + new_objects}
    if mode.save_probabilities:
        big_data = doc.get("customBigData") or {}
        if not isinstance(big_data, dict):
            raise TaskError("'customBigData' must be a JSON object to add the probabilities to", where=item.ann_path)
        out_doc["customBigData"] = {**big_data, **_probabilities(prediction, plan, predictor)}
    write_json(out_dir / item.dataset / "ann" / f"{item.name}.json", out_doc)
    link_or_copy(item.image_path, out_dir / item.dataset / "img" / item.name)
    return len(new_objects)


def _class_objects(prediction: modes.Prediction, plan: OutputPlan) -> list[dict]:
    class_map = prediction.class_map()
    objects = []
    for idx, title in plan.titles.items():
        mask = class_map == idx
        if mask.any():
            objects.append({"classTitle": title, "description": "", "tags": [], **bitmap_to_json(Bitmap((0, 0), mask))})
    return objects


def _box_objects(plan: OutputPlan, prediction: modes.Prediction) -> list[dict]:
    if plan.box_suffix is not None:
        titles = [f"{source}{plan.box_suffix}" for source in prediction.box_sources]
    elif plan.box_class is not None:
        titles = [plan.box_class] * len(prediction.boxes)
    else:
        return []
    return [_rectangle(title, box) for title, box in zip(titles, prediction.boxes)]


def _rectangle(title: str, box: Rectangle) -> dict:
    return {
        "classTitle": title, "description": "", "tags": [], "shape": "rectangle", "geometryType": "rectangle",
        "points": {"exterior": [[box.left, box.top], [box.right, box.bottom]], "interior": []},
    }


def _probabilities(prediction: modes.Prediction, plan: OutputPlan, predictor: Predictor) -> dict:
    """customBigData as SDK >= mid-2020 writes it: one float32 H x W x 1 map per saved class."""
    classes, labels = [], []
    for idx, title in plan.titles.items():
        probs = prediction.probs[idx]
        if prediction.covered is not None:
            probs = np.where(prediction.covered, probs, 0)
        buffer = io.BytesIO()
        np.save(buffer, probs.astype(np.float32)[:, :, None])
        data = base64.b64encode(zlib.compress(buffer.getvalue())).decode("ascii")
        classes.append({"title": title, "shape": "multichannelBitmap", "color": predictor.color_of(predictor.class_titles[idx])})
        labels.append({
            "classTitle": title, "description": "", "tags": [], "geometryType": "multichannelBitmap",
            "multichannelBitmap": {"origin": [0, 0], "data": data},
        })
    return {"probabilityClasses": classes, "probabilityLabels": labels}
