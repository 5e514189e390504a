"""The `evaluate` command: predicted bitmaps of an inference output project against the ground truth.

Both projects go through the training targets' rasterization and class mapping, so the scores measure
exactly what the model was trained to reproduce. Report (JSON, as written by run_evaluate):

    {"gt": str,                    # the ground-truth project directory
     "pred": str,                  # the prediction project directory
     "suffix": str,                # predicted class titles are <gt class title><suffix>
     "images": int,                # ground-truth images evaluated
     "pixel_accuracy": float|None, # correct / counted pixels; None when every pixel is neutral
     "mean_iou": float|None,       # mean IoU over the classes that are not absent (background included)
     "classes": {title: {"iou": float|None, "dice": float|None,
                         "absent": bool,      # in neither the ground truth nor the prediction: iou/dice None
                         "gt_pixels": int,    # ground-truth pixels of the class
                         "pred_pixels": int}},# predicted pixels of the class
     "confusion_matrix": [[int]],  # pixel counts [ground-truth class][predicted class], in the order of "classes"
     "ignored_pred_images": int}   # prediction images with no ground-truth image of the same (dataset, name)

Classes are listed in mask index order (background first, then the other titles sorted); the neutral
class is not one of them. Pixels that are neutral in the ground truth count nowhere: not in the scores,
not in gt_pixels, and not in pred_pixels either.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from plugin.errors import TaskError
from plugin.files import write_json
from plugin.format.classes import NEUTRAL_INDEX, ClassMapping, create_mapping, titles_by_index
from plugin.format.images import read_image_size
from plugin.format.masks import draw_labels, rasterize
from plugin.format.project import check_image_size, find_project, list_items, read_annotation, read_meta
from plugin.nn.metrics import confusion_matrix, summarize
from plugin.plots import write_confusion

log = logging.getLogger(__name__)


def evaluate_projects(
    gt_dir: Path, pred_dir: Path, suffix: str = "_unet", background: str = "bg", neutral: str = "neutral"
) -> dict:
    """The report (see the module docstring) of pred_dir's `<class><suffix>` objects against gt_dir's objects.

    Each directory may be a project or a folder holding one. Images are matched by (dataset, image file
    name); a ground-truth image without its prediction is an error, extra prediction images are counted.
    A ground-truth annotation must give its image's size (read from the header), as training requires.
    """
    gt_project, pred_project = find_project(Path(gt_dir)), find_project(Path(pred_dir))
    gt_meta, pred_meta = read_meta(gt_project), read_meta(pred_project)
    mapping = create_mapping(gt_meta, background, neutral)
    predicted = _predicted_titles(mapping, suffix)
    if not any(pred_meta.class_by_title(title) for title in predicted):
        # A wrong --suffix would otherwise score an all-background prediction without a word.
        expected = ", ".join(repr(t) for t in predicted)
        raise TaskError(
            f"no class of the prediction's meta.json is a ground-truth class with suffix {suffix!r} "
            f"(expected one of {expected}); check --suffix",
            where=pred_project / "meta.json",
        )

    pred_items = {(item.dataset, item.name): item for item in list_items(pred_project)}
    gt_items = list_items(gt_project)
    missing = [item for item in gt_items if (item.dataset, item.name) not in pred_items]
    if missing:
        more = f" (and {len(missing) - 1} more ground-truth images)" if len(missing) > 1 else ""
        raise TaskError(
            f"the prediction has no image {missing[0].dataset}/{missing[0].name}{more}", where=pred_project
        )

    n = mapping.num_classes
    cm = torch.zeros((n, n), dtype=torch.int64)
    for item in gt_items:
        gt_ann = read_annotation(item.ann_path, gt_meta)
        # The ground truth is held to what training checks; the prediction is then held to it.
        check_image_size(item, gt_ann, *read_image_size(item.image_path))
        pred_item = pred_items[(item.dataset, item.name)]
        pred_ann = read_annotation(pred_item.ann_path, pred_meta)
        if (pred_ann.height, pred_ann.width) != (gt_ann.height, gt_ann.width):
            raise TaskError(
                f"the prediction is {pred_ann.height}x{pred_ann.width} (HxW), "
                f"the ground truth {gt_ann.height}x{gt_ann.width}",
                where=pred_item.ann_path,
            )
        target = torch.from_numpy(rasterize(gt_ann, mapping))
        # Only the predicted classes: the input's own objects, which inference copies into its output, stay out.
        pred = torch.from_numpy(draw_labels(pred_ann, predicted.get))
        cm += confusion_matrix(pred[None], target[None], n, NEUTRAL_INDEX)

    ignored = len(pred_items) - len(gt_items)
    if ignored:
        log.warning(
            f"{ignored} prediction images have no ground-truth image and are ignored",
            extra={"ignored_pred_images": ignored, "pred": str(pred_project)},
        )
    titles = titles_by_index(mapping.title_to_idx)
    scores = summarize(cm, titles)
    gt_pixels, pred_pixels = cm.sum(1).tolist(), cm.sum(0).tolist()
    return {
        "gt": str(gt_project),
        "pred": str(pred_project),
        "suffix": suffix,
        "images": len(gt_items),
        "pixel_accuracy": scores["accuracy"],
        "mean_iou": scores["mean_iou"],
        "classes": {
            title: {
                "iou": scores[f"iou/{title}"],
                "dice": scores[f"dice/{title}"],
                "absent": scores[f"iou/{title}"] is None,
                "gt_pixels": gt_pixels[i],
                "pred_pixels": pred_pixels[i],
            }
            for i, title in enumerate(titles)
        },
        "confusion_matrix": cm.tolist(),
        "ignored_pred_images": ignored,
    }


def format_report(report: dict) -> str:
    """A table of the per-class scores, then mean IoU and pixel accuracy."""
    header = ("class", "IoU", "Dice", "GT px", "pred px")
    rows = [
        (
            title,
            *(("absent", "absent") if c["absent"] else (_score(c["iou"]), _score(c["dice"]))),
            str(c["gt_pixels"]),
            str(c["pred_pixels"]),
        )
        for title, c in report["classes"].items()
    ]
    widths = [max(len(row[k]) for row in (header, *rows)) for k in range(len(header))]
    lines = [
        f"{report['images']} images; ground truth {report['gt']}; prediction {report['pred']} "
        f"(classes <title>{report['suffix']})",
        *(
            "  ".join([row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:]))])
            for row in (header, *rows)
        ),
    ]
    counted = sum(not c["absent"] for c in report["classes"].values())
    lines.append(f"mean IoU: {_score(report['mean_iou'])} (over {counted} classes present)")
    lines.append(f"pixel accuracy: {_score(report['pixel_accuracy'])}")
    if report["ignored_pred_images"]:
        lines.append(f"ignored prediction images (no ground truth): {report['ignored_pred_images']}")
    return "\n".join(lines)


def run_evaluate(
    gt_dir: Path, pred_dir: Path, suffix: str, out: Path | None, background: str, neutral: str,
    confusion_png: Path | None = None,
) -> dict:
    """The `sly-unet evaluate` body: print the table to stdout, write the report to `out` and the
    confusion matrix picture to `confusion_png` when given."""
    report = evaluate_projects(Path(gt_dir), Path(pred_dir), suffix, background, neutral)
    print(format_report(report))
    if out is not None:
        write_json(Path(out), report)
    if confusion_png is not None:
        write_confusion(report, Path(confusion_png))
    return report


def _predicted_titles(mapping: ClassMapping, suffix: str) -> dict[str, int]:
    """Prediction class title -> mask index: every ground-truth class (neutral is none) with the suffix."""
    return {f"{title}{suffix}": idx for title, idx in mapping.title_to_idx.items()}


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
