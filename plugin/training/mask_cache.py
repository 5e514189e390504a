"""A task's training masks, drawn once into tmp/mask_cache/ and shared, memory-mapped, by the node's ranks.

A split's masks lie in one pack, `<split>.pack`: a header, the masks back to back (uint8, row by
row) and a JSON index. One file, not one per image: Python before 3.13 keeps a file descriptor open
for every memory map, and 10,000 images would pass a `ulimit -n` of 1,024 in every rank and worker.

A mask's key is what decides its pixels: the annotation file's bytes, the image's size as read, the
classes and their mapping, the target size or scale, the pixel limit and FORMAT_VERSION; its entry
carries the CRC-32 of its pixels. Every run the node's builder (local rank 0) checks every CRC, in
worker processes, so a damaged or stale entry is warned about and drawn again, never trusted (which
is also why the pack needs no fsync). The other ranks wait until `<split>.ready` holds this run's
token, then map the same pages: the page cache holds one copy per node, not one per rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from plugin.errors import TaskError
from plugin.files import open_for_writing, refuse_symlink, write_file
from plugin.format.classes import ClassMapping
from plugin.format.images import max_image_pixels, read_image_size
from plugin.format.project import Item, ProjectMeta, check_image_size, read_annotation
from plugin.parallel import Failure, ordered_map, resolve_workers
from plugin.training import stop
from plugin.training.data import CorruptionBudget, mask_target, training_mask

log = logging.getLogger(__name__)

# Part of every key: raise it when the drawing or the pack layout changes, and no old mask is used.
FORMAT_VERSION = 1
_MAGIC = b"SLYMASKS"
# magic, version, digest of this layout (every item's key or failure, in order), index offset, length, CRC
_HEADER = struct.Struct("<8sI32sQQI")
_POLL_S = 0.2


@dataclass(frozen=True)
class MaskCache:
    folder: Path  # tmp/mask_cache of the task dir
    builder: bool  # this process draws and checks the masks (the node's local rank 0); the others wait
    token: str  # the same on every rank of a run: `<split>.ready` holds it once the pack is final
    workers: int | None = None  # None: one per available core


@dataclass(frozen=True)
class _Probe:
    key: str
    image_size: tuple[int, int]  # (height, width) as read
    shape: tuple[int, int]  # (height, width) of the mask


@dataclass(frozen=True)
class _Job:
    position: int  # in the items
    item: Item
    probe: _Probe
    offset: int
    source: dict | None  # the old pack's entry of the same key


def load_masks(
    items: Sequence[Item],
    meta: ProjectMeta,
    mapping: ClassMapping,
    size: tuple[int, int] | float,
    budget: CorruptionBudget,
    cache: MaskCache,
    split: str,
    on_item: Callable[[], None] | None = None,
) -> tuple[list[Item], list[np.ndarray]]:
    """prepare_masks (data.py) through the cache: the kept items and their masks as read-only
    np.memmap views of the split's pack. Corrupted items spend the budget on every rank, in order."""
    pack = cache.folder / f"{split}.pack"
    ready = cache.folder / f"{split}.ready"
    if cache.builder:
        _build(items, meta, mapping, size, cache, pack, on_item)
        write_file(_partial(ready), cache.token.encode())
        os.replace(_partial(ready), ready)
    else:
        while not (ready.is_file() and ready.read_text() == cache.token):
            stop.check()  # the builder stops on the same signal; nothing else would end the wait
            time.sleep(_POLL_S)
    return _open(pack, items, budget)


