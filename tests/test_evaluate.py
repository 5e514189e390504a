"""Prediction project vs ground-truth project, on real projects written to tmp_path; scores computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from plugin.errors import TaskError
from plugin.format.geometry import encode_bitmap
from plugin.inference.evaluate import evaluate_projects, format_report, run_evaluate

GT_CLASSES = [
    {"title": "a", "shape": "rectangle", "color": "#FF0000"},
    {"title": "b", "shape": "polygon", "color": "#00FF00"},
    {"title": "c", "shape": "rectangle", "color": "#0000FF"},
    {"title": "neutral", "shape": "rectangle", "color": "#FFFFFF"},
]  # indices: bg 0, a 1, b 2, c 3, neutral 255
# An inference output's meta: the input's classes plus the model's, suffixed, as bitmaps.
PRED_CLASSES = GT_CLASSES + [
    {"title": f"{t}_unet", "shape": "bitmap", "color": "#808080"} for t in ("bg", "a", "b", "c")
]


def rect(title: str, left: int, top: int, right: int, bottom: int) -> dict:
    return {"classTitle": title, "tags": [], "points": {"exterior": [[left, top], [right, bottom]], "interior": []}}


def bitmap(title: str, rows: slice, cols: slice, size: int = 10) -> dict:
    mask = np.zeros((size, size), bool)
    mask[rows, cols] = True
    return {"classTitle": title, "tags": [], "geometryType": "bitmap", "bitmap": encode_bitmap(mask)}


def write_project(
    root: Path, classes: list[dict], images: dict[tuple[str, str], list[dict]], size: int = 10
) -> Path:
    """images: (dataset, file name) -> objects; every image is a real size x size PNG."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").write_text(json.dumps({"classes": classes, "tags": []}))
    for (dataset, name), objects in images.items():
        for sub in ("img", "ann"):
            (root / dataset / sub).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / dataset / "img" / name), np.full((size, size, 3), 100, np.uint8))
        ann = {"size": {"height": size, "width": size}, "tags": [], "objects": objects}
        (root / dataset / "ann" / f"{name}.json").write_text(json.dumps(ann))
    return root


def gt_and_pred(tmp_path: Path, gt_objects: list[dict], pred_objects: list[dict]) -> tuple[Path, Path]:
    gt = write_project(tmp_path / "gt", GT_CLASSES, {("ds", "i.png"): gt_objects})
    pred = write_project(tmp_path / "pred", PRED_CLASSES, {("ds", "i.png"): pred_objects})
    return gt, pred


# GT "a": rows/cols 2..5 (16 px). Predicted "a": rows/cols 4..7 (16 px); they share rows/cols 4..5 (4 px).
GT_A = rect("a", 2, 2, 5, 5)
PRED_A = bitmap("a_unet", slice(4, 8), slice(4, 8))


def test_partial_overlap_scores_by_hand(tmp_path: Path) -> None:
    # target a: 4 -> a, 12 -> bg; target bg (84 px): 12 -> a, 72 -> bg.
    gt, pred = gt_and_pred(tmp_path, [GT_A], [PRED_A])
    report = evaluate_projects(gt, pred)
    a, bg = report["classes"]["a"], report["classes"]["bg"]
    assert a["iou"] == pytest.approx(4 / 28)
    assert a["dice"] == pytest.approx(8 / 32)
    assert (a["gt_pixels"], a["pred_pixels"], a["absent"]) == (16, 16, False)
    assert bg["iou"] == pytest.approx(72 / 96)
    assert bg["dice"] == pytest.approx(144 / 168)
    assert (bg["gt_pixels"], bg["pred_pixels"]) == (84, 84)
    assert report["pixel_accuracy"] == pytest.approx(76 / 100)
    assert report["mean_iou"] == pytest.approx((4 / 28 + 72 / 96) / 2)
    assert list(report["classes"]) == ["bg", "a", "b", "c"]
    assert (report["images"], report["ignored_pred_images"], report["suffix"]) == (1, 0, "_unet")
    assert (report["gt"], report["pred"]) == (str(gt), str(pred))


