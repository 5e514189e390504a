"""Typed task configs: frozen dataclasses read once from a validated config dict (see config/load.py).

Past config/load.py the code reads these fields instead of `config["a"]["b"]` strings. Each constructor
trusts its input to be valid against the schema, so it converts and never checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# "__all__" in the inference config: every class (or tag) of the model.
MATCH_ALL = "__all__"


@dataclass(frozen=True)
class Scale:
    """How training presents images to the network, and so how inference must.

    resize: the whole image squashed to input_size (the legacy rule); crop: input_size windows of
    the image scaled by `factor` (1.0 = native resolution). A train config's factor "auto" is None until
    the train task derives it from the train images (training.task.resolve_scale).
    """

    mode: str = "resize"
    factor: float | None = 1.0

    @property
    def crops(self) -> bool:
        return self.mode == "crop"

    def describe(self) -> str:
        return f"crops at scale {self.factor:g}" if self.crops else "whole images resized to the input size"


# The legacy rule, and what a checkpoint without a scale record was trained with.
RESIZE = Scale()


@dataclass(frozen=True)
class NetworkSpec:
    """Which network a model is: the legacy UNet v2 (VGG16-BN, no encoder choice), or a UNet on `encoder`."""

    arch: str  # "unet_v2" or "unet"
    encoder: str | None = None  # unet: an nn.encoders name; unet_v2: None

    def describe(self) -> str:
        return "UNet v2 (VGG16-BN)" if self.arch == "unet_v2" else f"UNet on {self.encoder}"


# What a checkpoint without a network record is: every model written before networks could be chosen.
LEGACY_NETWORK = NetworkSpec("unet_v2")


@dataclass(frozen=True)
class NetworkChoice:
    """The train config's network section: the network and where its encoder's starting weights come from."""

    spec: NetworkSpec
    encoder_weights: str | None  # "imagenet", a state-dict path, or None for a random init



@dataclass(frozen=True)
class Step:
    """One augmentation step: its name, probability and other keys (sorted; ranges as (low, high))."""

    name: str
    p: float
    params: tuple[tuple[str, Any], ...]

    def param(self, key: str) -> Any:
        return dict(self.params)[key]


@dataclass(frozen=True)
class PerSplit:
    train: int | str  # str: data_workers "auto"
    val: int | str

    def of(self, split: str) -> int | str:
        return self.train if split == "train" else self.val


@dataclass(frozen=True)
class EarlyStoppingRule:
    """End the run after `patience` validations without a better `metric` (lower for loss, higher otherwise)."""

    patience: int
    metric: str

    @property
    def lower_is_better(self) -> bool:
        return self.metric == "loss"


def _scale(section: dict) -> Scale:
    if section["mode"] == "resize":
        return RESIZE  # the factor means nothing to resize
    factor = section["factor"]
    return Scale("crop", None if factor == "auto" else float(factor))


@dataclass(frozen=True)
class TrainConfig:
    """A validated train config. `raw` is the merged JSON itself: checkpoints record it as `settings`."""

    input_size: tuple[int, int]  # (width, height)
    scale: Scale
    foreground_oversampling: float
    batch_size: PerSplit
    data_workers: PerSplit
    allow_corrupted_samples: PerSplit
    train_tag: str
    val_tag: str
    background: str
    neutral: str
    epochs: int
    val_every: float
    lr: float
    plateau_patience: int
    plateau_divisor: float
    optimizer: str  # "adamw" or "adam"
    weight_decay: float
    lr_schedule: str  # "poly", "cosine" or "plateau"
    warmup_epochs: float
    bce_weight: float
    dice_weight: float
    class_weights: tuple[float, ...] | str | None  # a weight per model class, "auto", or None
    augmentations: tuple[Step, ...]
    validate_with_model_eval: bool
    weights_init_type: str
    gpu_devices: tuple[int, ...]
    sync_batchnorm: bool
    cpu_processes: int
    seed: int
    resume: bool  # resume "auto"; False for "never"
    time_budget_s: float | None
    early_stopping: EarlyStoppingRule | None
    max_nonfinite_steps: int
    keep_checkpoints: int | None
    max_image_pixels: int
    amp: str  # "auto", "bf16", "fp16" or "off" (nn/precision.py)
    compile: bool
    log_every_s: float | None
    log_every_iterations: int | None
    # None until the train task resolves it: a config without a network section takes model/'s network,
    # or the default one (training.task.resolve_network).
    network: NetworkChoice | None
    raw: dict = field(compare=False, repr=False)

    @classmethod
    def from_dict(cls, config: dict) -> TrainConfig:
        def per_split(key: str) -> PerSplit:
            def value(v: int | str) -> int | str:
                return v if isinstance(v, str) else int(v)

            return PerSplit(value(config[key]["train"]), value(config[key]["val"]))

        weights = config["class_weights"]
        budget, stopping = config["time_budget_minutes"], config["early_stopping"]
        return cls(
            input_size=(config["input_size"]["width"], config["input_size"]["height"]),
            scale=_scale(config["scale"]),
            foreground_oversampling=float(config["foreground_oversampling"]),
            batch_size=per_split("batch_size"),
            data_workers=per_split("data_workers"),
            allow_corrupted_samples=per_split("allow_corrupted_samples"),
            train_tag=config["dataset_tags"]["train"],
            val_tag=config["dataset_tags"]["val"],
            background=config["special_classes"]["background"],
            neutral=config["special_classes"]["neutral"],
            epochs=config["epochs"],
            val_every=float(config["val_every"]),
            lr=float(config["lr"]),
            plateau_patience=config["lr_decreasing"]["patience"],
            plateau_divisor=float(config["lr_decreasing"]["lr_divisor"]),
            optimizer=config["optimizer"]["name"],
            weight_decay=float(config["optimizer"]["weight_decay"]),
            lr_schedule=config["lr_schedule"]["name"],
            warmup_epochs=float(config["lr_schedule"]["warmup_epochs"]),
            bce_weight=float(config["loss_weights"]["bce"]),
            dice_weight=float(config["loss_weights"]["dice"]),
            class_weights=tuple(float(w) for w in weights) if isinstance(weights, list) else weights,
            augmentations=parse_steps(config["augmentations"]),
            validate_with_model_eval=config["validate_with_model_eval"],
            weights_init_type=config["weights_init_type"],
            gpu_devices=tuple(config["gpu_devices"]),
            sync_batchnorm=config["sync_batchnorm"],
            cpu_processes=config["cpu_processes"],
            seed=config["seed"],
            resume=config["resume"] == "auto",
            time_budget_s=None if budget is None else 60.0 * float(budget),
            early_stopping=None if stopping["patience"] is None else EarlyStoppingRule(
                stopping["patience"], stopping["metric"]
            ),
            max_nonfinite_steps=config["max_nonfinite_steps"],
            keep_checkpoints=config["keep_checkpoints"],
            max_image_pixels=config["max_image_pixels"],
            amp=config["amp"],
            compile=config["compile"],
            log_every_s=None if config["log_every"]["seconds"] is None else float(config["log_every"]["seconds"]),
            log_every_iterations=config["log_every"]["iterations"],
            network=None if "network" not in config else NetworkChoice(
                NetworkSpec(config["network"]["arch"], config["network"].get("encoder")),
                config["network"]["encoder_weights"],
            ),
            raw=config,
        )


def parse_steps(value: bool | list[dict]) -> tuple[Step, ...]:
    """The steps of a validated "augmentations" value; false and [] are no steps."""
    if value is False:
        return ()
    return tuple(Step(raw["name"], float(raw["p"]), _params(raw)) for raw in value)


def _params(raw: dict) -> tuple[tuple[str, Any], ...]:
    others = {key: value for key, value in raw.items() if key not in ("name", "p")}
    return tuple(sorted((key, tuple(v) if isinstance(v, list) else v) for key, v in others.items()))


@dataclass(frozen=True)
class Mode:
    """The inference config's mode section. Keys a mode does not have are None."""

    name: str
    save_classes: tuple[str, ...] | str  # titles, or MATCH_ALL
    class_suffix: str
    save_probabilities: bool
    tta: tuple[str, ...]  # flip names, () for none
    bounds: dict[str, str] | None = None  # roi: side strings by side
    padding: dict[str, str] | None = None  # bboxes
    from_classes: tuple[str, ...] | str | None = None  # bboxes
    box_suffix: str | None = None  # bboxes: add_suffix of the saved boxes
    save: bool = False  # roi, bboxes, sliding_window: save the predicted regions as rectangles
    class_name: str | None = None  # roi, sliding_window: class of the saved regions
    window: tuple[int | None, int | None] = (None, None)  # sliding_window (width, height); None: the model's
    min_overlap: tuple[int | None, int | None] = (None, None)  # sliding_window (x, y); None: half the window
    batch_size: int = 1  # full_image: images per forward; sliding_window: windows per forward


