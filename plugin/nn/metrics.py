"""Segmentation metrics from a dataset-level confusion matrix.

The legacy plugin averaged per-batch accuracy and dice; here batches (and, under DDP, processes)
add up their confusion matrices and the metrics are computed once from the total, so every pixel
weighs the same whatever batch it was in.
"""

from __future__ import annotations

import torch


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int, check: bool = True
) -> torch.Tensor:
    """Pixel counts cm[t, p] of target class t predicted as p, over pixels whose target is not ignore_index.

    pred and target (B, H, W) integer class indices (pred = logits.argmax(1)) -> (C, C) int64 on
    their device, rows = target, columns = prediction. Matrices are plain counts, so they are
    summable: accumulate them over batches with `+`, and across DDP processes with
    `torch.distributed.all_reduce(cm)` (the default SUM) before calling summarize.
    `check` raises ValueError for a class index out of range; it waits for the device, so the
    training step, whose indices are in range by construction, leaves it out.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if check:
        outside = (pred < 0) | (pred >= num_classes) | ((target != ignore_index) & ((target < 0) | (target >= num_classes)))
        if bool(outside.any()):
            raise ValueError(f"class indices outside 0..{num_classes - 1} (other than ignore_index {ignore_index})")
    # Ignored pixels land in one extra bin; a fixed-size scatter (unlike bincount or a boolean
    # index, whose output size depends on the data) never waits for the device.
    bins = num_classes * num_classes
    flat = torch.where(target == ignore_index, bins, target.long() * num_classes + pred.long()).flatten()
    counts = torch.zeros(bins + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    counts = counts[:bins]
    return counts.reshape(num_classes, num_classes)


def summarize(cm: torch.Tensor, class_titles: list[str]) -> dict[str, float | None]:
    """Metrics of a confusion matrix (rows = target); class_titles[i] names class index i.

    Keys:
    - "accuracy": correct / counted pixels (neutral pixels are not in cm);
    - "iou/<title>", "dice/<title>" per class: TP / (TP + FP + FN) and 2TP / (2TP + FP + FN);
      None for a class absent from both the targets and the predictions (its row + column sum
      is 0), whose score would be 0/0;
    - "mean_iou": the mean IoU over the classes that are not None;
    - "dice": for 2 classes the foreground (index 1) Dice, as the legacy binary metric; for more,
      the mean Dice over the classes that are not None.
    Any value is None when nothing defines it (an empty matrix); drop those before logging.
    """
    n = cm.shape[0]
    if cm.shape != (n, n) or len(class_titles) != n:
        raise ValueError(f"a {tuple(cm.shape)} confusion matrix does not fit {len(class_titles)} class titles")
    counts = cm.detach().to("cpu", torch.float64)
    tp = counts.diagonal()
    rows = counts.sum(1)
    cols = counts.sum(0)
    total = counts.sum().item()

    out: dict[str, float | None] = {"accuracy": tp.sum().item() / total if total else None}
    ious: list[float] = []
    dices: list[float] = []
    dice_by_index: list[float | None] = []
    for i, title in enumerate(class_titles):
        union = (rows[i] + cols[i] - tp[i]).item()
        if union == 0:
            out[f"iou/{title}"] = out[f"dice/{title}"] = None
            dice_by_index.append(None)
            continue
        iou = tp[i].item() / union
        dice = 2 * tp[i].item() / (rows[i] + cols[i]).item()
        out[f"iou/{title}"], out[f"dice/{title}"] = iou, dice
        ious.append(iou)
        dices.append(dice)
        dice_by_index.append(dice)
    out["mean_iou"] = sum(ious) / len(ious) if ious else None
    if n == 2:
        out["dice"] = dice_by_index[1]
    else:
        out["dice"] = sum(dices) / len(dices) if dices else None
    return out


def logged_metrics(cm: torch.Tensor, titles: list[str]) -> tuple[dict[str, float], list[str]]:
    """A METRICS line's figures of a confusion matrix (a train log interval's or a validation's): floats
    only; the classes absent from both prediction and target are listed apart."""
    summary = summarize(cm, titles)
    metrics = {k: float(v) for k, v in summary.items() if v is not None}
    absent = [k.split("/", 1)[1] for k, v in summary.items() if v is None and k.startswith("iou/")]
    return metrics, absent
