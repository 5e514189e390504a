"""The training step at device speed: mixed precision keeps the numbers, and a step reads nothing back
from the device (a GPU would wait for the host at each such read)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from plugin.config.typed import LEGACY_NETWORK
from plugin.nn.network import create_network
from plugin.nn.precision import FLOAT32, Precision, cpu_has_bf16_matrix_units, resolve_precision
from plugin.task_dir import TaskDir
from plugin.training.data import create_loader
from plugin.training.guard import snapshot_buffers
from plugin.training.log_interval import iterations_between_lines
from plugin.training.loop import Loop
from plugin.training.sampler import EpochSampler
from plugin.training.schedule import create_optimizer
from plugin.training.step import loss_fn, train_step
from plugin.training.task import read_datasets
from tests.conftest import TINY_CONFIG, make_task, run_entrypoint

# What makes the host wait for a GPU: a scalar read (item, bool, float, int; inside torch too, where
# it dispatches to _local_scalar_dense) or a copy to host memory.
HOST_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"}


class HostReads(TorchFunctionMode):
    """Counts the host reads of tensors made while it is active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


class ScalarReads(TorchDispatchMode):
    """Counts scalar reads at the dispatcher: also those inside torch (an optimizer's step count)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _fit_in_process(root: Path, n_train: int) -> tuple[dict[str, int], int]:
    """Host reads of a whole 1-epoch Loop.fit() on n_train 32x32 images (batch 2), one METRICS line per
    epoch and one validation at its end."""
    config = dict(TINY_CONFIG, input_size={"width": 32, "height": 32}, augmentations=False,
                  log_every={"seconds": None, "iterations": 1000})
    task = make_task(root, config, n_train=n_train, n_val=2, size=32)
    config, mapping, train, val = read_datasets(TaskDir(task))
    loaders = {
        "train": create_loader(train, 2, 0, sampler=EpochSampler(len(train), 0, 1, config.seed)),
        "val": create_loader(val, 2, 0),
    }
    torch.manual_seed(0)
    model = create_network(LEGACY_NETWORK, mapping.num_classes)
    functions, scalars = HostReads(), ScalarReads()
    with functions, scalars:
        Loop(model, loaders, config, mapping, torch.device("cpu"), writer=None).fit()
    return functions.counts, scalars.count


def test_training_steps_read_nothing_back_from_the_device(tmp_path):
    # The same run with 2 and with 6 iterations: whatever reads the host makes (one per METRICS line,
    # the validation) does not grow with the number of steps.
    reads_2, scalars_2 = _fit_in_process(tmp_path / "short", n_train=4)
    reads_6, scalars_6 = _fit_in_process(tmp_path / "long", n_train=12)
    assert reads_6 == reads_2, "host reads per training step (by name): more steps made more reads"
    assert scalars_6 == scalars_2, "scalar reads per training step, inside torch included"


def _one_step(precision: Precision, images: torch.Tensor, targets: torch.Tensor, config, model=None) -> tuple:
    torch.manual_seed(0)
    model = (create_network(LEGACY_NETWORK, 4) if model is None else model()).train()
    optimizer = create_optimizer(model, config)
    compute_loss = loss_fn(config, 4)
    scaler = precision.grad_scaler()
    result = train_step(model, model, optimizer, scaler, precision, compute_loss, images, targets, 1e-3,
                        snapshot_buffers(model))
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return result, grad, model, scaler


@pytest.fixture(scope="module")
def batch_and_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("amp") / "task"
    task = make_task(root, dict(TINY_CONFIG, augmentations=False), n_train=4, n_val=2)
    config, _, data, _ = read_datasets(TaskDir(task))
    samples = [data[i] for i in range(2)]
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples]), config


def _check_close(full, full_grad, mixed, mixed_grad, model, min_cosine: float) -> None:
    assert mixed.logits.dtype == torch.float32  # the loss and metrics see float32 logits
    assert not bool(mixed.skipped)
    assert torch.isfinite(mixed.loss) and all(torch.isfinite(p).all() for p in model.parameters())
    assert abs(mixed.loss.item() - full.loss.item()) < 0.01 * full.loss.item()
    cosine = torch.nn.functional.cosine_similarity(mixed_grad, full_grad, dim=0)
    assert cosine > min_cosine, f"the gradient's direction is off: cosine {cosine:.4f} to float32's"


def test_a_bfloat16_step_of_the_unet_is_finite_and_close_to_float32(batch_and_config):
    images, targets, config = batch_and_config
    full, full_grad, _, _ = _one_step(FLOAT32, images, targets, config)
    mixed, mixed_grad, model, _ = _one_step(Precision("cpu", torch.bfloat16, False), images, targets, config)
    # bfloat16 keeps 8 bits of mantissa: a loss within 1e-3 of float32's and a gradient a few degrees
    # off (cosine 0.96 measured on 2 images of 64x64), not a different one.
    _check_close(full, full_grad, mixed, mixed_grad, model, min_cosine=0.9)


def _small_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 4, 1))


def test_a_float16_step_scales_the_loss_and_stays_close_to_float32(batch_and_config):
    # A small network: CPUs emulate float16 convolutions, too slowly for the UNet in a test.
    images, targets, config = batch_and_config
    full, full_grad, _, _ = _one_step(FLOAT32, images, targets, config, _small_net)
    mixed, mixed_grad, model, scaler = _one_step(Precision("cpu", torch.float16, False), images, targets, config,
                                                 _small_net)
    _check_close(full, full_grad, mixed, mixed_grad, model, min_cosine=0.99)
    assert scaler.get_scale() == 65536.0  # no overflow: the scale stays; the resume state keeps it


def test_auto_precision_on_the_cpu_trains_in_bfloat16_only_on_matrix_units_and_predicts_in_float32():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).dtype is None  # inference and validation: exactly as ONNX
    expected = torch.bfloat16 if cpu_has_bf16_matrix_units() else None
    assert resolve_precision("auto", cpu, training=True).dtype == expected
    assert resolve_precision("bf16", cpu).dtype == torch.bfloat16
    assert resolve_precision("fp16", cpu, training=True).scales_gradients
    assert resolve_precision("off", cpu, training=True).dtype is None
    # oneDNN's kernels take NHWC: every setting runs channels_last on an x86 CPU.
    assert all(resolve_precision(amp, cpu).channels_last for amp in ("auto", "off", "bf16"))


def test_validation_runs_in_the_inference_precision_and_the_log_says_so(tmp_path):
    config = dict(TINY_CONFIG, input_size={"width": 32, "height": 32}, epochs=1, amp="auto")
    run = run_entrypoint("entrypoints.train", make_task(tmp_path / "task", config, n_train=2, size=32))
    assert run.returncode == 0, run.stderr[-3000:]
    [line] = [e for e in run.lines if e.get("amp") == "auto" and "val_precision" in e]
    trains = "bfloat16" if cpu_has_bf16_matrix_units() else "float32"
    assert (line["precision"], line["val_precision"]) == (trains, "float32")


def test_a_window_lasts_log_every_seconds_of_steps_or_its_iterations_whichever_is_fewer():
    assert iterations_between_lines(step_s=0.25, seconds=10, iterations=None) == 40
    assert iterations_between_lines(step_s=0.25, seconds=10, iterations=25) == 25
    assert iterations_between_lines(step_s=30.0, seconds=10, iterations=None) == 1  # a slow step: every step
    assert iterations_between_lines(step_s=0.0, seconds=10, iterations=None) == 1  # no timing yet


def test_train_metrics_are_logged_every_log_every_iterations_and_at_each_epoch_end(tmp_path):
    # 5 iterations an epoch, a line every 2: after iterations 2 and 4, and at the epoch's end.
    config = dict(TINY_CONFIG, input_size={"width": 32, "height": 32}, epochs=2, val_every=2,
                  log_every={"seconds": None, "iterations": 2})
    run = run_entrypoint("entrypoints.train", make_task(tmp_path / "task", config, n_train=10, size=32))
    assert run.returncode == 0, run.stderr[-3000:]
    train = [m for m in run.events("METRICS") if m["type"] == "train"]
    assert [m["epoch"] for m in train] == [0.4, 0.8, 1.0, 1.4, 1.8, 2.0]
    assert all(set(m["metrics"]) >= {"loss", "accuracy", "mean_iou", "dice"} for m in train)
    saved = json.loads((tmp_path / "task" / "task_config.json").read_text())
    assert saved["log_every"] == {"seconds": None, "iterations": 2}