# What runs the network in inference: model.pt in torch, or the exported model.onnx in onnxruntime.
BACKENDS = ("torch", "onnxruntime")
# The Supervisely SDK's names of the backends (its --runtime, its DeployInfo.runtime).
SDK_RUNTIMES = {"PyTorch": "torch", "ONNXRuntime": "onnxruntime"}


@dataclass(frozen=True)
class InferenceConfig:
    gpu_device: int
    amp: str  # "auto", "bf16", "fp16" or "off" (nn/precision.py)
    backend: str  # one of BACKENDS
    mode: Mode
    allow_corrupted_images: int
    max_image_pixels: int

    @classmethod
    def from_dict(cls, config: dict) -> InferenceConfig:
        mode = config["mode"]
        window, overlap = mode.get("window", {}), mode.get("min_overlap", {})
        return cls(
            gpu_device=config["model"]["gpu_device"],
            amp=config["model"]["amp"],
            backend=config["model"]["backend"],
            mode=Mode(
                name=mode["name"],
                save_classes=_names(mode["model_classes"]["save_classes"]),
                class_suffix=mode["model_classes"]["add_suffix"],
                save_probabilities=mode["save_probabilities"],
                tta=tta_flips(mode["tta"]),
                bounds=mode.get("bounds"),
                padding=mode.get("padding"),
                from_classes=_names(mode["from_classes"]) if "from_classes" in mode else None,
                box_suffix=mode.get("add_suffix"),
                save=mode.get("save", False),
                class_name=mode.get("class_name"),
                window=(window.get("width"), window.get("height")),
                min_overlap=(overlap.get("x"), overlap.get("y")),
                batch_size=mode.get("batch_size", 1),
            ),
            allow_corrupted_images=config["allow_corrupted_images"],
            max_image_pixels=config["max_image_pixels"],
        )


# Test-time augmentation flips by config name.
FLIP_NAMES = ("horizontal", "vertical", "both")


def tta_flips(setting: bool | list[str]) -> tuple[str, ...]:
    """mode.tta: true is every flip (nnU-Net's mirroring), false none, a list those flips."""
    if isinstance(setting, bool):
        return FLIP_NAMES if setting else ()
    return tuple(setting)


def _names(value: str | list[str]) -> tuple[str, ...] | str:
    return value if isinstance(value, str) else tuple(value)
