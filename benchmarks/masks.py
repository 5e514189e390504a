"""Mask benchmarks: rasterization rate, the `masks` command against the Supervisely SDK, and the training
mask cache (cold and warm preparation, memory per rank), each figure printed with the command that
reproduces it.

    .venv/bin/python -m benchmarks.masks [--sdk-python build/sdk-venv/bin/python] [--images 10000]

The SDK (6.74.51, no torch) goes into a venv of its own, build/sdk-venv (`make sdk-venv`).
Without it the comparison is skipped, saying so.
Every time is wall-clock; CPU seconds (user + system, the process and the children it waited for)
are printed beside it, since on a shared machine they depend less on the other load. Memory is each
process's own: VmHWM, RssAnon, RssFile and Pss from /proc/self at its end, in a fresh process (a
child's ru_maxrss can carry its forking parent's high-water mark).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from plugin.format.classes import create_mapping
from plugin.format.masks import rasterize
from plugin.format.project import list_items, read_annotation, read_meta

REPO = Path(__file__).resolve().parent.parent
SDK_SCRIPT = Path(__file__).resolve().parent / "sdk_masks.py"
# The 10,000-annotation project takes minutes to write; it is kept here between runs.
DEFAULT_DATA = Path(tempfile.gettempdir()) / "sly-unet-bench"


def bench_rasterize(project: Path, repeats: int) -> float:
    meta = read_meta(project)
    mapping = create_mapping(meta, "bg", "neutral")
    anns = [read_annotation(item.ann_path, meta) for item in list_items(project)]
    start = time.perf_counter()
    for _ in range(repeats):
        for ann in anns:
            rasterize(ann, mapping)
    rate = repeats * len(anns) / (time.perf_counter() - start)
    print(f"rasterize: {rate:,.0f} annotations/s over {len(anns)} annotations x {repeats} "
          f"(ratio to the 2,000/s target: {rate / 2000:.1f}x)")
    return rate


def bench_project(data: Path, images: int) -> Path:
    """make_bench_project's project of `images` images (600..1200 px, 1..12 objects), made once under data/."""
    from benchmarks.run import make_bench_project  # run.py imports this module: no import at the top

    project = data / f"project{images}"
    if not (project / "meta.json").is_file():
        partial = data / f"project{images}.partial"
        subprocess.run(["rm", "-rf", str(partial)], check=True)
        make_bench_project(partial, images)
        partial.rename(project)
    return project


def _timed_process(command: list[str], cwd: Path = REPO) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, output) of a whole process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, output


def _same_masks(ours: Path, theirs: Path) -> tuple[int, int]:
    """(masks compared, masks that differ) between two `masks` outputs, decoded."""
    compared = differ = 0
    for path in sorted(ours.rglob("*.png")):
        other = theirs / path.relative_to(ours)
        a, b = cv2.imread(str(path), cv2.IMREAD_UNCHANGED), cv2.imread(str(other), cv2.IMREAD_UNCHANGED)
        compared += 1
        differ += b is None or not np.array_equal(a, b)
    return compared, differ


