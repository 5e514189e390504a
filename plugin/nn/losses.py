"""Training losses: BCE + soft Dice for two classes, cross-entropy otherwise, neutral pixels ignored.

Shapes: logits (B, C, H, W) float, target (B, H, W) int64 class indices with `ignore_index`
(the neutral class, 255) on pixels that must not count. Every loss is computed in float32 (safe
under autocast) and stays finite and differentiable when a batch has no counted pixel at all:
it is then 0, with zero gradients, so the training step goes through instead of poisoning the
weights with NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plugin.errors import TaskError

# Added to both the numerator and the denominator of the soft Dice, so an image whose target and
# prediction are both (nearly) empty scores ~1 instead of 0/0, and D stays within [0, 1].
DICE_SMOOTH = 1.0


def bce_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    bce_weight: float,
    dice_weight: float,
) -> torch.Tensor:
    """(w_bce * BCE + w_dice * (1 - D)) / (w_bce + w_dice) for a background/foreground model.

    logits (B, 2, H, W), target (B, H, W) long in {0, 1, ignore_index} -> scalar tensor.
    With p = softmax(logits)[:, 1] and t = (target == 1):
    - BCE = mean over the non-neutral pixels of -[t log p + (1 - t) log(1 - p)], computed from
      log_softmax so that it stays finite for saturated logits;
    - D_b = (2 sum(p t) + 1) / (sum(p) + sum(t) + 1) per image b, sums over its non-neutral pixels
      (the legacy 2(I + 1)/(S + 1) could exceed 1 and was clamped); D = the mean of D_b over the
      images that have at least one non-neutral pixel, and the Dice term is 0 when none has.
    Weights must be >= 0 with a positive sum (the legacy code divided by zero when both were 0).
    """
    _check_shapes(logits, target)
    if logits.shape[1] != 2:
        raise ValueError(f"bce_dice_loss needs 2-class logits, got shape {tuple(logits.shape)}")
    if bce_weight < 0 or dice_weight < 0 or bce_weight + dice_weight <= 0:
        raise TaskError(
            f"loss weights must be >= 0 and not both 0, got bce={bce_weight}, dice={dice_weight}",
            where="loss_weights",
        )
    log_probs = F.log_softmax(logits.float(), dim=1)
    valid = target != ignore_index
    fg = (target == 1) & valid
    validf = valid.float()
    fgf = fg.float()

    # -[t log p + (1-t) log(1-p)] with log p = log_softmax[:, 1] and log(1-p) = log_softmax[:, 0].
    pixel_bce = -torch.where(fg, log_probs[:, 1], log_probs[:, 0])
    bce = (pixel_bce * validf).sum() / validf.sum().clamp(min=1.0)

    p = log_probs[:, 1].exp() * validf
    intersection = (p * fgf).flatten(1).sum(1)
    total = p.flatten(1).sum(1) + fgf.flatten(1).sum(1)
    dice_per_image = (2.0 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)
    counted = (validf.flatten(1).sum(1) > 0).float()
    dice_loss = ((1.0 - dice_per_image) * counted).sum() / counted.sum().clamp(min=1.0)

    return (bce_weight * bce + dice_weight * dice_loss) / (bce_weight + dice_weight)


def cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over the pixels whose target is not ignore_index.

    logits (B, C, H, W), target (B, H, W) long -> scalar tensor; 0 (still backpropagating, with
    zero gradients) when every pixel is ignored, where a plain mean would be 0/0 = NaN.
    """
    _check_shapes(logits, target)
    summed = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    counted = (target != ignore_index).sum().clamp(min=1)
    return summed / counted


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int,
    bce_weight: float,
    dice_weight: float,
) -> torch.Tensor:
    """The training loss: bce_dice_loss for a 2-class model (as legacy), cross_entropy_loss otherwise.

    logits (B, num_classes, H, W), target (B, H, W) long -> scalar tensor. The BCE/Dice weights
    only matter in the 2-class case.
    """
    if logits.ndim != 4 or logits.shape[1] != num_classes:
        raise ValueError(f"expected logits (B, {num_classes}, H, W), got shape {tuple(logits.shape)}")
    if num_classes == 2:
        return bce_dice_loss(logits, target, ignore_index, bce_weight, dice_weight)
    return cross_entropy_loss(logits, target, ignore_index)


def _check_shapes(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"expected logits (B, C, H, W) and target (B, H, W), got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    if target.dtype != torch.long:
        raise ValueError(f"target must be int64 class indices, got {target.dtype}")
