from __future__ import annotations

import copy

import pytest
import torch

from plugin.config.typed import LEGACY_NETWORK
from plugin.errors import TaskError
from plugin.nn.model import UNetV2
from plugin.nn.network import create_network

# The legacy network, written out from the spec: (vgg index, in channels, out channels) of the
# 3x3 convs in each encoder block; the BN sits at index + 1.
ENCODER_CONVS = {
    0: [(0, 3, 64), (3, 64, 64)],
    1: [(7, 64, 128), (10, 128, 128)],
    2: [(14, 128, 256), (17, 256, 256), (20, 256, 256)],
    3: [(24, 256, 512), (27, 512, 512), (30, 512, 512)],
    4: [(34, 512, 512), (37, 512, 512), (40, 512, 512)],
}
DECODER_BLOCKS = {0: (1024, 1024), 1: (1024, 512), 2: (512, 256), 3: (256, 128), 4: (128, 64)}
UPS = {0: (1024, 512), 1: (512, 256), 2: (256, 128), 3: (128, 64)}


def legacy_shapes(n_cls: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def bn(name: str, ch: int) -> None:
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{suffix}"] = (ch,)
        shapes[f"{name}.num_batches_tracked"] = ()

    for b, convs in ENCODER_CONVS.items():
        for idx, cin, cout in convs:
            conv(f"encoder_blocks.{b}.{idx}", cin, cout, 3)
            bn(f"encoder_blocks.{b}.{idx + 1}", cout)
    conv("bottle.conv", 512, 512, 3)
    bn("bottle.bn", 512)
    conv("bottle.conv2", 512, 512, 3)
    bn("bottle.bn2", 512)
    for i, (d, s) in UPS.items():
        conv(f"ups.{i}.conv", d, s, 1)
    for i, (cin, cout) in DECODER_BLOCKS.items():
        for j, c_in in enumerate((cin, cout, cout), start=1):
            conv(f"blocks.{i}.seq{j}.seq.0", c_in, cout, 3)
            bn(f"blocks.{i}.seq{j}.seq.1", cout)
    conv("last_conv", 64, n_cls, 1)
    return shapes


@pytest.fixture(scope="module")
def model3() -> UNetV2:
    return create_network(LEGACY_NETWORK, 3)


@pytest.fixture(scope="module")
def model2() -> UNetV2:
    torch.manual_seed(0)
    return create_network(LEGACY_NETWORK, 2)


def test_state_dict_names_and_shapes_match_legacy(model3: UNetV2) -> None:
    got = {name: tuple(t.shape) for name, t in model3.state_dict().items()}
    assert got == legacy_shapes(3)


def test_parameter_counts_match_legacy_figures(model3: UNetV2) -> None:
    assert sum(p.numel() for p in model3.parameters()) == 61_005_443
    unused = sum(p.numel() for n, p in model3.named_parameters() if n.startswith("blocks.0."))
    assert unused == 28_320_768


def test_layer_hyperparameters(model3: UNetV2) -> None:
    conv = model3.bottle.conv2
    assert (conv.dilation, conv.padding, conv.kernel_size) == ((2, 2), (2, 2), (3, 3))
    assert [type(b[0]).__name__ for b in model3.encoder_blocks] == ["Conv2d"] + ["MaxPool2d"] * 4
    assert [list(b._modules)[-1] for b in model3.encoder_blocks] == ["5", "12", "22", "32", "42"]
    assert model3.ups[2].up.mode == "nearest"


def test_forward_gives_logits_at_input_size_and_skips_blocks0(model2: UNetV2) -> None:
    model2.train()
    model2.zero_grad()
    x = torch.randn(2, 3, 32, 48)
    out = model2(x)
    assert out.shape == (2, 2, 32, 48)
    out.sum().backward()
    assert all(p.grad is None for p in model2.blocks[0].parameters())
    assert model2.encoder_blocks[0][0].weight.grad is not None
    assert model2.last_conv.weight.grad is not None
    model2.zero_grad()


def test_eval_forward_is_deterministic(model2: UNetV2) -> None:
    model2.eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model2(x), model2(x))


@pytest.mark.parametrize("shape", [(1, 3, 40, 32), (1, 3, 32, 24)])
def test_input_not_multiple_of_16_is_refused(model2: UNetV2, shape: tuple[int, ...]) -> None:
    with pytest.raises(TaskError, match="multiples of 16") as err:
        model2(torch.zeros(shape))
    assert f"{shape[2]}x{shape[3]}" in str(err.value)
    assert err.value.where == "input_size"


def test_non_rgb_input_is_refused(model2: UNetV2) -> None:
    with pytest.raises(TaskError, match="3, height, width"):
        model2(torch.zeros(1, 1, 32, 32))


def test_sync_batchnorm_conversion_keeps_the_legacy_names(model3: UNetV2) -> None:
    # What DDP training does first; checkpoints must still load into a plain model afterwards.
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model3))
    assert isinstance(converted.bottle.bn, torch.nn.SyncBatchNorm)
    assert {n: tuple(t.shape) for n, t in converted.state_dict().items()} == legacy_shapes(3)