def bench_masks_vs_sdk(
    project: Path, work: Path, sdk_python: str | None, workers: str, repeats: int, before: Path | None = None
) -> float | None:
    """Whole-process time of `sly-unet masks` against the SDK script on the same project, interleaved,
    best of `repeats` each; returns the SDK's time over ours, or None without the SDK. `before`: a
    source tree of an older version (git archive main | tar -x -C DIR), timed alongside."""
    count = len(list_items(project))
    masks_cmd = lambda out, *more: [sys.executable, "-m", "plugin.cli", "masks", "--project", str(project), "--out",
                                    str(out), "--log-format", "json", *more]
    ours_cmd = lambda out: masks_cmd(out, "--workers", workers)
    sdk_cmd = lambda out: [sdk_python, str(SDK_SCRIPT), str(project), str(out)]
    if sdk_python is None or not Path(sdk_python).is_file():
        wall, cpu, _ = min(_timed_process(ours_cmd(work / "ours")) for _ in range(repeats))
        print(f"masks command: {count} annotations in {wall:.2f} s whole process ({cpu:.2f} CPU s, --workers "
              f"{workers}); the SDK comparison is skipped: no SDK interpreter (--sdk-python {sdk_python})")
        return None
    ours, theirs, older = [], [], []
    for k in range(repeats):
        ours.append(_timed_process(ours_cmd(work / f"ours{k}")))
        theirs.append(_timed_process(sdk_cmd(work / f"sdk{k}")))
        if before is not None:
            older.append(_timed_process(masks_cmd(work / f"before{k}"), cwd=before))
    if older:
        old_wall, old_cpu, _ = min(older)
        print(f"masks command before ({before}): {old_wall:.2f} s ({old_cpu:.2f} CPU s), "
              f"{min(theirs)[0] / old_wall:.1f}x faster than the SDK")
    (wall, cpu, _), (sdk_wall, sdk_cpu, _) = min(ours), min(theirs)
    compared, differ = _same_masks(work / "ours0", work / "sdk0")
    indices = [json.loads((work / side / "class_title_to_idx.json").read_text()) for side in ("ours0", "sdk0")]
    ratio = sdk_wall / wall
    print(f"masks command vs SDK 6.74.51, {count} annotations, whole process, best of {repeats} interleaved: "
          f"ours {wall:.2f} s ({cpu:.2f} CPU s, --workers {workers}), SDK {sdk_wall:.2f} s ({sdk_cpu:.2f} CPU s) "
          f"-> {ratio:.1f}x faster (target >= 5x; CPU {sdk_cpu / cpu:.1f}x); masks identical: "
          f"{compared - differ} of {compared}, class indices {'the same' if indices[0] == indices[1] else 'DIFFERENT'}")
    return ratio


def bench_prepare(project: Path, tmp: Path, size: int, runs: tuple[str, ...]) -> dict[str, float]:
    """Seconds to prepare the train and val masks of the project, each run in a fresh process:
    "uncached" (main's prepare_masks, one process), "cold" (the cache built) and "warm" (rerun)."""
    cache = tmp / "mask_cache"
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    seconds = {}
    for run in runs:
        mode = "uncached" if run == "uncached" else "cached"
        wall, cpu, output = _timed_process(_rank_command(project, cache, size, mode, 0, run))
        seconds[run] = json.loads(output.splitlines()[-1])["seconds"]
        print(f"prepare masks ({run}): {len(list_items(project))} annotations at {size}x{size} in {seconds[run]:.1f} s "
              f"({wall:.1f} s and {cpu:.1f} CPU s whole process)")
    return seconds


def bench_rank_memory(project: Path, tmp: Path, size: int) -> None:
    """Each rank's own memory with 2 processes preparing the masks as train_rank does: before (each draws
    and holds every mask) and after (rank 0 builds the cache, rank 1 waits; both map it)."""
    for mode in ("uncached", "cached"):
        cache = tmp / f"memory_cache_{mode}"
        subprocess.run(["rm", "-rf", str(cache)], check=True)
        token = f"{mode}-{time.time()}"
        commands = [_rank_command(project, cache, size, mode, rank, token, ranks=2) for rank in (0, 1)]
        # The cross-check: rank 1 (it starts no workers, whose peaks GNU time would count) under GNU time,
        # whose maximum resident set size should match its VmHWM.
        commands[1] = ["/usr/bin/time", "-v", *commands[1]] if Path("/usr/bin/time").exists() else commands[1]
        procs = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in commands]
        results = [p.communicate() for p in procs]
        for rank, (out, err) in enumerate(results):
            if procs[rank].returncode != 0:
                raise RuntimeError(f"rank {rank} failed:\n{out}{err[-3000:]}")
            figures = json.loads(out.splitlines()[-1])
            gnu = next((line.split(":")[1].strip() for line in err.splitlines() if "Maximum resident" in line), None)
            check = f"; GNU time max RSS {int(gnu) / 1024:.0f} MiB" if gnu else ""
            print(f"memory per rank, 2 processes, {mode}: rank {rank} VmHWM {figures['VmHWM']:.0f} MiB, at the end "
                  f"RssAnon {figures['RssAnon']:.0f} MiB, RssFile {figures['RssFile']:.0f} MiB, Pss "
                  f"{figures['Pss']:.0f} MiB (masks {figures['mask_mib']:.0f} MiB, {figures['seconds']:.1f} s){check}")