def test_neutral_pixels_are_ignored(tmp_path: Path) -> None:
    # Neutral rows/cols 6..7 (4 px) lie inside the predicted a: those 4 px count nowhere.
    # target a (16): 4 -> a, 12 -> bg; target bg (80): 8 -> a, 72 -> bg.
    gt, pred = gt_and_pred(tmp_path, [GT_A, rect("neutral", 6, 6, 7, 7)], [PRED_A])
    report = evaluate_projects(gt, pred)
    a, bg = report["classes"]["a"], report["classes"]["bg"]
    assert a["iou"] == pytest.approx(4 / 24)
    assert a["dice"] == pytest.approx(8 / 28)
    assert (a["gt_pixels"], a["pred_pixels"]) == (16, 12)
    assert bg["iou"] == pytest.approx(72 / 92)
    assert (bg["gt_pixels"], bg["pred_pixels"]) == (80, 84)
    assert report["pixel_accuracy"] == pytest.approx(76 / 96)
    assert "neutral" not in report["classes"]


def test_absent_class_is_marked_and_not_in_mean_iou(tmp_path: Path) -> None:
    # b is only predicted (IoU 0, counted); c is nowhere (absent, not counted).
    gt, pred = gt_and_pred(tmp_path, [GT_A], [PRED_A, bitmap("b_unet", slice(0, 1), slice(0, 2))])
    report = evaluate_projects(gt, pred)
    b, c = report["classes"]["b"], report["classes"]["c"]
    assert (b["iou"], b["dice"], b["absent"], b["gt_pixels"], b["pred_pixels"]) == (0.0, 0.0, False, 0, 2)
    assert (c["iou"], c["dice"], c["absent"], c["gt_pixels"], c["pred_pixels"]) == (None, None, True, 0, 0)
    # bg: 84 px; 12 -> a, 2 -> b, 70 -> bg; predicted bg = 70 + 12 = 82; IoU = 70 / (84 + 82 - 70).
    bg_iou = 70 / 96
    assert report["classes"]["bg"]["iou"] == pytest.approx(bg_iou)
    assert report["mean_iou"] == pytest.approx((bg_iou + 4 / 28 + 0.0) / 3)


def test_objects_without_the_suffix_are_ignored(tmp_path: Path) -> None:
    # The input's own objects, copied into the inference output, cover the whole image: not predictions.
    gt, pred = gt_and_pred(tmp_path, [GT_A], [rect("a", 0, 0, 9, 9), rect("c", 0, 0, 9, 9)])
    report = evaluate_projects(gt, pred)
    assert report["classes"]["a"] == {"iou": 0.0, "dice": 0.0, "absent": False, "gt_pixels": 16, "pred_pixels": 0}
    assert report["classes"]["c"]["absent"] is True
    assert report["classes"]["bg"]["pred_pixels"] == 100
    assert report["pixel_accuracy"] == pytest.approx(84 / 100)


def test_suffix_option_selects_the_predicted_classes(tmp_path: Path) -> None:
    classes = GT_CLASSES + [{"title": "a_net", "shape": "bitmap", "color": "#808080"}]
    gt = write_project(tmp_path / "gt", GT_CLASSES, {("ds", "i.png"): [GT_A]})
    pred = write_project(tmp_path / "pred", classes, {("ds", "i.png"): [bitmap("a_net", slice(2, 6), slice(2, 6))]})
    report = evaluate_projects(gt, pred, suffix="_net")
    assert report["classes"]["a"]["iou"] == 1.0
    assert report["suffix"] == "_net"


def test_wrong_suffix_is_an_error(tmp_path: Path) -> None:
    gt, pred = gt_and_pred(tmp_path, [GT_A], [PRED_A])
    with pytest.raises(TaskError, match="_model") as exc:
        evaluate_projects(gt, pred, suffix="_model")
    assert exc.value.where == str(pred / "meta.json")


