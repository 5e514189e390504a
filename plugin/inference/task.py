"""The inference task: task dir -> config -> model -> mode -> predictions -> output project in results/.

The output project is built in tmp/ and renamed into results/<input project name>/ only when every
image is done, so a failed run never leaves a project that looks complete.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from plugin import agent_log
from plugin.config.load import read_inference_config
from plugin.config.typed import InferenceConfig
from plugin.errors import TaskError
from plugin.files import refuse_symlink, write_json
from plugin.format.images import set_max_image_pixels
from plugin.format.project import find_project, list_items, read_meta
from plugin.inference import modes
from plugin.inference.apply import batching, plan_output, predict
from plugin.inference.items import Unreadable, read_item, write_item
from plugin.inference.pipeline import run_pipeline
from plugin.inference.predictor import Predictor, load_predictor
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
    log_path = task.inference_log_path
    # Everything is written below results/ and tmp/; a symbolic link on the way would send it elsewhere.
    for path in (task.results_dir, task.tmp_dir, log_path):
        refuse_symlink(path)
    agent_log.add_log_file(log_path)
    config = read_inference_config(task.config_path)
    set_max_image_pixels(config.max_image_pixels)
    project_dir = find_project(task.data_dir)
    staging = task.output_staging_dir(project_dir.name)
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
    write_json(staging / "meta.json", {**meta.raw, "classes": [*meta.raw.get("classes", []), *plan.new_classes]})
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
