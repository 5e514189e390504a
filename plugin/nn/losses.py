"""Training losses: BCE + soft Dice for two classes, CE + soft multi-class Dice otherwise, neutral pixels ignored.

Shapes: logits (B, C, H, W) float, target (B, H, W) int64 class indices with `ignore_index`
(the neutral class, 255) on pixels that must not count. Every loss is computed in float32 (safe
under autocast) and stays finite and differentiable when a batch has no counted pixel at all:
it is then 0, with zero gradients, so the training step goes through instead of poisoning the
weights with NaN. Optional class weights (one per model class) weight the cross-entropy term.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from plugin.errors import TaskError

# Added to both the numerator and the denominator of the 2-class soft Dice, so an image whose target
# and prediction are both (nearly) empty scores ~1 instead of 0/0, and D stays within [0, 1].
DICE_SMOOTH = 1.0


def bce_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    bce_weight: float,
    dice_weight: float,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """(w_bce * BCE + w_dice * (1 - D)) / (w_bce + w_dice) for a background/foreground model.

    logits (B, 2, H, W), target (B, H, W) long in {0, 1, ignore_index} -> scalar tensor.
    With p = softmax(logits)[:, 1] and t = (target == 1):
    - BCE = mean over the non-neutral pixels of -[t log p + (1 - t) log(1 - p)], computed from
      log_softmax so that it stays finite for saturated logits; with class_weights (2,) each pixel
      counts with its target's weight (a weighted mean, as torch's cross_entropy);
    - D_b = (2 sum(p t) + 1) / (sum(p) + sum(t) + 1) per image b, sums over its non-neutral pixels
      (the legacy 2(I + 1)/(S + 1) could exceed 1 and was clamped); D = the mean of D_b over the
      images that have at least one non-neutral pixel, and the Dice term is 0 when none has.
    Weights must be >= 0 with a positive sum (the legacy code divided by zero when both were 0).
    """
    _check_shapes(logits, target)
    if logits.shape[1] != 2:
        raise ValueError(f"bce_dice_loss needs 2-class logits, got shape {tuple(logits.shape)}")
    _check_term_weights(bce_weight, dice_weight)
    log_probs = F.log_softmax(logits.float(), dim=1)
    valid = target != ignore_index
    fg = (target == 1) & valid
    validf = valid.float()
    fgf = fg.float()

    # -[t log p + (1-t) log(1-p)] with log p = log_softmax[:, 1] and log(1-p) = log_softmax[:, 0].
    pixel_bce = -torch.where(fg, log_probs[:, 1], log_probs[:, 0])
    pixel_weight = validf if class_weights is None else _pixel_weights(target, valid, class_weights)
    bce = (pixel_bce * pixel_weight).sum() / pixel_weight.sum().clamp(min=1e-12)

    p = log_probs[:, 1].exp() * validf
    intersection = (p * fgf).flatten(1).sum(1)
    total = p.flatten(1).sum(1) + fgf.flatten(1).sum(1)
    dice_per_image = (2.0 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)
    counted = (validf.flatten(1).sum(1) > 0).float()
    dice_loss = ((1.0 - dice_per_image) * counted).sum() / counted.sum().clamp(min=1.0)

    return (bce_weight * bce + dice_weight * dice_loss) / (bce_weight + dice_weight)


def cross_entropy_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy over the pixels whose target is not ignore_index.

    logits (B, C, H, W), target (B, H, W) long -> scalar tensor; 0 (still backpropagating, with
    zero gradients) when every pixel is ignored, where a plain mean would be 0/0 = NaN. With
    class_weights (C,), the weighted mean sum(w[t] * ce) / sum(w[t]), as torch's cross_entropy.
    """
    _check_shapes(logits, target)
    weight = None if class_weights is None else class_weights.to(logits.device, torch.float32)
    summed = F.cross_entropy(logits.float(), target, weight=weight, ignore_index=ignore_index, reduction="sum")
    valid = target != ignore_index
    if weight is None:
        return summed / valid.sum().clamp(min=1)
    return summed / _pixel_weights(target, valid, weight).sum().clamp(min=1e-12)


