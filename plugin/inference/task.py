"""The inference task: task dir -> config -> model -> mode -> predictions -> output project in results/.

The output project is built in tmp/ and renamed into results/<input project name>/ only when every
image is done, so a failed run never leaves a project that looks complete.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from plugin import agent_log
from plugin.config import read_inference_config
from plugin.errors import TaskError
from plugin.format.classes import BACKGROUND_COLOR
from plugin.format.images import set_max_image_pixels
from plugin.format.project import ProjectMeta, find_project, list_items, read_meta
from plugin.inference import modes
from plugin.inference.items import OutputPlan, ReadItem, Unreadable, read_item, write_item
from plugin.inference.pipeline import run_pipeline
from plugin.inference.predictor import Predictor, load_predictor
from plugin.jsonfile import refuse_symlink, write_json
from plugin.settings import MATCH_ALL, InferenceConfig, Mode
from plugin.task_dir import TaskDir

log = logging.getLogger(__name__)


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
    predictor = load_predictor(task.model_dir, config.gpu_device, config.mode.tta, config.amp, config.backend)
    summary = infer_project(project_dir, predictor, config, staging, output)
    agent_log.log_model_applied()
    return summary


def infer_project(project_dir: Path, predictor: Predictor, config: InferenceConfig, staging: Path,
                  output: Path) -> InferSummary:
    """Predict every image of the project with `config.mode`, building the output project in `staging`
    and moving it to `output` (replacing what was there) once every image is done."""
    mode = config.mode
    if mode.name == "sliding_window":
        # Resolved once, so that a window at the wrong scale is warned about once, not per image.
        window, overlap = modes.window_plan(predictor, mode.window, mode.min_overlap)
        mode = replace(mode, window=window, min_overlap=overlap)
    meta = read_meta(project_dir)
    plan = plan_output(mode, predictor, meta)
    items = list_items(project_dir)

    shutil.rmtree(staging, ignore_errors=True)
    write_json(staging / "meta.json", {**meta.raw, "classes": list(meta.raw.get("classes", [])) + plan.new_classes})
    allowed, skipped = config.allow_corrupted_images, []

    def skip(unreadable: Unreadable) -> None:
        skipped.append(unreadable.item)
        exc = unreadable.error
        if len(skipped) > allowed:
            raise TaskError(f"{exc.message} (allow_corrupted_images is {allowed})", where=exc.where) from exc
        log.warning(
            f"skipping an unreadable image ({len(skipped)} of {allowed} allowed): {exc}",
            extra={"file": str(unreadable.item.image_path)},
        )

    batch_size, prepare = batching(mode, predictor)
    objects = run_pipeline(
        items,
        read=lambda item: read_item(item, meta, plan, prepare),
        predict=lambda batch: predict(mode, predictor, batch),
        write=lambda read, prediction: write_item(read, prediction, plan, staging),
        skip=skip,
        batch_size=batch_size,
        progress=agent_log.Progress("Model applying: ", len(items)),
    )

    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists():
        shutil.rmtree(output)
    shutil.move(str(staging), output)
    return InferSummary(output, len(items) - len(skipped), len(skipped), objects)


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
    plan = OutputPlan(titles, new_classes, colors, mode.save_probabilities)
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