def _build(items, meta, mapping, size, cache: MaskCache, pack: Path, on_item) -> None:
    for path in (cache.folder, pack, _partial(pack), cache.folder / f"{pack.stem}.ready"):
        refuse_symlink(path)
    workers = resolve_workers(cache.workers, len(items))
    probes = []
    for probe in ordered_map(partial(_probe, context=_context(meta, mapping, size), size=size), items, workers, 16):
        stop.check()
        probes.append(probe)
    layout = [(i.dataset, i.name, *((p.key, p.shape) if isinstance(p, _Probe) else (p,))) for i, p in zip(items, probes)]
    digest = hashlib.sha256(repr(layout).encode()).digest()
    old = _read_index(pack)
    entries = [e for e in old[1] if "crc" in e] if old else []
    if old is not None and old[0] == digest:
        # The same layout: the pack stays as it is if every CRC holds; else a new one is written, in
        # which the entries that fail are drawn again (and warned about).
        intact = True
        for ok in ordered_map(partial(_check, pack=pack), entries, workers, 16):
            stop.check()
            intact = intact and ok
        if intact:
            _tick(on_item, len(items))
            log.info(f"masks: {len(entries)} of {len(items)} from the cache {cache.folder}",
                     extra={"cached_masks": len(entries), "masks": len(items)})
            return
    sources = {e["key"]: e for e in entries}
    _write_pack(items, probes, sources, meta, mapping, workers, pack, digest, on_item)


