from __future__ import annotations

import copy
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from plugin.config.typed import LEGACY_NETWORK
from plugin.errors import TaskError
from plugin.nn.model import UNetV2
from plugin.nn.network import create_network, load_encoder_start
from plugin.nn.weights import (
    load_continue,
    load_state_dict,
    load_transfer,
    strip_module_prefix,
    vgg16_bn_to_unet,
)


class CreatesMarker:
    """Unpickling this calls open(marker, "w"): a stand-in for a malicious payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class Custom:
    pass


@pytest.fixture(scope="module")
def template2() -> UNetV2:
    torch.manual_seed(1)
    return create_network(LEGACY_NETWORK, 2)


@pytest.fixture
def model2(template2: UNetV2) -> UNetV2:
    return copy.deepcopy(template2)


@pytest.fixture(scope="module")
def legacy3_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model.pt as the legacy plugin saved it: a 3-class DataParallel state dict (`module.` names)."""
    torch.manual_seed(2)
    sd = create_network(LEGACY_NETWORK, 3).state_dict()
    for tensor in sd.values():
        if tensor.is_floating_point():
            tensor.uniform_(-1, 1)  # distinguishable from any fresh init
    path = tmp_path_factory.mktemp("legacy") / "model.pt"
    torch.save(OrderedDict((f"module.{k}", v) for k, v in sd.items()), path)
    return path


def test_load_state_dict_reads_a_legacy_file(legacy3_file: Path) -> None:
    sd = load_state_dict(legacy3_file)
    assert "module.encoder_blocks.2.14.weight" in sd
    assert sd["module.last_conv.weight"].shape == (3, 64, 1, 1)
    assert all(t.device.type == "cpu" for t in sd.values())


def test_continue_loads_legacy_names_strictly(legacy3_file: Path) -> None:
    model = create_network(LEGACY_NETWORK, 3)
    sd = load_state_dict(legacy3_file)
    load_continue(model, sd, where=legacy3_file)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, sd[f"module.{name}"]), name


def test_transfer_loads_everything_but_last_conv(legacy3_file: Path, model2: UNetV2) -> None:
    sd = load_state_dict(legacy3_file)
    head_before = model2.last_conv.weight.clone()
    names = load_transfer(model2, sd, where=legacy3_file)
    own = model2.state_dict()
    assert names == [n for n in own if not n.startswith("last_conv.")]
    assert len(names) == len(own) - 2
    for name in names:
        assert torch.equal(own[name], sd[f"module.{name}"]), name
    assert torch.equal(model2.last_conv.weight, head_before)


def test_transfer_into_a_data_parallel_wrapper(legacy3_file: Path, model2: UNetV2) -> None:
    sd = load_state_dict(legacy3_file)
    names = load_transfer(nn.DataParallel(model2), sd)
    assert "encoder_blocks.0.0.weight" in names
    # DataParallel moves the model to cuda:0 where CUDA exists.
    assert torch.equal(model2.bottle.conv.weight.cpu(), sd["module.bottle.conv.weight"])


def test_strip_module_prefix() -> None:
    a, b = torch.zeros(1), torch.ones(1)
    assert strip_module_prefix({"module.x.weight": a, "y.bias": b}) == {"x.weight": a, "y.bias": b}
    with pytest.raises(TaskError, match="'x' appears both"):
        strip_module_prefix({"module.x": a, "x": b})


def test_vgg16_bn_mapping_at_block_boundaries() -> None:
    t = torch.zeros(1)
    names = [f"features.{k}.weight" for k in (0, 5, 6, 12, 13, 22, 23, 32, 33, 42)]
    sd = {n: t for n in names + ["features.4.running_var", "classifier.0.weight", "classifier.6.bias"]}
    assert set(vgg16_bn_to_unet(sd)) == {
        "encoder_blocks.0.0.weight", "encoder_blocks.0.5.weight", "encoder_blocks.1.6.weight",
        "encoder_blocks.1.12.weight", "encoder_blocks.2.13.weight", "encoder_blocks.2.22.weight",
        "encoder_blocks.3.23.weight", "encoder_blocks.3.32.weight", "encoder_blocks.4.33.weight",
        "encoder_blocks.4.42.weight", "encoder_blocks.0.4.running_var",
    }


