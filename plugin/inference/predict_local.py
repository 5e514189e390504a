"""`sly-unet predict INPUT --model DIR`: the Supervisely SDK's one-shot `predict` verb, in this process.

INPUT is a Supervisely project (a folder with meta.json), a folder of images, or image files. The
result is a Supervisely project in --output: for a project, that project with the predictions added,
as `sly-unet infer` writes it; for images, a project `predictions` with one dataset (the folder's
name, or `images`) whose annotations hold the predicted objects. Images are read and predicted
by the inference task's own pipeline (inference/task.infer_project).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from plugin.config.load import mode_config
from plugin.errors import TaskError
from plugin.files import refuse_symlink, write_json
from plugin.format.images import read_image_size
from plugin.format.project import IMAGE_EXTENSIONS, link_or_copy
from plugin.inference.predictor import load_predictor
from plugin.inference.task import InferSummary, infer_project


def predict_local(inputs: list[Path], model_dir: Path, output: Path, mode: object, device: int | None,
                  backend: str, amp: str = "auto") -> InferSummary:
    """Predict INPUT (see the module) with the model in model_dir and write the project to `output`;
    TaskError naming the input, the mode key or the model file at fault."""
    config = mode_config(mode, where="--mode")
    refuse_symlink(output)
    staging = output.parent / f".{output.name}.partial"
    refuse_symlink(staging)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Beside the output, so that the images are linked, not copied, on their way into it.
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.input-", dir=output.parent) as tmp:
        project = _input_project(inputs, Path(tmp))
        predictor = load_predictor(model_dir, device, config.mode.tta, amp, backend)
        try:
            return infer_project(project, predictor, config, staging, output)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _input_project(inputs: list[Path], tmp: Path) -> Path:
    """The project to predict: INPUT itself when it is one, else one built in `tmp` around the images."""
    if len(inputs) == 1 and (inputs[0] / "meta.json").is_file():
        return inputs[0]
    images: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise TaskError(f"no image ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the folder, and no "
                                "meta.json of a Supervisely project", where=path)
            images += found
        elif path.is_file():
            images.append(path)
        else:
            raise TaskError("no such file or folder", where=path)
    names = [p.name for p in images]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TaskError(f"two inputs share the file name {twice[0]!r}; the output project needs one per image",
                        where=images[names.index(twice[0])])
    dataset = inputs[0].name if len(inputs) == 1 and inputs[0].is_dir() else "images"
    project = tmp / "predictions"
    write_json(project / "meta.json", {"classes": [], "tags": []})
    for image in images:
        height, width = read_image_size(image)
        link_or_copy(image, project / dataset / "img" / image.name)
        write_json(project / dataset / "ann" / f"{image.name}.json",
                   {"description": "", "size": {"height": height, "width": width}, "tags": [], "objects": []})
    return project