def _write_pack(items, probes, sources, meta, mapping, workers, pack: Path, digest: bytes, on_item) -> None:
    jobs, offset = [], _HEADER.size
    for position, (item, probe) in enumerate(zip(items, probes)):
        if isinstance(probe, _Probe):
            jobs.append(_Job(position, item, probe, offset, sources.get(probe.key)))
            offset += probe.shape[0] * probe.shape[1]
    partial_pack = _partial(pack)
    with open_for_writing(partial_pack) as file:
        file.truncate(offset)
    try:
        outcomes: list = list(probes)  # a probe's failure stays; the others become (job, how, crc) or a failure
        fill = partial(_fill, meta=meta, mapping=mapping, dest=partial_pack, source=pack)
        for job, result in zip(jobs, ordered_map(fill, jobs, workers)):
            outcomes[job.position] = result if isinstance(result, Failure) else (job, *result)
            _tick(on_item)
        _tick(on_item, len(items) - len(jobs))
        index, counts, redrawn = [], Counter(), []
        for item, outcome in zip(items, outcomes):
            entry = {"name": f"{item.dataset}/{item.name}"}
            if isinstance(outcome, Failure):
                entry.update(message=outcome.message, where=outcome.where)
            else:
                job, how, crc = outcome
                counts[how] += 1
                redrawn += [entry["name"]] if how == "redrawn" else []
                entry.update(key=job.probe.key, at=job.offset, shape=list(job.probe.shape), crc=crc)
            index.append(entry)
        if redrawn:
            _warn_corrupt(pack, redrawn)
        data = json.dumps({"items": index}).encode()
        fd = os.open(partial_pack, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.pwrite(fd, data, offset)
            os.pwrite(fd, _HEADER.pack(_MAGIC, FORMAT_VERSION, digest, offset, len(data), zlib.crc32(data)), 0)
        finally:
            os.close(fd)
        os.replace(partial_pack, pack)
    except OSError as exc:  # a full disk, say, in this process or a worker
        raise TaskError(f"cannot write the mask cache: {exc.strerror or exc}", where=partial_pack) from exc
    finally:
        partial_pack.unlink(missing_ok=True)
    log.info(f"masks: {counts['cached']} of {len(items)} from the cache {pack.parent}, "
             f"{counts['drawn'] + counts['redrawn']} drawn", extra={"cached_masks": counts["cached"], "masks": len(items)})


def _probe(item: Item, context: bytes, size: tuple[int, int] | float) -> _Probe | Failure:
    """The item's key and mask shape, from the annotation's bytes and the image's header."""
    try:
        height, width = read_image_size(item.image_path)
        data = item.ann_path.read_bytes()
    except TaskError as exc:
        return Failure.of(exc)
    except OSError as exc:
        return Failure(f"the annotation cannot be read: {exc.strerror or exc}", str(item.ann_path))
    key = hashlib.sha256(context + hashlib.sha256(data).digest() + f"{height}x{width}".encode()).hexdigest()
    target_width, target_height = mask_target(size, height, width)
    return _Probe(key, (height, width), (target_height, target_width))


def _fill(job: _Job, meta: ProjectMeta, mapping: ClassMapping, dest: Path, source: Path) -> tuple | Failure:
    """Write the job's mask into the new pack: the old pack's bytes when their CRC holds, else drawn.
    Returns ("cached" | "drawn" | "redrawn", crc), or the item's failure."""
    how = "drawn"
    if job.source is not None:
        data = _read(source, job.source)
        if data is not None and zlib.crc32(data) == job.source["crc"]:
            _write(dest, job.offset, data)
            return "cached", job.source["crc"]
        how = "redrawn"
    try:
        ann = read_annotation(job.item.ann_path, meta)
        check_image_size(job.item, ann, *job.probe.image_size)
        height, width = job.probe.shape
        data = training_mask(ann, mapping, (width, height)).tobytes()
    except TaskError as exc:
        return Failure.of(exc)
    _write(dest, job.offset, data)
    return how, zlib.crc32(data)


def _check(entry: dict, pack: Path) -> bool:
    data = _read(pack, entry)
    return data is not None and zlib.crc32(data) == entry["crc"]


def _read(pack: Path, entry: dict) -> bytes | None:
    """An entry's pixels, or None when the file ends before them."""
    height, width = entry["shape"]
    try:
        fd = os.open(pack, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        data = os.pread(fd, height * width, entry["at"])
    finally:
        os.close(fd)
    return data if len(data) == height * width else None


def _write(dest: Path, offset: int, data: bytes) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _read_index(pack: Path) -> tuple[bytes, list[dict]] | None:
    """(layout digest, index entries) of a pack whose header and index check out; None, with a warning
    for a pack that is there and broken."""
    if not pack.exists():
        return None
    try:
        with open(pack, "rb") as file:
            magic, version, digest, offset, length, crc = _HEADER.unpack(file.read(_HEADER.size))
            file.seek(offset)
            data = file.read(length)
        if magic != _MAGIC or version != FORMAT_VERSION:
            raise ValueError("not a mask pack of this version")
        if len(data) != length or zlib.crc32(data) != crc:
            raise ValueError("its index is truncated or damaged")
        entries = json.loads(data)["items"]
        if any("crc" in e and e["at"] + e["shape"][0] * e["shape"][1] > offset for e in entries):
            raise ValueError("an entry lies past the masks")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        log.warning(f"the mask cache {pack} is unreadable ({exc}); its masks are drawn again",
                    extra={"file": str(pack)})
        return None
    return digest, entries


def _open(pack: Path, items: Sequence[Item], budget: CorruptionBudget) -> tuple[list[Item], list[np.ndarray]]:
    found = _read_index(pack)
    names = [f"{item.dataset}/{item.name}" for item in items]
    if found is None or [e["name"] for e in found[1]] != names:
        raise TaskError("the mask cache does not hold this split's masks: another process changed it during "
                        "the build", where=pack)
    base = np.memmap(pack, np.uint8, mode="r")
    kept, masks = [], []
    for item, entry in zip(items, found[1]):
        if "crc" not in entry:
            budget.spend(entry["where"] or item.ann_path, Failure(entry["message"], entry["where"]).error())
            continue
        height, width = entry["shape"]
        kept.append(item)
        masks.append(base[entry["at"]:entry["at"] + height * width].reshape(height, width))
    return kept, masks


def _context(meta: ProjectMeta, mapping: ClassMapping, size: tuple[int, int] | float) -> bytes:
    """What every key of this split shares: what decides the pixels besides the annotation and the image size."""
    target = ["size", *size] if isinstance(size, tuple) else ["scale", size]
    classes = [[c.title, c.shape] for c in meta.classes]
    described = [FORMAT_VERSION, classes, sorted(mapping.with_neutral().items()), target, max_image_pixels()]
    return hashlib.sha256(json.dumps(described).encode()).digest()


def _warn_corrupt(pack: Path, names: list[str]) -> None:
    log.warning(f"the mask cache {pack}: {len(names)} masks failed their checksum (the first: {names[0]}); they "
                "are drawn again", extra={"file": str(pack), "corrupt_masks": len(names)})


def _tick(on_item: Callable[[], None] | None, count: int = 1) -> None:
    for _ in range(count if on_item is not None else 0):
        on_item()


def _partial(path: Path) -> Path:
    # The host in the name: ranks of two nodes that share tmp/ never write into the same file.
    return path.with_name(f"{path.name}.{socket.gethostname()}.partial")