def _rank_command(project: Path, cache: Path, size: int, mode: str, rank: int, token: str, ranks: int = 1) -> list[str]:
    return [sys.executable, "-m", "benchmarks.masks", "--rank-job", mode, "--rank", str(rank), "--ranks", str(ranks),
            "--token", token, "--project", str(project), "--cache", str(cache), "--size", str(size)]


def _rank_job(args: argparse.Namespace) -> None:
    """One process's part: the train and val masks as create_dataset gets them, every page read (as the
    class weights and the foreground scan read them), then its own memory figures as one JSON line."""
    from plugin.training.data import CorruptionBudget, prepare_masks, split_items
    from plugin.training.mask_cache import MaskCache, load_masks

    project = Path(args.project)
    meta = read_meta(project)
    mapping = create_mapping(meta, "bg", "neutral")
    splits = split_items(list_items(project), "train", "val")
    size = (args.size, args.size)
    start = time.perf_counter()
    masks = []
    for split, items in splits.items():
        budget = CorruptionBudget.create(split, 0)
        if args.rank_job == "uncached":
            masks += prepare_masks(items, meta, mapping, size, budget)[1]
        else:
            cache = MaskCache(Path(args.cache), builder=args.rank == 0, token=args.token)
            masks += load_masks(items, meta, mapping, size, budget, cache, split)[1]
    seconds = time.perf_counter() - start
    checksum = sum(int(m.sum()) for m in masks)
    # Pss shares a page among the processes that map it at that moment: both ranks measure while both live.
    _meet(Path(args.cache), "touched", args.rank, args.ranks)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()
    pss = next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
    kib = lambda key: int(status[key].split()[0])
    print(json.dumps({"seconds": seconds, "VmHWM": kib("VmHWM") / 1024, "RssAnon": kib("RssAnon") / 1024,
                      "RssFile": kib("RssFile") / 1024, "Pss": pss / 1024, "checksum": checksum,
                      "mask_mib": sum(m.size for m in masks) / 2**20,
                      "maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    _meet(Path(args.cache), "measured", args.rank, args.ranks)


def _meet(folder: Path, stage: str, rank: int, ranks: int) -> None:
    """Wait until every rank has reached `stage`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stage}{rank}").touch()
    while not all((folder / f"{stage}{r}").exists() for r in range(ranks)):
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdk-python", default="build/sdk-venv/bin/python", help="the SDK venv's interpreter")
    parser.add_argument("--sdk-images", type=int, default=600, help="annotations of the SDK comparison")
    parser.add_argument("--workers", default="auto", help="--workers of the masks command")
    parser.add_argument("--before", type=Path, help="an older source tree whose masks command is timed alongside")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each side of the SDK comparison")
    parser.add_argument("--images", type=int, default=10000, help="annotations of the mask preparation figures")
    parser.add_argument("--size", type=int, default=256, help="training input side (scale resize: masks at it)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="where the generated projects are kept")
    parser.add_argument("--only", choices=("sdk", "prepare", "memory"), help="run one benchmark")
    parser.add_argument("--uncached", action="store_true", help="also time main's uncached preparation")
    for hidden in ("--rank-job", "--rank", "--ranks", "--token", "--project", "--cache"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_job:
        args.rank, args.ranks = int(args.rank), int(args.ranks)
        _rank_job(args)
        return
    print(f"reproduce: .venv/bin/python -m benchmarks.masks --sdk-python {args.sdk_python} --sdk-images "
          f"{args.sdk_images} --workers {args.workers} --repeats {args.repeats} --images {args.images} --size "
          f"{args.size} --data {args.data}" + (f" --only {args.only}" if args.only else "")
          + (" --uncached" if args.uncached else "") + (f" --before {args.before}" if args.before else ""))
    args.data.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.data) as tmp:
        if args.only in (None, "sdk"):
            project = bench_project(args.data, args.sdk_images)
            bench_masks_vs_sdk(project, Path(tmp), args.sdk_python, args.workers, args.repeats, args.before)
        if args.only in (None, "prepare", "memory"):
            project = bench_project(args.data, args.images)
        if args.only in (None, "prepare"):
            bench_prepare(project, Path(tmp), args.size, ("uncached", "cold", "warm") if args.uncached else ("cold", "warm"))
        if args.only in (None, "memory"):
            bench_rank_memory(project, Path(tmp), args.size)


if __name__ == "__main__":
    main()
