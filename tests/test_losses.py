from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from plugin.errors import TaskError
from plugin.nn.losses import (
    bce_dice_loss,
    cross_entropy_loss,
    median_frequency_weights,
    multiclass_dice,
    resolve_class_weights,
    segmentation_loss,
)

IGNORE = 255
LN3 = math.log(3.0)


def two_class_logits(fg_logits: list[list[float]]) -> torch.Tensor:
    """(B, 2, 1, W) logits with background logit 0, so p = sigmoid(fg_logit)."""
    fg = torch.tensor(fg_logits, dtype=torch.float32)[:, None, None, :]
    return torch.cat([torch.zeros_like(fg), fg], dim=1).requires_grad_(True)


def test_bce_dice_hand_computed() -> None:
    # p = 0.75, 0.5 on the two counted pixels; the neutral third pixel must not matter.
    logits = two_class_logits([[LN3, 0.0, 50.0]])
    target = torch.tensor([[[1, 0, IGNORE]]])
    bce = -(math.log(0.75) + math.log(0.5)) / 2
    dice = (2 * 0.75 + 1) / (0.75 + 0.5 + 1 + 1)  # 10/13
    got = bce_dice_loss(logits, target, IGNORE, 1.0, 1.0)
    assert got.item() == pytest.approx((bce + (1 - dice)) / 2, rel=1e-6)
    weighted = bce_dice_loss(logits, target, IGNORE, 2.0, 1.0)
    assert weighted.item() == pytest.approx((2 * bce + (1 - dice)) / 3, rel=1e-6)
    assert bce_dice_loss(logits, target, IGNORE, 1.0, 0.0).item() == pytest.approx(bce, rel=1e-6)
    assert bce_dice_loss(logits, target, IGNORE, 0.0, 1.0).item() == pytest.approx(3 / 13, rel=1e-6)


def test_neutral_pixels_carry_no_gradient() -> None:
    logits = two_class_logits([[LN3, 0.0, -50.0]])
    target = torch.tensor([[[1, 0, IGNORE]]])
    bce_dice_loss(logits, target, IGNORE, 1.0, 1.0).backward()
    assert torch.all(logits.grad[..., 2] == 0)
    assert torch.all(logits.grad[..., :2] != 0)


def test_empty_target_and_empty_prediction_is_a_perfect_score() -> None:
    # Legacy: 2(I+1)/(S+1) = 2 for such an image, rescued only by clamping the batch mean to 1.
    logits = two_class_logits([[-30.0, -30.0]])
    target = torch.tensor([[[0, 0]]])
    assert bce_dice_loss(logits, target, IGNORE, 1.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_all_neutral_image_does_not_count_in_the_dice_mean() -> None:
    one = two_class_logits([[LN3, 0.0]])
    target_one = torch.tensor([[[1, 0]]])
    batch = two_class_logits([[5.0, -5.0], [LN3, 0.0]])
    target_batch = torch.tensor([[[IGNORE, IGNORE]], [[1, 0]]])
    expected = bce_dice_loss(one, target_one, IGNORE, 1.0, 1.0)
    assert bce_dice_loss(batch, target_batch, IGNORE, 1.0, 1.0).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_all_neutral_batch_is_zero_finite_and_differentiable(num_classes: int) -> None:
    logits = torch.randn(2, num_classes, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), IGNORE, dtype=torch.long)
    loss = segmentation_loss(logits, target, num_classes, IGNORE, 1.0, 1.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize(("bce", "dice"), [(0.0, 0.0), (-1.0, 2.0)])
def test_bad_loss_weights_are_a_task_error(bce: float, dice: float) -> None:
    with pytest.raises(TaskError) as err:
        bce_dice_loss(two_class_logits([[0.0]]), torch.tensor([[[1]]]), IGNORE, bce, dice)
    assert err.value.where == "loss_weights"


def test_cross_entropy_hand_computed_with_ignore_index() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0], [9.0, -9.0, 3.0]])
    logits = logits.T.reshape(1, 3, 1, 3)
    target = torch.tensor([[[2, 0, IGNORE]]])
    # pixel 0: -log(1/3); pixel 1: softmax = [1/2, 1/4, 1/4] -> -log(1/2); pixel 2 ignored
    expected = (math.log(3.0) + math.log(2.0)) / 2
    assert cross_entropy_loss(logits, target, IGNORE).item() == pytest.approx(expected, rel=1e-6)


