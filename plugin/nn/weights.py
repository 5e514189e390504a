"""Reading weight files safely and loading them into a network for transfer learning or continued training.

Files are read with `torch.load(weights_only=True, map_location="cpu")`: the restricted unpickler
refuses any pickled object other than tensors and plain containers *before* constructing it, so no
code from a weights file ever runs, and CUDA-saved tensors load on a CPU-only machine.

Accepted names: the model's own (`encoder_blocks.0.0.weight`), the legacy DataParallel names
(`module.encoder_blocks.0.0.weight`) and, for transfer learning, a torchvision VGG16-BN state dict
(`features.0.weight`), which fills the encoder with e.g. ImageNet weights.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from plugin.errors import TaskError
from plugin.nn.model import ENCODER_CUTS, UNUSED_PREFIX

log = logging.getLogger(__name__)

# The two files of a model folder (model/ in a task dir, each checkpoint in results/).
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.pt"

_MODULE_PREFIX = "module."
_VGG_FEATURE = re.compile(r"features\.(\d+)\.(.+)")
_LIST_LIMIT = 10


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The name -> tensor dict stored in `path`, on the CPU.

    A checkpoint dict that wraps the weights as {"state_dict": {...}, ...} (as PyTorch Lightning
    and many training scripts save them) is unwrapped, since users hand us such files expecting
    them to work. Anything else that is not a dict of str -> Tensor is refused with a TaskError.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskError("weights file not found", where=path)
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(exc)
        if detail.startswith("Unsupported operand"):
            raise TaskError(f"not a readable PyTorch weights file ({detail})", where=path) from exc
        raise TaskError(
            "not a plain state dict: the file holds pickled Python objects besides tensors, which "
            f"are refused for safety; no code in it was run ({detail})",
            where=path,
        ) from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, zip errors... for unreadable files
        raise TaskError(f"not a readable PyTorch weights file: {type(exc).__name__}: {_first_line(exc)}",
                        where=path) from exc

    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and not _is_tensor_dict(obj):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise TaskError(f"not a plain state dict: the file holds a {type(obj).__name__}, not a dict of "
                        "parameter name -> tensor", where=path)
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise TaskError(f"not a plain state dict: entries that are not name -> tensor: {short_list(bad)}",
                        where=path)
    if not obj:
        raise TaskError("the state dict is empty", where=path)
    return dict(obj)


def strip_module_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors without DataParallel's / DDP's `module.` name prefix; names without it are kept."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        short = name[len(_MODULE_PREFIX):] if name.startswith(_MODULE_PREFIX) else name
        if short in out:
            raise TaskError(f"{short!r} appears both with and without the 'module.' prefix", where="state dict")
        out[short] = tensor
    return out


def vgg16_bn_to_unet(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision vgg16_bn names `features.{k}.*` -> `encoder_blocks.{b}.{k}.*`.

    b is the encoder block holding layer k (0 for k <= 5, 1 for k <= 12, 2 for k <= 22, 3 for
    k <= 32, 4 for k <= 42). Other tensors (the VGG classifier) have no place in the UNet and are
    dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        match = _VGG_FEATURE.fullmatch(name)
        if match is None:
            continue
        k = int(match.group(1))
        block = next((b for b, cut in enumerate(ENCODER_CUTS) if k <= cut), None)
        if block is not None:
            out[f"encoder_blocks.{block}.{k}.{match.group(2)}"] = tensor
    return out


def load_transfer(model: nn.Module, sd: dict[str, torch.Tensor], where: str | os.PathLike = "weights") -> list[str]:
    """Copy every tensor whose name is in the model, except the class-dependent `last_conv`.

    Names are taken with or without the `module.` prefix; a VGG16-BN dict is mapped onto the
    encoder first. Names on only one side are skipped (legacy behaviour) and counted in a warning;
    a shape mismatch, or no name in common at all, is a TaskError naming `where`.
    Returns the names loaded, in the model's order.
    """
    model = _unwrap(model)
    sd = strip_module_prefix(sd)
    if any(_VGG_FEATURE.fullmatch(n) for n in sd) and not any(n.startswith("encoder_blocks.") for n in sd):
        sd = vgg16_bn_to_unet(sd)
    own = model.state_dict()
    take = {n: t for n, t in sd.items() if n in own and "last_conv" not in n}
    _check_shapes(own, take, where)
    if not take:
        raise TaskError("no tensor name in the weights matches the model (apart from last_conv), "
                        f"e.g. {short_list(list(sd))}; is this a checkpoint of the same network (or, for UNet v2, "
                        "a VGG16-BN weights file)?", where=where)
    missing = [n for n in own if n not in take and "last_conv" not in n and not is_counter(n)]
    extra = [n for n in sd if n not in own]
    if missing or extra:
        log.warning(
            f"transfer learning: {len(missing)} model tensors are not in the weights and keep their initial "
            f"values; {len(extra)} tensors in the weights are not in the model and are ignored",
            extra={"weights": str(where), "missing": missing[:_LIST_LIMIT], "unexpected": extra[:_LIST_LIMIT]},
        )
    model.load_state_dict(take, strict=False)
    return [n for n in own if n in take]


def load_continue(model: nn.Module, sd: dict[str, torch.Tensor], where: str | os.PathLike = "weights") -> None:
    """Load every tensor of the model from sd (names with or without `module.`), strictly.

    Unlike the legacy loader, which left missing tensors at their initial values, names missing
    from sd are a TaskError as are unexpected names and shape mismatches. Two exceptions, because
    their values cannot affect the predictions: the BatchNorm `num_batches_tracked` counters
    (absent from files saved by old torch versions) and the unused `blocks.0` (a slimmed file may
    leave it out); both keep their current values.
    """
    model = _unwrap(model)
    sd = strip_module_prefix(sd)
    own = model.state_dict()
    extra = [n for n in sd if n not in own]
    missing = [n for n in own if n not in sd and not is_counter(n) and not n.startswith(UNUSED_PREFIX)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} model tensors are missing from the weights: {short_list(missing)}")
    if extra:
        problems.append(f"{len(extra)} tensors in the weights are not in the model: {short_list(extra)}")
    if problems:
        raise TaskError("cannot continue training from these weights: " + "; ".join(problems), where=where)
    _check_shapes(own, sd, where)
    model.load_state_dict({**own, **sd}, strict=True)


def _check_shapes(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    bad = [f"{n}: weights {tuple(t.shape)} vs model {tuple(own[n].shape)}"
           for n, t in sd.items() if n in own and t.shape != own[n].shape]
    if bad:
        raise TaskError(f"tensor shapes do not match the model: {short_list(bad)}", where=where)


def _unwrap(model: nn.Module) -> nn.Module:
    # DataParallel / DistributedDataParallel keep the real network in .module.
    wrapped = isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))
    return model.module if wrapped else model


def _is_tensor_dict(obj: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def is_counter(name: str) -> bool:
    """Whether `name` is a BatchNorm `num_batches_tracked` counter, which does not affect the outputs."""
    return name.endswith(".num_batches_tracked")


def short_list(items: list[str]) -> str:
    """The first few items, comma-separated, and how many more there are: for error messages."""
    head = ", ".join(items[:_LIST_LIMIT])
    return head + (f" and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else "")


def _unpickler_detail(exc: pickle.UnpicklingError) -> str:
    # torch's message is a page of advice (including "set weights_only=False", which we must not
    # suggest); the restricted unpickler's own reason is the part the user needs.
    text = str(exc)
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    reason = match.group(1).strip() if match else _first_line(exc)
    return re.sub(r"\s*Please use `torch\.serialization.*", "", reason)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
