"""`make bench`, networks part: training and inference images/s of each network on the same inputs.

A training step is forward, loss, backward and an AdamW step on a batch of random images at
size x size; inference is the eval-mode forward and softmax. The figure that matters on a CPU is the
ratio of training steps the default network makes in a budget to the legacy UNet v2's (target >= 6).
Each step runs under the precision that `amp` (--amp, default auto) picks for it: with auto, on CUDA
autocast, on a CPU with bfloat16 matrix units (AMX) a bfloat16 training step and a float32 inference.
`make bench` prints auto and off: AMX speeds the legacy network's dense 3x3 convolutions far more
than anything in the default (whose depthwise convolutions run in float32 even then), so the step
ratio depends on the precision.

Run alone: .venv/bin/python -m benchmarks.networks [--size 256 --batch 4 --steps 3] [--device cuda --size 512]
"""

from __future__ import annotations

import argparse
import time

import torch

from plugin.config.schema import DEFAULT_NETWORK
from plugin.config.typed import LEGACY_NETWORK, NetworkSpec
from plugin.format.classes import NEUTRAL_INDEX
from plugin.nn.losses import segmentation_loss
from plugin.nn.network import create_network
from plugin.nn.precision import AMP_SETTINGS, Precision, prepare_model, resolve_precision

NETWORKS = {
    "unet/efficientnet_lite0 (default)": DEFAULT_NETWORK.spec,
    "unet/resnet18": NetworkSpec("unet", "resnet18"),
    "unet/resnet34": NetworkSpec("unet", "resnet34"),
    "unet_v2 (legacy)": LEGACY_NETWORK,
}
CLASSES = 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_s(spec: NetworkSpec, size: int, batch: int, steps: int, device: torch.device,
                 training: Precision, inference: Precision) -> tuple[float, float]:
    """(train, inference) images/s, each the best of `steps` timed steps after one warm-up step."""
    torch.manual_seed(0)
    model = prepare_model(create_network(spec, CLASSES).to(device), training)
    # Fused, as the trainer's (training.schedule.create_optimizer).
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    images = torch.randn(batch, 3, size, size, device=device)
    targets = torch.randint(0, CLASSES, (batch, size, size), device=device)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = segmentation_loss(training.logits(model, images), targets, CLASSES, NEUTRAL_INDEX, 1.0, 1.0)
        loss.backward()
        optimizer.step()

    def infer_step() -> None:
        with torch.inference_mode():
            torch.softmax(inference.logits(model, images), dim=1)

    rates = []
    for step, mode in ((train_step, model.train), (infer_step, model.eval)):
        mode()
        best = float("inf")
        for _ in range(steps + 1):
            _sync(device)
            started = time.perf_counter()
            step()
            _sync(device)
            best = min(best, time.perf_counter() - started)
        rates.append(batch / best)
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--amp", choices=AMP_SETTINGS, default="auto", help="as the train config's amp (default: auto)")
    args = parser.parse_args()
    device = torch.device(args.device)
    training = resolve_precision(args.amp, device, training=True)
    inference = resolve_precision(args.amp, device)
    print(f"networks ({device.type}, training in {training.name}, inference in {inference.name}, batch {args.batch} "
          f"at {args.size}x{args.size}, best of {args.steps}); reproduce: .venv/bin/python -m benchmarks.networks "
          f"--device {args.device} --size {args.size} --batch {args.batch} --steps {args.steps} --amp {args.amp}",
          flush=True)
    rates = {}
    for name, spec in NETWORKS.items():
        rates[name] = images_per_s(spec, args.size, args.batch, args.steps, device, training, inference)
        print(f"  {name:<36} train {rates[name][0]:8.2f} img/s   inference {rates[name][1]:8.2f} img/s", flush=True)
    default, legacy = rates[next(iter(NETWORKS))][0], rates["unet_v2 (legacy)"][0]
    print(f"  training steps in the same budget, default / legacy: {default / legacy:.1f}x (target >= 6)")


if __name__ == "__main__":
    main()
