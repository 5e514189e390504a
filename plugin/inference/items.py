"""One image of the project through inference: read and checked before its prediction, written after it.

`read_item` runs in the inference pipeline's decoder threads and `write_item` in its writer threads
(inference/pipeline.py), so neither touches the model; each raises TaskError naming the file at fault.
`predicted_annotation` is what both write_item and the model server (inference/serve.py) make of a
prediction.
"""

from __future__ import annotations

import base64
import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from plugin.errors import TaskError
from plugin.files import read_json, write_json
from plugin.format.geometry import Bitmap, Rectangle, bitmap_to_json, true_box
from plugin.format.images import read_image, read_image_size
from plugin.format.project import Item, Label, ProjectMeta, check_image_size, link_or_copy, parse_annotation
from plugin.inference import modes


@dataclass(frozen=True)
class OutputPlan:
    """What goes into the output project besides the input's own objects."""

    titles: dict[int, str]  # model index -> "<class><suffix>", for the saved classes only (never background)
    new_classes: tuple[dict, ...]  # meta.json entries added to the input meta
    colors: dict[int, str]  # model index -> colour, for the saved classes
    save_probabilities: bool = False
    box_class: str | None = None  # roi / sliding_window with save: the class of the saved boxes
    box_suffix: str | None = None  # bboxes with save: a box is saved as "<source class><box_suffix>"
    bbox_sources: frozenset[str] = frozenset()  # bboxes: the input classes whose boxes are predicted
    confidence: bool = False  # the server's option: each class object carries CONFIDENCE_KEY


@dataclass(frozen=True)
class ReadItem:
    """An image ready to predict, with its annotation document and the labels the mode predicts from."""

    item: Item | None  # None for an image sent to the model server
    image: np.ndarray | None  # None when the reader made `inputs` from the file instead
    size: tuple[int, int]  # (height, width) of the image as decoded
    doc: dict
    labels: list[Label]  # bboxes: the labels of plan.bbox_sources; else empty
    inputs: torch.Tensor | None = None  # the image's network input, when the reader prepares it


@dataclass(frozen=True)
class Unreadable:
    """An image that could not be decoded: skipped or fatal, as allow_corrupted_images says."""

    item: Item
    error: TaskError


def read_item(
    item: Item, meta: ProjectMeta, plan: OutputPlan, prepare: Callable[[Path | bytes], torch.Tensor] | None = None
) -> ReadItem | Unreadable:
    """Decode an item's image and check its annotation against it; an undecodable image is returned
    as Unreadable, any other problem raises. `prepare` makes the image's network input from its file
    here, in the reader thread, rather than on the device's thread; the full-resolution pixels are
    then not decoded at all (full_image of a resize-trained model needs only their size)."""
    try:
        image, inputs, size = decode(item.image_path, prepare)
    except TaskError as exc:
        return Unreadable(item, exc)
    doc = read_json(item.ann_path)
    ann = parse_annotation(doc, meta, item.ann_path)
    check_image_size(item, ann, *size)
    if plan.save_probabilities and not isinstance(doc.get("customBigData") or {}, dict):
        raise TaskError("'customBigData' must be a JSON object to add the probabilities to", where=item.ann_path)
    labels = [label for label in ann.labels if label.class_title in plan.bbox_sources]
    return ReadItem(item, image, tuple(size), doc, labels, inputs)


# An object's per-pixel confidence (the server's `confidence` option): {"origin": [x, y], "data": base64 PNG}.
CONFIDENCE_KEY = "confidenceMap"


def decode(
    source: Path | bytes, prepare: Callable[[Path | bytes], torch.Tensor] | None
) -> tuple[np.ndarray | None, torch.Tensor | None, tuple[int, int]]:
    """(pixels, network input, (height, width)) of an image file or its bytes, as every inference reads
    it: decoded in full, or with `prepare` only made into its network input (the pixels are then None)."""
    if prepare is None:
        image = read_image(source)
        return image, None, image.shape[:2]
    return None, prepare(source), read_image_size(source)


def write_item(read: ReadItem, prediction: modes.Prediction, plan: OutputPlan, out_dir: Path) -> int:
    """Write an item's annotation (original objects + predictions) and link its image; the objects added."""
    item, doc = read.item, read.doc
    out_doc = predicted_annotation(doc, prediction, plan)
    write_json(out_dir / item.dataset / "ann" / f"{item.name}.json", out_doc)
    link_or_copy(item.image_path, out_dir / item.dataset / "img" / item.name)
    return len(out_doc["objects"]) - len(doc.get("objects", []))


def predicted_annotation(doc: dict, prediction: modes.Prediction, plan: OutputPlan) -> dict:
    """The annotation `doc` with the prediction's objects appended (saved boxes, then one bitmap per
    class present) and, with plan.save_probabilities, its probabilities in customBigData."""
    new_objects = [*_box_objects(plan, prediction), *_class_objects(prediction, plan)]
    out_doc = {**doc, "objects": list(doc.get("objects", [])) + new_objects}
    if plan.save_probabilities:
        out_doc["customBigData"] = {**(doc.get("customBigData") or {}), **_probabilities(prediction, plan)}
    return out_doc


def _class_objects(prediction: modes.Prediction, plan: OutputPlan) -> list[dict]:
    class_map = prediction.class_map()
    # The winning class's probability, as 8 bits: argmax picks the largest, so it is the maximum.
    confidence = np.rint(prediction.probs.max(axis=0) * 255).astype(np.uint8) if plan.confidence else None
    objects = []
    for idx, title in plan.titles.items():
        mask = class_map == idx
        if mask.any():
            obj = {"classTitle": title, "description": "", "tags": [], **bitmap_to_json(Bitmap((0, 0), mask))}
            if confidence is not None:
                obj[CONFIDENCE_KEY] = _confidence_map(confidence, mask)
            objects.append(obj)
    return objects


def _confidence_map(confidence: np.ndarray, mask: np.ndarray) -> dict:
    """The confidence over the object's bitmap (the same box as encode_bitmap crops to), 0 off its pixels."""
    top, bottom, left, right = true_box(mask)
    crop = np.where(mask[top:bottom + 1, left:right + 1], confidence[top:bottom + 1, left:right + 1], 0)
    ok, png = cv2.imencode(".png", crop.astype(np.uint8))
    if not ok:
        raise RuntimeError("OpenCV could not encode a confidence map as PNG")
    return {"origin": [left, top], "data": base64.b64encode(png.tobytes()).decode("ascii")}


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


def _probabilities(prediction: modes.Prediction, plan: OutputPlan) -> dict:
    """customBigData as SDK >= mid-2020 writes it: one float32 H x W x 1 map per saved class."""
    classes, labels = [], []
    for idx, title in plan.titles.items():
        probs = prediction.probs[idx]
        if prediction.covered is not None:
            probs = np.where(prediction.covered, probs, 0)
        buffer = io.BytesIO()
        np.save(buffer, probs.astype(np.float32)[:, :, None])
        data = base64.b64encode(zlib.compress(buffer.getvalue())).decode("ascii")
        classes.append({"title": title, "shape": "multichannelBitmap", "color": plan.colors[idx]})
        labels.append({
            "classTitle": title, "description": "", "tags": [], "geometryType": "multichannelBitmap",
            "multichannelBitmap": {"origin": [0, 0], "data": data},
        })
    return {"probabilityClasses": classes, "probabilityLabels": labels}
