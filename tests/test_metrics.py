from __future__ import annotations

import pytest
import torch

from plugin.nn.metrics import confusion_matrix, summarize

IGNORE = 255


def test_confusion_matrix_hand_computed() -> None:
    target = torch.tensor([[[0, 0, 1], [1, 2, IGNORE]]])
    pred = torch.tensor([[[0, 1, 1], [0, 2, 2]]])
    cm = confusion_matrix(pred, target, 3, IGNORE)
    # rows = target, columns = prediction; the neutral pixel is not counted
    assert cm.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert cm.dtype == torch.int64


def test_confusion_matrices_add_up_over_batches() -> None:
    torch.manual_seed(0)
    pred = torch.randint(0, 4, (6, 8, 8))
    target = torch.randint(0, 4, (6, 8, 8))
    target[target == 3] = IGNORE
    whole = confusion_matrix(pred, target, 4, IGNORE)
    parts = confusion_matrix(pred[:2], target[:2], 4, IGNORE) + confusion_matrix(pred[2:], target[2:], 4, IGNORE)
    assert torch.equal(whole, parts)
    assert whole.sum().item() == int((target != IGNORE).sum())


def test_target_outside_the_classes_is_an_error() -> None:
    with pytest.raises(ValueError, match="outside 0..1"):
        confusion_matrix(torch.tensor([[0, 1]]), torch.tensor([[0, 2]]), 2, IGNORE)


def test_summarize_multiclass_with_an_absent_class() -> None:
    cm = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    m = summarize(cm, ["bg", "a", "b", "c"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["iou/bg"] == pytest.approx(1 / 3)
    assert m["iou/a"] == pytest.approx(1 / 3)
    assert m["iou/b"] == pytest.approx(1.0)
    assert m["iou/c"] is None and m["dice/c"] is None
    assert m["mean_iou"] == pytest.approx(5 / 9)
    assert (m["dice/bg"], m["dice/a"], m["dice/b"]) == pytest.approx((0.5, 0.5, 1.0))
    assert m["dice"] == pytest.approx(2 / 3)
    assert set(m) == {"accuracy", "mean_iou", "dice"} | {f"{k}/{t}" for k in ("iou", "dice") for t in "bg a b c".split()}


def test_class_only_in_predictions_scores_zero_not_none() -> None:
    m = summarize(torch.tensor([[3, 1], [0, 0]]), ["bg", "fg"])
    assert m["iou/fg"] == 0.0 and m["dice"] == 0.0
    assert m["mean_iou"] == pytest.approx((3 / 4 + 0.0) / 2)


def test_summarize_binary() -> None:
    m = summarize(torch.tensor([[5, 1], [2, 2]]), ["bg", "fg"])
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["iou/fg"] == pytest.approx(2 / 5)
    assert m["iou/bg"] == pytest.approx(5 / 8)
    assert m["mean_iou"] == pytest.approx((5 / 8 + 2 / 5) / 2)
    assert m["dice"] == pytest.approx(4 / 7)  # foreground only, as the legacy binary metric


def test_summarize_binary_without_foreground_anywhere() -> None:
    m = summarize(torch.tensor([[4, 0], [0, 0]]), ["bg", "fg"])
    assert m["dice"] is None and m["iou/fg"] is None
    assert m["mean_iou"] == 1.0 and m["accuracy"] == 1.0


def test_summarize_empty_matrix() -> None:
    m = summarize(torch.zeros(2, 2, dtype=torch.int64), ["bg", "fg"])
    assert m["accuracy"] is None and m["mean_iou"] is None and m["dice"] is None


def test_summarize_end_to_end_from_predictions() -> None:
    target = torch.tensor([[[0, 1], [1, IGNORE]]])
    pred = torch.tensor([[[0, 1], [0, 1]]])
    m = summarize(confusion_matrix(pred, target, 2, IGNORE), ["bg", "fg"])
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["dice"] == pytest.approx(2 / 3)


def test_titles_must_fit_the_matrix() -> None:
    with pytest.raises(ValueError, match="does not fit 3 class titles"):
        summarize(torch.zeros(2, 2, dtype=torch.int64), ["a", "b", "c"])