def test_perfect_prediction_scores_one(tmp_path: Path) -> None:
    # Several datasets, every geometry kind, overlaps (JSON order decides) and neutral: the prediction is
    # the ground truth's objects re-titled with the suffix (neutral has no prediction class: ignored).
    def objects(suffix: str) -> list[dict]:
        return [
            rect(f"a{suffix}", 0, 0, 6, 4),
            {"classTitle": f"b{suffix}", "tags": [], "points": {"exterior": [[2, 1], [9, 3], [5, 9]], "interior": []}},
            rect(f"neutral{suffix}", 7, 7, 9, 9),
            bitmap(f"c{suffix}", slice(6, 9), slice(0, 3)),
        ]

    pred_classes = PRED_CLASSES[:4] + [
        {"title": "a_unet", "shape": "rectangle", "color": "#111111"},
        {"title": "b_unet", "shape": "polygon", "color": "#222222"},
        {"title": "c_unet", "shape": "bitmap", "color": "#333333"},
        {"title": "neutral_unet", "shape": "rectangle", "color": "#444444"},
    ]
    gt_classes = GT_CLASSES[:2] + [{"title": "c", "shape": "bitmap", "color": "#0000FF"}, GT_CLASSES[3]]
    images = [("ds1", "x.png"), ("ds1", "y.png"), ("ds2", "x.png")]
    # Each project sits inside a folder, as in a task dir's data/.
    write_project(tmp_path / "gt" / "project", gt_classes, {key: objects("") for key in images})
    write_project(tmp_path / "pred" / "out", pred_classes, {key: objects("_unet") for key in images})
    report = evaluate_projects(tmp_path / "gt", tmp_path / "pred")
    assert report["images"] == 3
    assert report["pixel_accuracy"] == 1.0
    assert report["mean_iou"] == 1.0
    for title in ("bg", "a", "b", "c"):
        scores = report["classes"][title]
        assert (scores["iou"], scores["dice"], scores["absent"]) == (1.0, 1.0, False), title
        assert scores["gt_pixels"] == scores["pred_pixels"] > 0
    assert report["gt"] == str(tmp_path / "gt" / "project")


def test_missing_prediction_image_is_an_error(tmp_path: Path) -> None:
    gt = write_project(tmp_path / "gt", GT_CLASSES, {("ds", "i.png"): [GT_A], ("ds", "j.png"): [GT_A]})
    pred = write_project(tmp_path / "pred", PRED_CLASSES, {("ds", "i.png"): [PRED_A]})
    with pytest.raises(TaskError, match="ds/j.png") as exc:
        evaluate_projects(gt, pred)
    assert exc.value.where == str(pred)


def test_extra_prediction_images_are_ignored_and_counted(tmp_path: Path) -> None:
    gt = write_project(tmp_path / "gt", GT_CLASSES, {("ds", "i.png"): [GT_A]})
    pred = write_project(
        tmp_path / "pred", PRED_CLASSES,
        {("ds", "i.png"): [PRED_A], ("ds", "extra.png"): [PRED_A], ("other", "i.png"): [PRED_A]},
    )
    report = evaluate_projects(gt, pred)
    assert (report["images"], report["ignored_pred_images"]) == (1, 2)
    assert report["classes"]["a"]["pred_pixels"] == 16


def test_size_mismatch_is_an_error(tmp_path: Path) -> None:
    gt = write_project(tmp_path / "gt", GT_CLASSES, {("ds", "i.png"): [GT_A]})
    pred = write_project(tmp_path / "pred", PRED_CLASSES, {("ds", "i.png"): []}, size=12)
    with pytest.raises(TaskError, match="12x12") as exc:
        evaluate_projects(gt, pred)
    assert exc.value.where == str(pred / "ds" / "ann" / "i.png.json")


def test_run_evaluate_prints_the_table_and_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gt, pred = gt_and_pred(tmp_path, [GT_A], [PRED_A])
    out = tmp_path / "reports" / "nested" / "metrics.json"
    report = run_evaluate(gt, pred, "_unet", out, "bg", "neutral")
    assert json.loads(out.read_text()) == report
    assert report == evaluate_projects(gt, pred)
    assert capsys.readouterr().out == format_report(report) + "\n"


def test_run_evaluate_without_out_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gt, pred = gt_and_pred(tmp_path, [GT_A], [PRED_A])
    run_evaluate(gt, pred, "_unet", None, "bg", "neutral")
    assert "mean IoU" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt", "pred"]


def test_format_report_lines(tmp_path: Path) -> None:
    gt, pred = gt_and_pred(tmp_path, [GT_A], [PRED_A])
    lines = format_report(evaluate_projects(gt, pred)).splitlines()
    assert lines[1].split() == ["class", "IoU", "Dice", "GT", "px", "pred", "px"]
    table = {line.split()[0]: line.split()[1:] for line in lines[2:6]}
    assert table == {
        "bg": ["0.7500", "0.8571", "84", "84"],
        "a": ["0.1429", "0.2500", "16", "16"],
        "b": ["absent", "absent", "0", "0"],
        "c": ["absent", "absent", "0", "0"],
    }
    assert lines[6] == f"mean IoU: {(4 / 28 + 0.75) / 2:.4f} (over 2 classes present)"
    assert lines[7] == "pixel accuracy: 0.7600"
