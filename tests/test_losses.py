from __future__ import annotations

import math

import pytest
import torch

from plugin.errors import TaskError
from plugin.nn.losses import bce_dice_loss, cross_entropy_loss, segmentation_loss

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
    # The BCE/Dice weights do not apply to more classes, even an invalid pair.
    assert torch.equal(segmentation_loss(logits3, target3, 3, IGNORE, 0.0, 0.0),
                       cross_entropy_loss(logits3, target3, IGNORE))
    with pytest.raises(ValueError, match=r"expected logits \(B, 3, H, W\)"):
        segmentation_loss(logits2, target2, 3, IGNORE, 1.0, 1.0)


def test_half_precision_logits_give_a_float32_loss() -> None:
    logits = torch.randn(1, 2, 4, 4).half()
    target = torch.randint(0, 2, (1, 4, 4))
    loss = bce_dice_loss(logits, target, IGNORE, 1.0, 1.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
