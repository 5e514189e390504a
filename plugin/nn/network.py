"""Networks by spec: the one factory that training, inference, export and serving call, and the record
of the network that a checkpoint's config.json carries.

Every network takes the same input, RGB normalised with the ImageNet mean and std (nn/preprocess), so
that there is one preprocessing path for all of them; an encoder whose weights expect another
normalisation converts it inside its forward (nn/encoders). The record states that normalisation, so
that a consumer of config.json (or of an exported file's metadata) needs none of our code.
"""

from __future__ import annotations

import logging
import os

from torch import nn

from plugin.config.typed import LEGACY_NETWORK, NetworkSpec
from plugin.errors import TaskError
from plugin.nn.encoders import ENCODER_NAMES
from plugin.nn.model import UNetV2
from plugin.nn.preprocess import IMAGENET_MEAN, IMAGENET_STD
from plugin.nn.pretrained import encoder_weights_state_dict, load_encoder_weights
from plugin.nn.unet import UNet, create_unet
from plugin.nn.weights import vgg16_bn_to_unet

log = logging.getLogger(__name__)

ARCHS = ("unet", "unet_v2")
# The input every network takes, as config.json and the ONNX metadata record it.
INPUT_NORMALIZATION = {
    "mean": [float(str(m)) for m in IMAGENET_MEAN],  # float32 values printed shortest
    "std": [float(str(s)) for s in IMAGENET_STD],
}


def create_network(spec: NetworkSpec, num_classes: int) -> nn.Module:
    """A freshly initialised network on the CPU, in training mode."""
    if spec.arch == "unet_v2":
        return UNetV2(num_classes)
    return create_unet(spec.encoder, num_classes)


def size_divisor(spec: NetworkSpec) -> int:
    """What the input's height and width must be multiples of."""
    return UNetV2.size_divisor if spec.arch == "unet_v2" else UNet.size_divisor


def check_input_size_fits(spec: NetworkSpec, input_size: tuple[int, int]) -> None:
    """TaskError (input_size) unless both sides are multiples of the network's size divisor."""
    divisor = size_divisor(spec)
    bad = [f"{name} {side}" for name, side in zip(("width", "height"), input_size) if side % divisor]
    if bad:
        fits = ", ".join(f"{name} {max(divisor, round(side / divisor) * divisor)}"
                         for name, side in zip(("width", "height"), input_size))
        raise TaskError(
            f"{' and '.join(bad)} must be multiples of {divisor} for the {spec.describe()} network (its "
            f"encoder halves the input {divisor.bit_length() - 1} times); for example {fits}",
            where="input_size",
        )


def network_record(spec: NetworkSpec) -> dict:
    """The `network` entry of a checkpoint's config.json."""
    record: dict = {"arch": spec.arch}
    if spec.encoder is not None:
        record["encoder"] = spec.encoder
    return {**record, "size_divisor": size_divisor(spec), "input_normalization": INPUT_NORMALIZATION}


def read_network_record(config: dict, where: str | os.PathLike) -> NetworkSpec:
    """The network a checkpoint's config.json records; one without a record is the legacy UNet v2
    (every checkpoint written before networks could be chosen, and every legacy one)."""
    record = config.get("network")
    if record is None:
        return LEGACY_NETWORK
    if not isinstance(record, dict) or record.get("arch") not in ARCHS:
        raise TaskError(f"network must be {{\"arch\": one of {', '.join(ARCHS)}, ...}}, got {record!r}", where=where)
    encoder = record.get("encoder")
    if record["arch"] == "unet" and encoder not in ENCODER_NAMES:
        raise TaskError(f"network.encoder {encoder!r} is not one of {', '.join(ENCODER_NAMES)}: the model comes "
                        "from a newer sly-unet, or the file was edited", where=where)
    normalization = record.get("input_normalization", INPUT_NORMALIZATION)
    if normalization != INPUT_NORMALIZATION:
        raise TaskError(
            f"the model takes input normalised with {normalization}, this sly-unet feeds "
            f"{INPUT_NORMALIZATION}: the model comes from another version", where=where,
        )
    return NetworkSpec(record["arch"], encoder if record["arch"] == "unet" else None)


def load_encoder_start(model: nn.Module, spec: NetworkSpec, weights: str | None) -> None:
    """Fill the encoder from `weights` (network.encoder_weights: "imagenet", a path, or None for none),
    strictly by name; TaskError naming the file and the keys at fault."""
    where = "network.encoder_weights" if weights in (None, "imagenet") else weights
    name = "vgg16_bn" if spec.arch == "unet_v2" else spec.encoder
    state = encoder_weights_state_dict(weights, name)
    if state is None:
        return
    if spec.arch == "unet_v2":
        # torchvision's features.{k} -> the legacy encoder_blocks.{b}.{k}, then relative to encoder_blocks.
        prefix = "encoder_blocks."
        state = {key[len(prefix):]: tensor for key, tensor in vgg16_bn_to_unet(state).items()}
        load_encoder_weights(model.encoder_blocks, state, name, where)
    else:
        load_encoder_weights(model.encoder, state, name, where)
    log.info(f"the {name} encoder starts from the {weights} weights; the decoder from a random initialisation",
             extra={"encoder_weights": weights})
