"""Legacy config layouts and names, read into today's: the v1 inference layout, renamed keys, and the
legacy trainer's learning-rate rule."""

from __future__ import annotations

import copy
import logging

log = logging.getLogger(__name__)


def from_v1_layout(raw: dict, errors: list[str]) -> dict:
    # v1: mode.source names the mode, model_classes sits at the top level, and the model's keys are the
    # other top-level keys. allow_corrupted_images and max_image_pixels are ours, not model keys, so they
    # stay at the top.
    mode = copy.deepcopy(raw.get("mode", {}))
    if isinstance(mode, dict):
        rename_legacy_key(mode, "source", "name", "mode", errors)
        if "model_classes" in raw:
            if "model_classes" in mode:
                errors.append("model_classes: given both at the top level (v1 layout) and in mode; keep one")
            else:
                mode["model_classes"] = copy.deepcopy(raw["model_classes"])
    config: dict = {"mode": mode, "model": {}}
    for key, value in raw.items():
        if key in ("allow_corrupted_images", "max_image_pixels"):
            config[key] = copy.deepcopy(value)
        elif key not in ("mode", "model_classes"):
            config["model"][key] = copy.deepcopy(value)
    return config


def rename_legacy_key(section: object, old: str, new: str, where: str, errors: list[str]) -> None:
    """In place: section[old] becomes section[new]; both given is an error (`where` is the section's dotted path)."""
    if not isinstance(section, dict) or old not in section:
        return
    value = section.pop(old)
    if new in section:
        errors.append(f"{where}.{old}: legacy name of {where}.{new}; give only one of them")
    else:
        section[new] = value


def legacy_trainer_rules(user: dict) -> dict:
    """`user` with the legacy trainer's rules made explicit when it sets lr_decreasing but no lr_schedule.

    Such a config was written for the legacy trainer (Adam, no weight decay, LR divided on plateaus,
    whole images resized to the input), so it keeps that meaning rather than silently getting the new
    defaults; decided on the user's keys, since after the merge every config has lr_decreasing.
    """
    if "lr_decreasing" not in user or "lr_schedule" in user:
        return user
    legacy: dict = {"lr_schedule": {"name": "plateau", "warmup_epochs": 0}}
    if "optimizer" not in user:
        legacy["optimizer"] = {"name": "adam", "weight_decay": 0}
    if "scale" not in user:
        legacy["scale"] = {"mode": "resize", "factor": 1.0}
    optimizer = "" if "optimizer" in user else " with Adam without weight decay"
    scale = "" if "scale" not in legacy else ", on whole images resized to input_size"
    log.info(
        "the config sets lr_decreasing but no lr_schedule, so it keeps the legacy rules: the plateau "
        f"schedule (no warmup){optimizer}{scale}; add an lr_schedule key for the new defaults",
        extra={"legacy": legacy},
    )
    return {**user, **legacy}
