"""Training with several processes (torch.distributed, gloo on the CPU) against one process, and its failures."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from plugin import agent_log
from plugin.config.load import read_train_config
from plugin.format.classes import create_mapping
from plugin.format.project import find_project, list_items, read_meta
from plugin.nn.network import create_network
from plugin.nn.precision import prepare_model, resolve_precision
from plugin.nn.weights import WEIGHTS_NAME, load_state_dict
from plugin.parallel import threads_per_process
from plugin.training.checkpoints import legacy_state_dict
from plugin.training.data import split_items, val_shard
from plugin.training.distributed import DUMP_WEIGHTS_ENV, RankFailed
from plugin.training.sampler import EpochSampler
from plugin.training.schedule import create_optimizer, lr_schedule, set_lr
from plugin.training.step import loss_fn
from plugin.training.task import apply_initial_weights, create_dataset, model_network
from tests.conftest import REPO, TINY_CONFIG, Run, make_task, run_entrypoint


@pytest.fixture(autouse=True, scope="module")
def cpu_only():
    # These tests run the gloo path (cpu_processes); where CUDA exists, gpu_devices would set the world
    # size instead. Module scope, so that it holds before the module's shared runs start; the child
    # processes inherit the variable.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "")
        yield


# Both runs continue from the same checkpoint on the same 8 training images: 2 steps of a global batch of 4.
# float32 (amp off): the exactness test below recomputes the step in float32, which bfloat16 would blur.
CONTINUE = dict(TINY_CONFIG, weights_init_type="continue_training", epochs=1, val_every=1, amp="off")
ONE = dict(CONTINUE, batch_size={"train": 4, "val": 4}, cpu_processes=1)
TWO = dict(CONTINUE, batch_size={"train": 2, "val": 2}, cpu_processes=2)


def test_the_global_batch_is_the_same_whatever_the_number_of_processes():
    one = list(EpochSampler(10, rank=0, world_size=1, seed=3))
    two = [list(EpochSampler(10, rank=r, world_size=2, seed=3)) for r in range(2)]
    # Step i with batch 2 per rank takes ranks' items [2i, 2i + 2): together, one's items [4i, 4i + 4).
    for i in range(3):
        together = sorted(two[0][2 * i : 2 * i + 2] + two[1][2 * i : 2 * i + 2])
        assert together == sorted(one[4 * i : 4 * i + 4])


def test_val_shards_cover_every_sample_once_with_padding_at_the_end():
    shards = [val_shard(7, rank, 3) for rank in range(3)]
    assert shards == [([0, 3, 6], 3), ([1, 4, 7], 2), ([2, 5, 7], 2)]  # 7 = padding (the dataset's length)
    real = sorted(i for indices, count in shards for i in indices[:count])
    assert real == list(range(7))
    assert val_shard(4, 0, 1) == ([0, 1, 2, 3], 4)


def test_a_relayed_rank_failure_is_one_crash_line_with_the_rank_s_stack():
    out = io.StringIO()
    agent_log.setup("json", out)
    remote = ["Traceback (most recent call last):", '  File "train.py", line 1, in fit', "ValueError: boom"]
    try:
        assert agent_log.run_main("UNET_V2_TRAIN", lambda: _raise(RankFailed(1, "ValueError: boom", remote))) == 1
    finally:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "_sly_unet_console", False)]:
            root.removeHandler(handler)
    [line] = [json.loads(text) for text in out.getvalue().splitlines()]
    assert line["event_type"] == "EventType.TASK_CRASHED"
    assert line["message"] == "rank 1: ValueError: boom"
    assert line["stack"] == remote


def _raise(error: Exception) -> None:
    raise error


def _run(task: Path, config: dict, dump: Path, source: Path) -> Run:
    root = make_task(task, config, n_train=8, n_val=3)
    shutil.copytree(source, root / "model")
    env = dict(os.environ, **{DUMP_WEIGHTS_ENV: str(dump)})
    proc = subprocess.run(
        [sys.executable, "-m", "entrypoints.train", "--task-dir", str(root), "--log-format", "json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def runs(trained_task, tmp_path_factory):
    """The same continued training with 1 process (batch 4) and with 2 processes (batch 2 each)."""
    source = trained_task[0] / "results" / "00000000"
    base = tmp_path_factory.mktemp("ddp")
    one = _run(base / "one", ONE, base / "dump1", source)
    two = _run(base / "two", TWO, base / "dump2", source)
    return base, one, two


def test_two_processes_end_with_identical_weights(runs):
    base, _, two = runs
    assert two.returncode == 0, two.stderr[-3000:]
    rank0, rank1 = (torch.load(base / "dump2" / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def _metrics(run: Run, kind: str) -> list[dict]:
    return [m for m in run.events("METRICS") if m["type"] == kind]


def _distance(a: dict, b: dict) -> float:
    keys = [k for k in a if a[k].is_floating_point() and "running_" not in k]
    return sum(float(((a[k] - b[k]) ** 2).sum()) for k in keys) ** 0.5


def test_two_processes_match_one_process_on_the_doubled_batch(runs):
    base, one, two = runs
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    # Same samples per global step, same start: the logged figures agree within BatchNorm's share.
    # Each CPU process normalises over its own 2 images (torch's SyncBatchNorm is CUDA-only), which
    # moves the figures a little. Measured with the legacy network: 0.1 % on the first loss and on the
    # val loss; with the default UNet on efficientnet_lite0, whose 2x2 deepest maps (64 px inputs) give
    # its many BatchNorms few values each: under 1 % on the first loss, 3.6 % on the val loss.
    train1, train2 = _metrics(one, "train"), _metrics(two, "train")
    assert [m["epoch"] for m in train1] == [m["epoch"] for m in train2] == [0.5, 1.0]
    assert train2[0]["metrics"]["loss"] == pytest.approx(train1[0]["metrics"]["loss"], rel=0.01)
    (val1,), (val2,) = _metrics(one, "val"), _metrics(two, "val")
    assert val2["metrics"]["loss"] == pytest.approx(val1["metrics"]["loss"], rel=0.05)
    assert val2["metrics"]["accuracy"] == pytest.approx(val1["metrics"]["accuracy"], abs=0.05)


def test_two_processes_compute_the_averaged_step_exactly(runs):
    # Adam's first steps move every weight by about lr whatever the gradient's size, so the per-process
    # BatchNorm (gradient cosine ~0.4 against one batch of 4) leaves the weights of the two runs as far
    # apart as the steps are long. The weights are therefore checked against their exact definition:
    # one process doing what DDP promises (the mean of the two halves' gradients, each half normalised
    # on its own, rank 0's BatchNorm statistics kept), on the same samples.
    base, _, two = runs
    assert two.returncode == 0, two.stderr[-3000:]
    task = base / "two"
    # As many threads as each spawned rank has: another summation order is enough for Adam to turn
    # float noise into 5 % of the step (measured on 2 cores). Measured with the same threads: bitwise equal.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    try:
        expected = _two_rank_step_in_one_process(task)
    finally:
        torch.set_num_threads(threads)
    start = load_state_dict(task / "model" / WEIGHTS_NAME)
    got = torch.load(task / "results" / "00000000" / WEIGHTS_NAME, weights_only=True)
    assert _distance(got, expected) <= 1e-6 * _distance(expected, start)
    for k in expected:
        if "running_" in k:
            assert torch.allclose(got[k], expected[k], rtol=1e-5, atol=1e-6), k


def _two_rank_step_in_one_process(task: Path) -> dict[str, torch.Tensor]:
    config = read_train_config(task / "task_config.json")
    project = find_project(task / "data")
    meta = read_meta(project)
    mapping = create_mapping(meta, "bg", "neutral")
    data = create_dataset("train", split_items(list_items(project), "train", "val")["train"], meta, mapping, config)
    model = create_network(model_network(task / "model"), mapping.num_classes)
    apply_initial_weights(model, load_state_dict(task / "model" / WEIGHTS_NAME), "continue_training", task)
    # The trainer's layout too: channels_last convolutions sum in another order than NCHW ones.
    precision = resolve_precision(config.amp, torch.device("cpu"), training=True)
    model = prepare_model(model, precision)
    optimizer = create_optimizer(model, config)
    compute_loss = loss_fn(config, mapping.num_classes)
    batch = config.batch_size.train
    order = [list(EpochSampler(len(data), rank=r, world_size=2, seed=config.seed)) for r in (0, 1)]
    steps = -(-len(order[0]) // batch)
    schedule = lr_schedule(config, steps)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        for rank in (0, 1):
            samples = [data[i] for i in order[rank][step * batch : (step + 1) * batch]]
            images, targets = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
            kept = {k: v.clone() for k, v in model.named_buffers()}
            (compute_loss(precision.logits(model, images), targets) / 2).backward()
            if rank == 1:  # DDP broadcasts rank 0's buffers: rank 1's statistics never count
                for name, buffer in model.named_buffers():
                    buffer.copy_(kept[name])
        set_lr(optimizer, schedule.lr_at(step))
        optimizer.step()
    return legacy_state_dict(model)


def test_two_processes_log_and_save_what_one_process_does(runs):
    base, one, two = runs
    for run in (one, two):
        assert run.returncode == 0, run.stderr[-3000:]

    def shape(run: Run) -> list[tuple]:
        # Every line's kind and keys; rank 1 logs nothing, so the sequences are equal line for line.
        events = [line for line in run.lines if "event_type" in line]
        return [(e["event_type"], e.get("type"), e.get("subtask"), sorted(e), sorted(e.get("metrics", {})))
                for e in events if e.get("event_type") != "EventType.PROGRESS" or e["current"] in (0, e["total"])]

    assert shape(two) == shape(one)
    (c1,), (c2,) = one.events("CHECKPOINT"), two.events("CHECKPOINT")
    assert (c1["id"], c1["subdir"], c1["best_now"]) == (c2["id"], c2["subdir"], c2["best_now"]) == (0, "00000000", True)
    for name in ("one", "two"):
        assert sorted(p.name for p in (base / name / "results").iterdir()) == ["00000000"]
        assert sorted(p.name for p in (base / name / "results" / "00000000").iterdir()) == ["config.json", "model.pt"]
        # One progress.png whatever the world size (rank 0 draws it), and no temporary file beside it.
        assert sorted(p.name for p in (base / name / "tmp").iterdir()) == [
            "checkpoints", "mask_cache", "progress.png", "train_log.jsonl"]
    w1 = torch.load(base / "one" / "results" / "00000000" / "model.pt", weights_only=True)
    w2 = torch.load(base / "two" / "results" / "00000000" / "model.pt", weights_only=True)
    assert w1.keys() == w2.keys() and all(w1[k].shape == w2[k].shape for k in w1)
    assert all(k.startswith("module.") for k in w2)
    config = json.loads((base / "two" / "results" / "00000000" / "config.json").read_text())
    assert config["settings"]["cpu_processes"] == 2
    logged = [json.loads(line) for line in (base / "two" / "tmp" / "train_log.jsonl").read_text().splitlines()]
    assert len([m for m in logged if m.get("type") == "train"]) == 2  # rank 0's lines only


def test_continue_training_from_a_two_process_checkpoint_with_one_process(runs, tmp_path):
    base, _, two = runs
    assert two.returncode == 0, two.stderr[-3000:]
    config = dict(CONTINUE, batch_size={"train": 4, "val": 4})
    task = make_task(tmp_path / "task", config, n_train=4, n_val=2)
    shutil.copytree(base / "two" / "results" / "00000000", task / "model")
    run = run_entrypoint("entrypoints.train", task)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [line["loaded_tensors"] for line in run.lines if "loaded_tensors" in line] == [len(torch.load(
        task / "model" / "model.pt", weights_only=True))]
    assert [c["subdir"] for c in run.events("CHECKPOINT")] == ["00000000"]


def _rank_pids(launcher: int) -> list[int]:
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_a_killed_rank_ends_the_whole_job_with_one_crash_line(tmp_path):
    config = dict(TINY_CONFIG, cpu_processes=2, epochs=50, val_every=1)
    task = make_task(tmp_path / "task", config, n_train=4, n_val=2)
    env = {k: v for k, v in os.environ.items() if k != "SLY_TASK_DIR"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "entrypoints.train", "--task-dir", str(task), "--log-format", "json"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines = []
    try:
        for line in proc.stdout:  # wait until the ranks train
            lines.append(line)
            if '"type": "train"' in line:
                break
        ranks = _rank_pids(proc.pid)
        assert len(ranks) == 2
        killed_at = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        rest, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr[-3000:]
    assert time.monotonic() - killed_at < 60
    crashes = Run(1, "".join(lines) + rest, stderr).events("TASK_CRASHED")
    assert len(crashes) == 1
    assert crashes[0]["message"].startswith("rank 1: ") and "SIGKILL" in crashes[0]["message"]
    assert all(not Path(f"/proc/{pid}").exists() for pid in ranks)  # rank 0 was stopped and reaped
    for folder in (task / "results").iterdir() if (task / "results").exists() else []:
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.pt"]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2, reason="needs a cpuset")
def test_rank_threads_follow_the_cpuset_not_the_machine() -> None:
    # A container limited to one core of a larger machine: torch threads per rank come from the cores
    # the process may use (one), not from os.cpu_count().
    probe = ("import torch; from plugin.parallel import threads_per_process; "
             "print(threads_per_process(1), threads_per_process(2))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["1", "1"]
    assert threads_per_process(1) == len(os.sched_getaffinity(0))
