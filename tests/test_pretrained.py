"""The encoders' starting weights: ImageNet downloads through torch's hub cache, files, strict loads.

The downloads are real: a generated state-dict file is served over HTTP on loopback and IMAGENET_URLS
points at it, so torch.hub's download, hash check and cache run as they do against
download.pytorch.org, and a shut-down server stands for a container without network access.
"""

from __future__ import annotations

import functools
import hashlib
import socket
import threading
import time
from collections import OrderedDict
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from torch import nn

from plugin.errors import TaskError
from plugin.nn import encoders, pretrained
from plugin.nn.pretrained import (
    IMAGENET_URLS,
    encoder_weights_state_dict,
    imagenet_state_dict,
    load_encoder_weights,
)
from tests.test_weights import CreatesMarker


class ToyEncoder(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.bn = nn.BatchNorm2d(width)


class ToyClassifier(ToyEncoder):
    """ToyEncoder plus the classifier head that a published ImageNet file carries."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 10)


class Server:
    """A static file server on 127.0.0.1 that counts the requests it answered."""

    def __init__(self, directory: Path) -> None:
        self.requests = 0
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                super().do_GET()

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
            self.thread.join()
        self.httpd.server_close()


@pytest.fixture
def toy_prefixes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(encoders.CLASSIFIER_PREFIXES, "toy", ("head.",))


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """torch's hub cache dir, empty, under tmp_path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def served(tmp_path: Path):
    """A directory to put files in and the server that publishes it."""
    directory = tmp_path / "served"
    directory.mkdir()
    server = Server(directory)
    yield directory, server
    server.stop()


def published(directory: Path, name: str = "toy", hash_text: str | None = None) -> tuple[str, OrderedDict]:
    """Save a classifier's state dict as torchvision names its files (`<name>-<sha256 prefix>.pth`)."""
    torch.manual_seed(0)
    sd = ToyClassifier().state_dict()
    tmp = directory / "upload.tmp"
    torch.save(sd, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    file_name = f"{name}-{hash_text or digest}.pth"
    tmp.rename(directory / file_name)
    return file_name, sd


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ImageNet downloads


def test_download_once_then_the_cache_without_network(served, hub: Path, monkeypatch, capfd) -> None:
    directory, server = served
    file_name, sd = published(directory)
    monkeypatch.setitem(IMAGENET_URLS, "toy", f"{server.base}/{file_name}")

    assert_same(imagenet_state_dict("toy"), sd)
    assert sorted(p.name for p in hub.iterdir()) == [file_name]  # no partial download left beside it
    # Not a terminal: no progress bar in the log.
    assert capfd.readouterr().err == ""

    server.stop()
    assert_same(imagenet_state_dict("toy"), sd)
    assert server.requests == 1


def test_wrong_hash_in_the_name_is_refused_and_not_cached(served, hub: Path, monkeypatch) -> None:
    directory, server = served
    file_name, _ = published(directory, hash_text="00000000")
    url = f"{server.base}/{file_name}"
    monkeypatch.setitem(IMAGENET_URLS, "toy", url)

    with pytest.raises(TaskError, match="sha256") as info:
        imagenet_state_dict("toy")
    assert url in info.value.message
    assert list(hub.iterdir()) == []


def test_no_network_and_no_cache_says_where_to_put_the_file(served, hub: Path, monkeypatch) -> None:
    directory, server = served
    file_name, _ = published(directory)
    url = f"{server.base}/{file_name}"
    monkeypatch.setitem(IMAGENET_URLS, "toy", url)
    server.stop()

    with pytest.raises(TaskError) as info:
        imagenet_state_dict("toy")
    message = info.value.message
    assert info.value.where == "network.encoder_weights"
    assert url in message
    assert str(hub / file_name) in message
    assert "network.encoder_weights to the path" in message


def test_missing_file_on_the_server(served, hub: Path, monkeypatch) -> None:
    _, server = served
    url = f"{server.base}/toy-12345678.pth"
    monkeypatch.setitem(IMAGENET_URLS, "toy", url)

    with pytest.raises(TaskError, match="404") as info:
        imagenet_state_dict("toy", where="encoder")
    assert info.value.where == "encoder"
    assert url in info.value.message


def test_corrupt_cached_file_is_named(hub: Path, monkeypatch) -> None:
    # No server at all: a cached file must be read without a download.
    monkeypatch.setitem(IMAGENET_URLS, "toy", "http://127.0.0.1:9/toy-12345678.pth")
    hub.mkdir(parents=True)
    cached = hub / "toy-12345678.pth"
    cached.write_bytes(b"not a zip file")

    with pytest.raises(TaskError, match="delete the file") as info:
        imagenet_state_dict("toy")
    assert info.value.where == str(cached)


def test_unknown_encoder_has_no_imagenet_weights() -> None:
    with pytest.raises(TaskError, match="'resnet7'.*efficientnet_lite0.*resnet18"):
        imagenet_state_dict("resnet7")


def test_the_published_urls() -> None:
    assert IMAGENET_URLS["resnet18"].endswith("/resnet18-f37072fd.pth")
    assert IMAGENET_URLS["resnet34"].endswith("/resnet34-b627a593.pth")
    assert IMAGENET_URLS["vgg16_bn"].endswith("/vgg16_bn-6c64b313.pth")


# load_encoder_weights


def test_strict_load_drops_the_classifier_and_module_prefix(toy_prefixes) -> None:
    torch.manual_seed(0)
    source = ToyClassifier()
    encoder = ToyEncoder()
    sd = {f"module.{n}": t for n, t in source.state_dict().items()}

    load_encoder_weights(encoder, sd, "toy", "file.pth")

    assert_same(encoder.state_dict(), {n: t for n, t in source.state_dict().items() if not n.startswith("head.")})


def test_missing_counter_is_allowed(toy_prefixes) -> None:
    sd = ToyEncoder().state_dict()
    del sd["bn.num_batches_tracked"]
    load_encoder_weights(ToyEncoder(), sd, "toy", "file.pth")


def test_missing_unexpected_and_mis_shaped_in_one_error(toy_prefixes) -> None:
    sd = ToyEncoder().state_dict()
    del sd["conv.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["bn.weight"] = torch.ones(5)
    encoder = ToyEncoder()
    before = {n: t.clone() for n, t in encoder.state_dict().items()}

    with pytest.raises(TaskError) as info:
        load_encoder_weights(encoder, sd, "toy", Path("weights/file.pth"))
    message = info.value.message
    assert info.value.where == str(Path("weights/file.pth"))
    assert "not toy's" in message
    assert "1 missing tensors (conv.bias)" in message
    assert "1 unexpected tensors (extra.weight)" in message
    assert "bn.weight: file (5,) vs encoder (4,)" in message
    assert_same(encoder.state_dict(), before)  # nothing half-loaded


def test_an_encoder_without_a_classifier_entry_drops_nothing() -> None:
    # The legacy VGG16-BN: its classifier is gone before the load (weights.vgg16_bn_to_unet).
    sd = ToyEncoder().state_dict()
    load_encoder_weights(ToyEncoder(), sd, "vgg16_bn", "vgg.pth")
    with pytest.raises(TaskError, match="1 unexpected tensors \\(head.weight\\)"):
        load_encoder_weights(ToyEncoder(), {**sd, "head.weight": torch.zeros(1)}, "vgg16_bn", "vgg.pth")


def test_resnet18_weights_are_not_resnet34s() -> None:
    resnet18_sd = encoders.create_encoder("resnet18").state_dict()
    with pytest.raises(TaskError) as info:
        load_encoder_weights(encoders.create_encoder("resnet34"), resnet18_sd, "resnet34", "r18.pth")
    message = info.value.message
    assert "not resnet34's" in message
    assert "missing tensors (layer1.2." in message
    assert "torchvision" in message


def test_lite0_weights_are_not_resnet18s() -> None:
    lite0_sd = encoders.create_encoder("efficientnet_lite0").state_dict()
    with pytest.raises(TaskError, match="not resnet18's.*missing.*unexpected tensors \\(conv_stem.weight"):
        load_encoder_weights(encoders.create_encoder("resnet18"), lite0_sd, "resnet18", "lite0.pth")


def test_lite0_imagenet_weights_come_from_the_package_in_timm_names() -> None:
    sd = imagenet_state_dict("efficientnet_lite0")
    assert "conv_stem.weight" in sd
    assert "_conv_stem.weight" not in sd
    encoder = encoders.create_encoder("efficientnet_lite0")
    load_encoder_weights(encoder, sd, "efficientnet_lite0", "network.encoder_weights")
    assert torch.equal(encoder.state_dict()["conv_stem.weight"], sd["conv_stem.weight"])


# encoder_weights_state_dict


def test_null_is_random_init() -> None:
    assert encoder_weights_state_dict(None, "resnet18") is None


def test_a_path_is_read(tmp_path: Path, monkeypatch) -> None:
    sd = ToyEncoder().state_dict()
    torch.save(sd, tmp_path / "mine.pth")
    monkeypatch.chdir(tmp_path)
    assert_same(encoder_weights_state_dict("mine.pth", "toy"), sd)


def test_imagenet_is_downloaded(served, hub: Path, monkeypatch) -> None:
    directory, server = served
    file_name, sd = published(directory)
    monkeypatch.setitem(IMAGENET_URLS, "toy", f"{server.base}/{file_name}")
    assert_same(encoder_weights_state_dict("imagenet", "toy"), sd)


def test_missing_path_names_the_path_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(TaskError) as info:
        encoder_weights_state_dict(str(path), "resnet18")
    assert info.value.where == "network.encoder_weights"
    assert str(path) in info.value.message


def test_pickled_object_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "payload": CreatesMarker(marker)}, path)

    with pytest.raises(TaskError, match="no code in it was run") as info:
        encoder_weights_state_dict(str(path), "resnet18")
    assert info.value.where == str(path)
    assert not marker.exists()


def test_a_server_that_stops_answering_ends_the_download(hub: Path, monkeypatch) -> None:
    # A listening socket that never accepts: the connection completes in the kernel's backlog and
    # the request goes out, but no byte ever comes back.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/toy-12345678.pth"
    monkeypatch.setitem(IMAGENET_URLS, "toy", url)
    monkeypatch.setattr(pretrained, "DOWNLOAD_STALL_SECONDS", 0.5)
    start = time.monotonic()
    try:
        with pytest.raises(TaskError, match="no data for 0.5 s") as info:
            imagenet_state_dict("toy")
    finally:
        silent.close()
    assert time.monotonic() - start < 10
    assert url in info.value.message
    assert list(hub.iterdir()) == []  # the partial file is gone
    assert socket.getdefaulttimeout() is None  # the process's default is back
