"""Training augmentation: the "augmentations" config value, parsed once, applied per sample in the loader workers.

Geometric steps move image and mask together; the mask is resampled nearest-neighbour, and pixels
brought in from outside the image are neutral (ignored by loss and metrics), never background.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from plugin.config.typed import Step
from plugin.format.classes import NEUTRAL_INDEX

STEP_NAMES = (
    "hflip", "vflip", "rotate90", "affine", "elastic", "brightness_contrast", "gamma", "blur", "noise"
)


@dataclass(frozen=True)
class Augmenter:
    """Callable (image uint8 HxWx3, mask uint8 HxW, seed) -> (image, mask), the same output for the same seed."""

    steps: tuple[Step, ...]
    transform: Any  # albumentations.Compose of the steps

    def __call__(self, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        # One generator pair shared by all steps, drawn in order: Compose.set_random_seed would give every
        # step the same seed, so e.g. hflip and vflip (same p) would always fire together.
        self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A sample's augmentation seed: a function of these three alone, not of which worker loads it."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def create_augmenter(steps: tuple[Step, ...]) -> Augmenter | None:
    """The augmenter of the config's steps, or None when there are none."""
    if not steps:
        return None
    # Imported here: config validation and the other subcommands do not need albumentations.
    import albumentations as A

    return Augmenter(steps, A.Compose([_transform(A, step) for step in steps]))


def _transform(A: Any, step: Step) -> Any:
    import cv2

    # Constant border: what a geometric step brings in from outside is black in the image, neutral in the mask.
    border = {
        "border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": NEUTRAL_INDEX,
        "interpolation": cv2.INTER_LINEAR, "mask_interpolation": cv2.INTER_NEAREST,
    }
    p = step.p
    if step.name == "hflip":
        return A.HorizontalFlip(p=p)
    if step.name == "vflip":
        return A.VerticalFlip(p=p)
    if step.name == "rotate90":
        return A.RandomRotate90(p=p)
    if step.name == "affine":
        return A.Affine(scale=step.param("scale"), rotate=step.param("rotate"), p=p, **border)
    if step.name == "elastic":
        return A.ElasticTransform(alpha=step.param("alpha"), sigma=step.param("sigma"), p=p, **border)
    if step.name == "brightness_contrast":
        brightness, contrast = step.param("brightness"), step.param("contrast")
        return A.RandomBrightnessContrast(
            brightness_limit=(-brightness, brightness), contrast_limit=(-contrast, contrast), p=p
        )
    if step.name == "gamma":
        low, high = step.param("gamma")
        # albumentations takes gamma in percent.
        return A.RandomGamma(gamma_limit=(low * 100, high * 100), p=p)
    if step.name == "blur":
        return A.GaussianBlur(blur_limit=0, sigma_limit=step.param("sigma"), p=p)
    if step.name == "noise":
        return A.GaussNoise(std_range=step.param("std"), p=p)
    raise AssertionError(f"the schema admits only {STEP_NAMES}, not {step.name!r}")
