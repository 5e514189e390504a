"""The training mask cache (tmp/mask_cache): reuse, corruption, staleness, sharing between processes;
and the `masks` command's workers. Real files and processes throughout."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from plugin.config.typed import RESIZE, Scale, parse_steps
from plugin.errors import Stopped, TaskError
from plugin.format.classes import create_mapping
from plugin.format.masks import write_masks
from plugin.format.project import list_items, read_meta
from plugin.nn.devices import WorldPlan
from plugin.training import distributed, stop
from plugin.training.augment import create_augmenter
from plugin.training.data import CorruptionBudget, SegmentationDataset, prepare_masks
from plugin.training.mask_cache import MaskCache, load_masks
from tests.conftest import REPO
from tests.test_masks import poly, rect, write_project

SIZES = [(40, 60), (33, 50), (64, 48), (20, 20)]


def create_project(root: Path) -> Path:
    images = {}
    for i, (height, width) in enumerate(SIZES):
        objects = [rect("b", [[i, 2], [width // 2, height - 3]]), poly("a", [[5, 5], [width + 9, 9], [12, height]])]
        images[("ds", f"im{i}.png")] = ({"size": {"height": height, "width": width}, "tags": [], "objects": objects},
                                       (height, width))
    return write_project(root, images)


def load(project: Path, folder: Path, size=(24, 16), token: str = "run", builder: bool = True, allowed: int = 0):
    meta = read_meta(project)
    mapping = create_mapping(meta, "bg", "neutral")
    cache = MaskCache(folder, builder=builder, token=token, workers=2)
    return load_masks(list_items(project), meta, mapping, size, CorruptionBudget.create("train", allowed), cache, "train")


def uncached(project: Path, size=(24, 16)) -> list[np.ndarray]:
    meta = read_meta(project)
    return prepare_masks(list_items(project), meta, create_mapping(meta, "bg", "neutral"), size,
                         CorruptionBudget.create("train", 0))[1]


def assert_same(masks: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(masks) == len(expected)
    for got, want in zip(masks, expected):
        assert got.shape == want.shape and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("size", [(24, 16), 0.5, 1.0])
def test_cached_masks_are_the_uncached_ones_memory_mapped_read_only(tmp_path, size):
    project = create_project(tmp_path / "p")
    kept, masks = load(project, tmp_path / "cache", size)
    assert kept == list_items(project)
    assert_same(masks, uncached(project, size))
    assert all(isinstance(m, np.memmap) and not m.flags.writeable for m in masks)
    with pytest.raises(ValueError, match="read-only"):
        masks[0][0, 0] = 7


def test_a_second_build_reads_the_cache_and_draws_nothing(tmp_path, caplog):
    project = create_project(tmp_path / "p")
    folder = tmp_path / "cache"
    with caplog.at_level(logging.INFO):
        load(project, folder, token="first")
    pack = folder / "train.pack"
    before = pack.stat()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _, masks = load(project, folder, token="second")
    assert f"masks: 4 of 4 from the cache {folder}" in caplog.text
    assert (pack.stat().st_mtime_ns, pack.stat().st_ino) == (before.st_mtime_ns, before.st_ino)  # not rewritten
    assert (folder / "train.ready").read_text() == "second"
    assert_same(masks, uncached(project))


def entry(folder: Path, name: str) -> dict:
    data = (folder / "train.pack").read_bytes()
    return next(e for e in json.loads(data[data.rindex(b'{"items"'):])["items"] if e["name"] == name)


def test_a_flipped_pixel_is_found_warned_about_and_drawn_again(tmp_path, caplog):
    project = create_project(tmp_path / "p")
    folder = tmp_path / "cache"
    load(project, folder)
    second = entry(folder, "ds/im1.png")
    with open(folder / "train.pack", "r+b") as file:
        file.seek(second["at"] + 5)
        byte = file.read(1)
        file.seek(second["at"] + 5)
        file.write(bytes([byte[0] ^ 0x40]))
    with caplog.at_level(logging.INFO):
        _, masks = load(project, folder, token="again")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(folder / "train.pack") in warnings[0]
    assert "1 masks failed their checksum (the first: ds/im1.png)" in warnings[0]
    assert "3 of 4 from the cache" in caplog.text and "1 drawn" in caplog.text
    assert_same(masks, uncached(project))


def test_a_truncated_pack_is_rebuilt(tmp_path, caplog):
    project = create_project(tmp_path / "p")
    folder = tmp_path / "cache"
    load(project, folder)
    pack = folder / "train.pack"
    pack.write_bytes(pack.read_bytes()[:-40])
    with caplog.at_level(logging.INFO):
        _, masks = load(project, folder, token="again")
    assert f"the mask cache {pack} is unreadable" in caplog.text
    assert "0 of 4 from the cache" in caplog.text
    assert_same(masks, uncached(project))


def test_a_changed_annotation_gets_a_new_entry(tmp_path, caplog):
    project = create_project(tmp_path / "p")
    folder = tmp_path / "cache"
    _, old = load(project, folder)
    old = [np.array(m) for m in old]
    ann_path = project / "ds" / "ann" / "im2.png.json"
    ann = json.loads(ann_path.read_text())
    ann["objects"] = [rect("b", [[0, 0], [47, 63]])]
    ann_path.write_text(json.dumps(ann))
    with caplog.at_level(logging.INFO):
        _, masks = load(project, folder, token="again")
    assert "3 of 4 from the cache" in caplog.text and "1 drawn" in caplog.text
    assert not np.array_equal(masks[2], old[2]) and set(np.unique(masks[2])) == {2}
    assert_same(masks, uncached(project))


def test_a_renamed_image_reuses_its_mask_under_the_new_name(tmp_path, caplog):
    project = create_project(tmp_path / "p")
    folder = tmp_path / "cache"
    load(project, folder)
    (project / "ds" / "img" / "im0.png").rename(project / "ds" / "img" / "im9.png")
    (project / "ds" / "ann" / "im0.png.json").rename(project / "ds" / "ann" / "im9.png.json")
    with caplog.at_level(logging.INFO):
        kept, masks = load(project, folder, token="again")
    assert [item.name for item in kept] == ["im1.png", "im2.png", "im3.png", "im9.png"]
    assert "4 of 4 from the cache" in caplog.text
    assert_same(masks, uncached(project))


def test_corrupted_items_spend_the_budget_on_every_run(tmp_path, caplog):
    project = create_project(tmp_path / "p")
    cv2.imwrite(str(project / "ds" / "img" / "im3.png"), np.zeros((21, 20, 3), np.uint8))  # not the annotation's size
    meta = read_meta(project)
    expected = prepare_masks(list_items(project), meta, create_mapping(meta, "bg", "neutral"), (24, 16),
                             CorruptionBudget.create("train", 1))
    for token in ("first", "second"):  # drawn, then from the cache
        caplog.clear()
        kept, masks = load(project, tmp_path / "cache", token=token, allowed=1)
        assert kept == expected[0] and [item.name for item in kept] == ["im0.png", "im1.png", "im2.png"]
        assert_same(masks, expected[1])
        assert "skipping a corrupted sample (1 of 1 allowed in the train split)" in caplog.text
        with pytest.raises(TaskError, match=r"im3.png is 20x21; more than allow_corrupted_samples.train = 0"):
            load(project, tmp_path / "cache", token=token + "-strict", allowed=0)


def _wait_for_masks(project: Path, folder: Path, results) -> None:
    _, masks = load(project, folder, token="shared", builder=False)
    results.put([m.tobytes() for m in masks])


def test_a_waiting_process_draws_nothing_and_maps_the_builders_masks(tmp_path):
    project = create_project(tmp_path / "p")
    folder = tmp_path / "cache"
    folder.mkdir()
    results = multiprocessing.get_context("fork").Queue()
    waiter = multiprocessing.get_context("fork").Process(target=_wait_for_masks, args=(project, folder, results))
    waiter.start()
    try:
        time.sleep(1.0)
        assert waiter.is_alive() and sorted(p.name for p in folder.iterdir()) == []  # it waits, writes nothing
        _, masks = load(project, folder, token="shared")
        assert results.get(timeout=30) == [m.tobytes() for m in masks]
    finally:
        waiter.join(timeout=30)
        if waiter.is_alive():
            waiter.kill()
    assert waiter.exitcode == 0


def _rank_masks(ctx: distributed.DistContext, project: Path, folder: Path) -> list[tuple]:
    meta = read_meta(project)
    cache = MaskCache(folder, builder=ctx.local_rank == 0, token=distributed.broadcast_from_main(f"{time.time()}"))
    _, masks = load_masks(list_items(project), meta, create_mapping(meta, "bg", "neutral"), (24, 16),
                          CorruptionBudget.create("train", 0), cache, "train")
    pack = (folder / "train.pack").stat()
    summary = (pack.st_ino, pack.st_mtime_ns, [m.tobytes() for m in masks], all(m.filename for m in masks))
    gathered = [None, None]
    import torch.distributed as dist

    dist.all_gather_object(gathered, summary)
    return gathered


def test_two_processes_share_one_build(tmp_path):
    project = create_project(tmp_path / "p")
    folder = tmp_path / "cache"
    rank0, rank1 = distributed.launch(WorldPlan(2, ()), _rank_masks, (project, folder))
    assert rank0 == rank1  # the same file, written once, mapped by both
    assert rank0[2] == [m.tobytes() for m in uncached(project)] and rank0[3]
    assert sorted(p.name for p in folder.iterdir()) == ["train.pack", "train.ready"]


def test_masks_command_writes_the_same_files_with_two_workers(tmp_path):
    project = create_project(tmp_path / "p")
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        assert write_masks(project, out, "bg", "neutral", workers) == len(SIZES)
        outputs[workers] = {
            str(p.relative_to(out)): (cv2.imread(str(p), cv2.IMREAD_UNCHANGED).tobytes() if p.suffix == ".png"
                                      else p.read_bytes())
            for p in sorted(out.rglob("*")) if p.is_file()
        }
    assert outputs[1] == outputs[2] and len(outputs[1]) == len(SIZES) + 1


def test_the_masks_command_imports_neither_torch_nor_the_schema_validator(tmp_path):
    project = create_project(tmp_path / "p")
    code = (f"import sys; from plugin.cli import main; main(['masks', '--project', {str(project)!r}, '--out', "
            f"{str(tmp_path / 'out')!r}, '--log-format', 'json']); "
            "print([m for m in ('torch', 'jsonschema', 'albumentations') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "class_title_to_idx.json").is_file()


@pytest.mark.parametrize("scale", [RESIZE, Scale("crop", 1.0)], ids=["resize", "crop"])
def test_samples_from_the_read_only_masks_are_those_of_the_uncached_ones(tmp_path, scale):
    # Every augmentation step and the crop read the cached masks without writing into them.
    steps = parse_steps([{"name": n, "p": 1.0} for n in ("hflip", "vflip", "rotate90")]
                        + [{"name": "affine", "scale": [0.8, 1.2], "rotate": [-40, 40], "p": 1.0},
                           {"name": "elastic", "alpha": 400, "sigma": 8, "p": 1.0}])
    project = create_project(tmp_path / "p")
    size = (24, 24) if not scale.crops else 1.0
    items, cached = load(project, tmp_path / "cache", size)
    budget = CorruptionBudget.create("train", 0)
    datasets = [SegmentationDataset(items, masks, (24, 24), budget, create_augmenter(steps), 3, scale, 0.5)
                for masks in (cached, uncached(project, size))]
    for index in range(len(items)):
        (image, mask), (want_image, want_mask) = (d.sample(index) for d in datasets)
        np.testing.assert_array_equal(image, want_image)
        np.testing.assert_array_equal(mask, want_mask)
    assert all(not m.flags.writeable for m in cached)


@pytest.mark.parametrize("builder", [True, False], ids=["builder", "waiter"])
def test_a_stop_signal_ends_the_build_or_the_wait(tmp_path, builder):
    project = create_project(tmp_path / "p")
    folder = tmp_path / "cache"
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # recorded by the handler, as docker stop's would be
        start = time.monotonic()
        with pytest.raises(Stopped):
            load(project, folder, builder=builder)
        assert time.monotonic() - start < 5
    finally:
        stop.uninstall()
    assert not folder.exists() or not list(folder.iterdir())  # no pack, no partial file left
    assert not multiprocessing.active_children()