def test_segmentation_loss_dispatches_on_class_count() -> None:
    torch.manual_seed(0)
    logits2 = torch.randn(2, 2, 4, 4)
    target2 = torch.randint(0, 2, (2, 4, 4))
    assert torch.equal(segmentation_loss(logits2, target2, 2, IGNORE, 1.0, 3.0),
                       bce_dice_loss(logits2, target2, IGNORE, 1.0, 3.0))
    logits3 = torch.randn(2, 3, 4, 4)
    target3 = torch.randint(0, 3, (2, 4, 4))
    # dice 0: plain cross-entropy, as before loss_weights applied to more classes.
    assert torch.equal(segmentation_loss(logits3, target3, 3, IGNORE, 1.0, 0.0),
                       cross_entropy_loss(logits3, target3, IGNORE))
    with pytest.raises(TaskError) as err:
        segmentation_loss(logits3, target3, 3, IGNORE, 0.0, 0.0)
    assert err.value.where == "loss_weights"
    with pytest.raises(ValueError, match=r"expected logits \(B, 3, H, W\)"):
        segmentation_loss(logits2, target2, 3, IGNORE, 1.0, 1.0)


def three_class_logits(pixels: list[list[float]]) -> torch.Tensor:
    """(1, 3, 1, W) logits from one [l0, l1, l2] list per pixel."""
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, 3, 1, len(pixels)).requires_grad_(True)


# pixel 0: softmax [1/3, 1/3, 1/3], target 1; pixel 1: softmax [1/2, 1/4, 1/4], target 0;
# pixel 2: neutral, with a confident class-2 prediction that must not count anywhere.
HAND_LOGITS = [[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0], [-9.0, -9.0, 9.0]]
HAND_TARGET = torch.tensor([[[1, 0, IGNORE]]])
HAND_CE = (math.log(3.0) + math.log(2.0)) / 2
# Class 1 is the only foreground class present (target of pixel 0; the argmax is 0 on both counted
# pixels): D_1 = 2 * 1/3 / ((1/3 + 1/4) + 1) = 8/19. Class 2 is present nowhere, so it is left out.
HAND_DICE = 8 / 19


def test_multiclass_ce_plus_dice_hand_computed() -> None:
    logits = three_class_logits(HAND_LOGITS)
    assert multiclass_dice(logits, HAND_TARGET, IGNORE).item() == pytest.approx(HAND_DICE, rel=1e-6)
    loss = segmentation_loss(logits, HAND_TARGET, 3, IGNORE, 1.0, 1.0)
    assert loss.item() == pytest.approx((HAND_CE + (1 - HAND_DICE)) / 2, rel=1e-6)
    weighted = segmentation_loss(logits, HAND_TARGET, 3, IGNORE, 1.0, 3.0)
    assert weighted.item() == pytest.approx((HAND_CE + 3 * (1 - HAND_DICE)) / 4, rel=1e-6)


def test_a_class_only_predicted_counts_in_the_dice_with_zero_overlap() -> None:
    # pixel 1 now predicts class 2 (softmax [1/6, 1/6, 2/3]) where the target is background.
    logits = three_class_logits([[0.0, 0.0, 0.0], [0.0, 0.0, math.log(4.0)]])
    target = torch.tensor([[[1, 0]]])
    d1 = (2 / 3) / (1 / 3 + 1 / 6 + 1)
    assert multiclass_dice(logits, target, IGNORE).item() == pytest.approx((d1 + 0.0) / 2, rel=1e-6)


