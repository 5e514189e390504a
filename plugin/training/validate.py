"""Validation: loss and confusion-matrix metrics over the whole val split, summed over the ranks.

Crop training validates whole images by the tiled, Gaussian-blended prediction that inference
makes, so the logged figures are those `evaluate` gives for the checkpoint's predictions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from plugin.config.typed import TrainConfig
from plugin.format.classes import NEUTRAL_INDEX, ClassMapping
from plugin.nn.metrics import confusion_matrix, logged_metrics
from plugin.nn.precision import Precision
from plugin.nn.tiling import TorchNetwork, crop_probabilities, predict_tiled, training_window
from plugin.training import distributed
from plugin.training.data import batches


def validate(
    net: nn.Module,
    loader: DataLoader,
    compute_loss,
    mapping: ClassMapping,
    titles: list[str],
    device: torch.device,
    config: TrainConfig,
    precision: Precision,
    real: int | None = None,
    eval_batchnorm: bool = True,
) -> tuple[dict[str, float], list[str]]:
    """Loss (mean of the per-sample losses) and confusion-matrix metrics over the whole val split, and the absent classes.

    The loss is computed sample by sample so that it does not depend on how the split is batched or
    sharded; sums and counts are added over the ranks, so every rank returns the same figures.
    The first `real` samples of this rank's loader count (None: all); the rest is padding.
    `eval_batchnorm` False keeps BatchNorm in train mode (validate_with_model_eval false). The network
    runs under the training's autocast; the loss and the metrics are computed from float32 logits.
    """
    net.train(not eval_batchnorm)
    cm = torch.zeros(mapping.num_classes, mapping.num_classes, dtype=torch.int64, device=device)
    # [sum of per-sample losses, samples counted], kept on the device: no host sync per sample.
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    seen = 0
    if config.scale.crops:
        predict = _tiled_logits(net, config, mapping.num_classes, device, precision)
    else:
        def predict(images: torch.Tensor) -> torch.Tensor:
            return precision.logits(net, images.to(device, non_blocking=True))
    with torch.no_grad():
        for images, targets in batches(loader):
            targets = targets.to(device, non_blocking=True)
            logits = predict(images)
            keep = len(images) if real is None else max(0, min(len(images), real - seen))
            seen += len(images)
            for i in range(keep):
                totals[0] += compute_loss(logits[i : i + 1], targets[i : i + 1]).double()
            totals[1] += keep
            # Padding samples are all neutral: they add nothing to the confusion matrix.
            cm += confusion_matrix(logits.argmax(1), targets, mapping.num_classes, NEUTRAL_INDEX, check=False)
    distributed.all_reduce_sum(totals)
    distributed.all_reduce_sum(cm)
    metrics, absent = logged_metrics(cm.cpu(), titles)
    metrics = {"loss": float(totals[0] / totals[1]), **metrics}
    return metrics, absent


def _tiled_logits(net: nn.Module, config: TrainConfig, num_classes: int, device: torch.device, precision: Precision):
    """(1, H, W, 3) uint8 whole image -> (1, C, H, W) log-probabilities by the tiled, Gaussian-blended
    prediction that inference makes for a crop-trained model (Predictor.region, without TTA)."""
    window = training_window(config.input_size, config.scale.factor)
    overlap = (window[0] // 2, window[1] // 2)
    network = TorchNetwork(net, precision)

    def tiles_probs(tiles: list) -> torch.Tensor:
        return crop_probabilities(network, tiles, config.input_size, device)

    def predict(images: torch.Tensor) -> torch.Tensor:
        image = images[0].numpy()
        probs, _ = predict_tiled(tiles_probs, image, window, overlap, config.batch_size.val, num_classes, device)
        # Log-probabilities are logits whose softmax is the blended probabilities, so the loss and the
        # argmax see exactly the prediction inference writes.
        return probs.to(device).clamp_min(1e-8).log()[None]

    return predict
