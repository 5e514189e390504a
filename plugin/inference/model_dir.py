"""A trained model's folder (model/ in a task dir, each checkpoint in results/): config.json read into
ModelConfig, model.pt loaded into the torch network. Inference with either backend and the ONNX
export start here, so they agree on what the model is."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from plugin.config.typed import RESIZE, NetworkSpec, Scale
from plugin.errors import TaskError
from plugin.files import read_json
from plugin.format.classes import titles_by_index
from plugin.nn.network import create_network, read_network_record
from plugin.nn.weights import CONFIG_NAME, WEIGHTS_NAME, load_continue, load_state_dict

# The exported network beside model.pt (`sly-unet export`), which the onnxruntime backend reads.
ONNX_NAME = "model.onnx"


@dataclass(frozen=True)
class ModelConfig:
    """What config.json says about the model: classes by output index, input size, training scale, network."""

    class_titles: tuple[str, ...]  # by model index
    out_classes: tuple[dict, ...]  # {"title", "shape", "color", ...} as config.json lists them
    input_size: tuple[int, int]  # (width, height) the model was trained at
    scale: Scale  # how training presented images; legacy checkpoints: resize
    network: NetworkSpec  # legacy checkpoints: unet_v2
    # (x, y) image scale training presented to the network: the crop factor, or input / image side of
    # resized images; None for a checkpoint that predates the record (and legacy ones).
    presented_scale: tuple[float, float] | None

    @property
    def num_classes(self) -> int:
        return len(self.class_titles)


def class_color(out_classes: Sequence[dict], title: str) -> str:
    """The colour config.json gives a class; red for one it leaves out (a legacy checkpoint may)."""
    return next((c["color"] for c in out_classes if c.get("title") == title and "color" in c), "#FF0000")


def read_model_config(model_dir: Path) -> ModelConfig:
    """config.json of a model folder; TaskError naming the file or key at fault."""
    config_path = model_dir / CONFIG_NAME
    if not config_path.is_file():
        raise TaskError("the model is missing: a model folder holds config.json and the weights of a train "
                        "checkpoint", where=config_path)
    config = read_json(config_path)
    mapping = config.get("class_title_to_idx")
    if not isinstance(mapping, dict) or not mapping or not all(isinstance(i, int) for i in mapping.values()):
        raise TaskError("class_title_to_idx is missing or is not a mapping of class titles to indices", where=config_path)
    try:
        size = config["settings"]["input_size"]
        input_size = (int(size["width"]), int(size["height"]))
    except (KeyError, TypeError, ValueError):
        raise TaskError("settings.input_size {width, height} is missing", where=config_path) from None
    return ModelConfig(
        titles_by_index(mapping), tuple(config.get("out_classes") or ()), input_size, read_scale(config, config_path),
        read_network_record(config, config_path), read_presented_scale(config, config_path),
    )


def read_scale(config: dict, where: Path) -> Scale:
    """settings.scale of a checkpoint's config.json; a checkpoint without one (legacy) was trained on resized images."""
    record = config["settings"].get("scale")
    if record is None:
        return RESIZE
    try:
        scale = Scale(str(record["mode"]), float(record["factor"]))
    except (KeyError, TypeError, ValueError):
        raise TaskError("settings.scale must be {\"mode\": \"resize\" or \"crop\", \"factor\": number}", where=where) from None
    if scale.mode not in ("resize", "crop") or not scale.factor > 0:
        raise TaskError(f"settings.scale {record!r}: mode must be resize or crop and factor above 0", where=where)
    return scale


def read_presented_scale(config: dict, where: Path) -> tuple[float, float] | None:
    """config.json's presented_scale {x, y}; None without one."""
    record = config.get("presented_scale")
    if record is None:
        return None
    try:
        x, y = float(record["x"]), float(record["y"])
    except (KeyError, TypeError, ValueError):
        raise TaskError("presented_scale must be {\"x\": number, \"y\": number}", where=where) from None
    if not (x > 0 and y > 0):
        raise TaskError(f"presented_scale {record!r}: x and y must be above 0", where=where)
    return x, y


def load_model(model_dir: Path, config: ModelConfig) -> nn.Module:
    """model.pt of a model folder in a fresh network of config.network on the CPU, in eval mode, checked
    against `config`."""
    weights_path = model_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        raise TaskError("the model's weights are missing: the folder needs model.pt from a train checkpoint",
                        where=weights_path)
    state = load_state_dict(weights_path)
    head = next((t for k, t in state.items() if k.endswith("last_conv.weight")), None)
    if head is not None and head.shape[0] != config.num_classes:
        raise TaskError(
            f"config.json maps {config.num_classes} classes ({', '.join(sorted(config.class_titles))}) but model.pt "
            f"predicts {head.shape[0]}: the two files come from different models",
            where=model_dir,
        )
    model = create_network(config.network, config.num_classes)
    load_continue(model, state, where=weights_path)
    return model.eval()