def test_multiclass_neutral_pixels_change_nothing_and_get_no_gradient() -> None:
    logits = three_class_logits(HAND_LOGITS)
    loss = segmentation_loss(logits, HAND_TARGET, 3, IGNORE, 1.0, 1.0)
    loss.backward()
    assert torch.all(logits.grad[..., 2] == 0)
    assert torch.all(logits.grad[..., :2] != 0)
    other = three_class_logits([*HAND_LOGITS[:2], [5.0, -3.0, 0.0]])
    assert segmentation_loss(other, HAND_TARGET, 3, IGNORE, 1.0, 1.0).item() == pytest.approx(loss.item(), rel=1e-6)


def test_background_only_batch_has_no_dice_term() -> None:
    logits = three_class_logits([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    target = torch.tensor([[[0, 0]]])
    ce = cross_entropy_loss(logits, target, IGNORE)
    assert multiclass_dice(logits, target, IGNORE).item() == 1.0
    assert segmentation_loss(logits, target, 3, IGNORE, 1.0, 1.0).item() == pytest.approx(ce.item() / 2, rel=1e-6)


def test_class_weights_weight_the_cross_entropy_term() -> None:
    logits = three_class_logits(HAND_LOGITS)
    weights = torch.tensor([1.0, 3.0, 7.0])
    # A weighted mean over the counted pixels: (3 * ln 3 + 1 * ln 2) / (3 + 1); the neutral pixel's
    # class-2 weight plays no part.
    expected_ce = (3 * math.log(3.0) + math.log(2.0)) / 4
    assert cross_entropy_loss(logits, HAND_TARGET, IGNORE, weights).item() == pytest.approx(expected_ce, rel=1e-6)
    loss = segmentation_loss(logits, HAND_TARGET, 3, IGNORE, 1.0, 1.0, weights)
    assert loss.item() == pytest.approx((expected_ce + (1 - HAND_DICE)) / 2, rel=1e-6)
    # Equal weights are no weights at all: only the ratios matter.
    assert cross_entropy_loss(logits, HAND_TARGET, IGNORE, torch.full((3,), 5.0)).item() == pytest.approx(
        HAND_CE, rel=1e-6)


def test_class_weights_weight_the_two_class_bce() -> None:
    logits = two_class_logits([[LN3, 0.0, 50.0]])
    target = torch.tensor([[[1, 0, IGNORE]]])
    weighted_bce = (-3 * math.log(0.75) - math.log(0.5)) / 4
    got = bce_dice_loss(logits, target, IGNORE, 1.0, 0.0, torch.tensor([1.0, 3.0]))
    assert got.item() == pytest.approx(weighted_bce, rel=1e-6)


def test_median_frequency_weights_of_known_masks() -> None:
    masks = [np.array([[0, 0], [0, 1]], np.uint8), np.array([[0, IGNORE], [2, 2]], np.uint8)]
    # freq_c = pixels of c / counted pixels of the masks holding c: bg 4/7, class 1 1/4, class 2 2/3;
    # the median is 4/7. A fourth class found nowhere gets 1 and stays out of the median.
    expected = [1.0, (4 / 7) / (1 / 4), (4 / 7) / (2 / 3), 1.0]
    assert median_frequency_weights(masks, 4, IGNORE) == pytest.approx(expected)
    titles = ["bg", "a", "b", "c"]
    assert resolve_class_weights("auto", titles, masks, IGNORE) == pytest.approx(expected)


def test_class_weights_setting_resolves_to_one_weight_per_class() -> None:
    titles = ["bg", "blob", "box", "ring"]
    assert resolve_class_weights(None, titles, [], IGNORE) is None
    assert resolve_class_weights([1, 2, 3, 4], titles, [], IGNORE) == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(TaskError) as err:
        resolve_class_weights([1, 2], titles, [], IGNORE)
    assert err.value.where == "class_weights"
    assert "2 weights given, but the model has 4 classes" in err.value.message
    assert "bg, blob, box, ring" in err.value.message


def test_half_precision_logits_give_a_float32_loss() -> None:
    logits = torch.randn(1, 2, 4, 4).half()
    target = torch.randint(0, 2, (1, 4, 4))
    loss = bce_dice_loss(logits, target, IGNORE, 1.0, 1.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