def multiclass_dice(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean soft Dice of the foreground classes (1..C-1) present in the target or the prediction.

    Over the whole batch and its non-neutral pixels: D_c = 2 sum(p_c t_c) / (sum(p_c) + sum(t_c)),
    p = softmax(logits), t = one-hot target. A class is present when it is the target or the argmax
    of some non-neutral pixel, so D_c never is 0/0 and a class nobody sees or predicts does not pull
    the mean up for free. Background is left out, as nnU-Net and SMP do: it dominates most images and
    would make the Dice term near 1 whatever the objects look like. Returns 1 when no class is present.
    """
    _check_shapes(logits, target)
    num_classes = logits.shape[1]
    valid = target != ignore_index
    validf = valid.unsqueeze(1).float()
    probs = F.softmax(logits.float(), dim=1) * validf
    # Comparisons with the class indices rather than F.one_hot, which reads the indices' range back
    # from the device at every call.
    classes = torch.arange(num_classes, device=logits.device).view(1, -1, 1, 1)
    onehot = (target.unsqueeze(1) == classes).float() * validf
    predicted = (logits.argmax(1).unsqueeze(1) == classes).float() * validf
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)[1:]
    total = (probs.sum(dims) + onehot.sum(dims))[1:]
    present = ((onehot.sum(dims) + predicted.sum(dims))[1:] > 0).float()
    dice = 2.0 * intersection / total.clamp(min=1e-12)
    # 1 - mean(1 - D_c) rather than mean(D_c): the same value, and it is 1 (loss 0) with zero
    # gradients when nothing is present.
    return 1.0 - ((1.0 - dice) * present).sum() / present.sum().clamp(min=1.0)


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int,
    bce_weight: float,
    dice_weight: float,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss: bce_dice_loss for a 2-class model (as legacy), otherwise
    (w_bce * CE + w_dice * (1 - multiclass_dice)) / (w_bce + w_dice).

    logits (B, num_classes, H, W), target (B, H, W) long -> scalar tensor; class_weights (num_classes,)
    or None weight the cross-entropy (BCE) term only.
    """
    if logits.ndim != 4 or logits.shape[1] != num_classes:
        raise ValueError(f"expected logits (B, {num_classes}, H, W), got shape {tuple(logits.shape)}")
    if num_classes == 2:
        return bce_dice_loss(logits, target, ignore_index, bce_weight, dice_weight, class_weights)
    _check_term_weights(bce_weight, dice_weight)
    ce = cross_entropy_loss(logits, target, ignore_index, class_weights)
    if dice_weight == 0:
        return ce
    dice_loss = 1.0 - multiclass_dice(logits, target, ignore_index)
    return (bce_weight * ce + dice_weight * dice_loss) / (bce_weight + dice_weight)


def resolve_class_weights(
    setting: None | str | Sequence[float], titles: Sequence[str], masks: Sequence[np.ndarray], ignore_index: int
) -> list[float] | None:
    """The config's class_weights as one weight per model class (index order), or None.

    `titles` are the model classes by index (background first); "auto" is median_frequency_weights
    of `masks`. A list of another length is a TaskError naming class_weights and the class order.
    """
    if setting is None:
        return None
    if setting == "auto":
        return median_frequency_weights(masks, len(titles), ignore_index)
    if len(setting) != len(titles):
        raise TaskError(
            f"{len(setting)} weights given, but the model has {len(titles)} classes; give one weight per "
            f"class in this order (background first, then the classes sorted by title): {', '.join(titles)}",
            where="class_weights",
        )
    return [float(w) for w in setting]


def median_frequency_weights(masks: Sequence[np.ndarray], num_classes: int, ignore_index: int) -> list[float]:
    """Median frequency balancing (Eigen & Fergus 2015): w_c = median(freq) / freq_c.

    freq_c = pixels of class c / non-neutral pixels of the masks in which c appears, so a class that
    shows up in few images is not made rarer by the images it is absent from. A class found in no
    mask gets weight 1 (it is never a target, so its weight changes nothing) and stays out of the median.
    """
    class_pixels = np.zeros(num_classes, dtype=np.float64)
    image_pixels = np.zeros(num_classes, dtype=np.float64)
    for mask in masks:
        counts = np.bincount(mask.ravel(), minlength=max(num_classes, ignore_index + 1))
        labelled = counts[:num_classes].sum()
        present = counts[:num_classes] > 0
        class_pixels += counts[:num_classes]
        image_pixels[present] += labelled
    seen = class_pixels > 0
    if not seen.any():
        return [1.0] * num_classes
    freq = np.divide(class_pixels, image_pixels, out=np.ones(num_classes), where=seen)
    median = float(np.median(freq[seen]))
    return [median / f if s else 1.0 for f, s in zip(freq.tolist(), seen.tolist())]


def _pixel_weights(target: torch.Tensor, valid: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    weights = class_weights.to(target.device, torch.float32)
    return weights[torch.where(valid, target, 0)] * valid.float()


def _check_term_weights(bce_weight: float, dice_weight: float) -> None:
    if bce_weight < 0 or dice_weight < 0 or bce_weight + dice_weight <= 0:
        raise TaskError(
            f"loss weights must be >= 0 and not both 0, got bce={bce_weight}, dice={dice_weight}",
            where="loss_weights",
        )


def _check_shapes(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"expected logits (B, C, H, W) and target (B, H, W), got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")
    if target.dtype != torch.long:
        raise ValueError(f"target must be int64 class indices, got {target.dtype}")