def test_transfer_from_a_vgg16_bn_state_dict(model2: UNetV2) -> None:
    # Shaped as torchvision's vgg16_bn().state_dict(): features.{k}.* plus the classifier.
    vgg = {}
    for name, tensor in model2.state_dict().items():
        if name.startswith("encoder_blocks."):
            _, _, k, rest = name.split(".", 3)
            vgg[f"features.{k}.{rest}"] = torch.full_like(tensor, 7)
    vgg["classifier.0.weight"] = torch.zeros(4096, 25088 // 64)
    names = load_transfer(model2, vgg)
    assert names == [n for n in model2.state_dict() if n.startswith("encoder_blocks.")]
    assert torch.all(getattr(model2.encoder_blocks[2], "14").weight == 7)
    assert torch.all(getattr(model2.encoder_blocks[4], "41").running_mean == 7)


def test_transfer_shape_mismatch_names_parameter_and_both_shapes(template2: UNetV2) -> None:
    sd = {k: v.clone() for k, v in template2.state_dict().items()}
    sd["encoder_blocks.1.7.weight"] = torch.zeros(32, 64, 3, 3)
    with pytest.raises(TaskError) as err:
        load_transfer(template2, sd, where="model/model.pt")
    text = str(err.value)
    assert text.startswith("model/model.pt: ")
    assert "encoder_blocks.1.7.weight: weights (32, 64, 3, 3) vs model (128, 64, 3, 3)" in text


def test_transfer_with_no_matching_name_is_an_error(template2: UNetV2) -> None:
    with pytest.raises(TaskError, match="no tensor name in the weights matches"):
        load_transfer(template2, {"backbone.conv1.weight": torch.zeros(3)})


def test_continue_shape_mismatch_names_parameter_and_both_shapes(legacy3_file: Path, template2: UNetV2) -> None:
    with pytest.raises(TaskError) as err:
        load_continue(template2, load_state_dict(legacy3_file), where=legacy3_file)
    text = str(err.value)
    assert str(legacy3_file) in text
    assert "last_conv.weight: weights (3, 64, 1, 1) vs model (2, 64, 1, 1)" in text
    assert "last_conv.bias: weights (3,) vs model (2,)" in text


def test_continue_lists_missing_and_extra_names(template2: UNetV2) -> None:
    sd = {f"module.{k}": v.clone() for k, v in template2.state_dict().items()}
    del sd["module.bottle.conv.weight"], sd["module.ups.3.conv.bias"]
    sd["module.aux_head.weight"] = torch.zeros(1)
    with pytest.raises(TaskError) as err:
        load_continue(template2, sd)
    text = str(err.value)
    assert "2 model tensors are missing from the weights: bottle.conv.weight, ups.3.conv.bias" in text
    assert "1 tensors in the weights are not in the model: aux_head.weight" in text


def test_continue_tolerates_absent_counters_and_unused_block0(model2: UNetV2) -> None:
    sd = {k: torch.full_like(v, 3) for k, v in model2.state_dict().items()
          if not k.endswith("num_batches_tracked") and not k.startswith("blocks.0.")}
    block0_before = model2.blocks[0].seq1.seq[0].weight.clone()
    load_continue(model2, sd)
    assert torch.all(model2.bottle.bn2.running_var == 3)
    assert torch.equal(model2.blocks[0].seq1.seq[0].weight, block0_before)


def test_pickled_code_is_refused_and_never_run(tmp_path: Path) -> None:
    # The payload works when unpickled without restrictions...
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(CreatesMarker(probe))).close()
    assert probe.exists()
    # ...but load_state_dict refuses it before anything is constructed.
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "payload": CreatesMarker(marker)}, path)
    with pytest.raises(TaskError) as err:
        load_state_dict(path)
    text = str(err.value)
    assert text.startswith(f"{path}: not a plain state dict")
    assert "no code in it was run" in text
    assert "weights_only=False" not in text
    assert not marker.exists()


def test_custom_class_instance_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "custom.pt"
    torch.save({"w": torch.zeros(2), "obj": Custom()}, path)
    with pytest.raises(TaskError, match="not a plain state dict.*no code in it was run.*Custom"):
        load_state_dict(path)


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ([torch.zeros(1)], "holds a list"),
        ({"w": torch.zeros(1), "epoch": 3}, "'epoch' \\(int\\)"),
        ({}, "empty"),
    ],
)
def test_non_state_dict_objects_are_refused(tmp_path: Path, obj: object, expected: str) -> None:
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    with pytest.raises(TaskError, match=expected):
        load_state_dict(path)


def test_checkpoint_wrapping_a_state_dict_is_unwrapped(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"a.weight": torch.ones(2)}, "epoch": 4}, path)
    assert list(load_state_dict(path)) == ["a.weight"]


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(TaskError, match="not a readable PyTorch weights file"):
        load_state_dict(garbage)
    with pytest.raises(TaskError, match="weights file not found"):
        load_state_dict(tmp_path / "absent.pt")


def test_unet_v2_starts_from_a_torchvision_vgg16_bn_file(tmp_path):
    # torchvision's names (features.{k}.*, classifier.*) of a VGG16-BN, here made from another UNet v2's
    # encoder: network.encoder_weights fills the encoder with them, strictly, and nothing else.
    source = create_network(LEGACY_NETWORK, 3)
    vgg = {re.sub(r"^encoder_blocks\.\d+\.", "features.", name): tensor
           for name, tensor in source.state_dict().items() if name.startswith("encoder_blocks.")}
    vgg["classifier.0.weight"] = torch.zeros(4096, 25088)
    torch.save(vgg, tmp_path / "vgg16_bn.pth")
    model = create_network(LEGACY_NETWORK, 2)
    decoder_before = model.last_conv.weight.clone()
    load_encoder_start(model, LEGACY_NETWORK, str(tmp_path / "vgg16_bn.pth"))
    for name, tensor in model.encoder_blocks.state_dict().items():
        assert torch.equal(tensor, source.encoder_blocks.state_dict()[name]), name
    assert torch.equal(model.last_conv.weight, decoder_before)
    del vgg["features.40.weight"]
    torch.save(vgg, tmp_path / "vgg16_bn.pth")
    with pytest.raises(TaskError, match=r"vgg16_bn.pth: these weights are not vgg16_bn's: 1 missing tensors \(4.40.weight"):
        load_encoder_start(model, LEGACY_NETWORK, str(tmp_path / "vgg16_bn.pth"))
