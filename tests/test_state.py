"""The resume state's parts: fingerprint, atomic writes, the resumable sampler, checkpoint pruning and guards."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from plugin import agent_log
from plugin.config.typed import EarlyStoppingRule
from plugin.errors import TaskError
from plugin.format.project import find_project, list_items
from plugin.training.checkpoints import CheckpointWriter
from plugin.training.guard import NonFiniteSteps
from plugin.training.log_interval import LogInterval
from plugin.training.run_state import RunState
from plugin.training.sampler import EpochSampler
from plugin.training.schedule import EarlyStopping, EvalPlanner, LrPolicy, TimeBudget
from plugin.training.state import Fingerprint, Position, changes, fingerprint, load_state, save_state, write_atomic
from tests.conftest import REPO, TINY_CONFIG, make_task


def project_fingerprint(task: Path, config: dict) -> Fingerprint:
    project = find_project(task / "data")
    return fingerprint(config, project, list_items(project))


def test_fingerprint_names_changed_keys_items_and_meta_but_not_operational_keys(tmp_path):
    task = make_task(tmp_path / "task")
    before = project_fingerprint(task, TINY_CONFIG)
    operational = dict(TINY_CONFIG, data_workers={"train": 4, "val": 2}, gpu_devices=[0, 1], cpu_processes=2,
                       time_budget_minutes=30, keep_checkpoints=2)
    assert changes(before, project_fingerprint(task, operational)) == []

    anns = sorted((task / "data" / "shapes").glob("*/ann/*.json"))
    doc = json.loads(anns[0].read_text())
    doc["objects"] = []
    anns[0].write_text(json.dumps(doc))
    anns[1].unlink()
    (anns[1].parent.parent / "img" / anns[1].name[: -len(".json")]).unlink()
    meta = task / "data" / "shapes" / "meta.json"
    meta.write_text(meta.read_text().replace("#E04040", "#E04041"))
    after = project_fingerprint(task, dict(TINY_CONFIG, lr=0.01, seed=3))
    assert changes(before, after) == ["config lr, seed", "1 item removed", "1 item changed", "meta.json changed"]


def test_a_state_loads_only_for_its_own_run(tmp_path):
    task = make_task(tmp_path / "task")
    fp = project_fingerprint(task, TINY_CONFIG)
    path = tmp_path / "resume" / "state.pt"
    size = save_state(path, {"weights": torch.arange(4.0)}, fp)
    assert size == path.stat().st_size > 0
    assert torch.equal(load_state(path, fp)["weights"], torch.arange(4.0))
    assert load_state(path, project_fingerprint(task, dict(TINY_CONFIG, epochs=9))) is None
    path.write_bytes(b"garbage")
    assert load_state(path, fp) is None  # unreadable: start afresh, with a warning


def test_a_killed_write_leaves_the_old_file_and_a_failed_one_names_the_path(tmp_path):
    path = tmp_path / "state.pt"
    write_atomic(path, {"v": torch.zeros(1)})
    old = path.read_bytes()
    # A real failing write: a file size limit (as a full disk) in a child process.
    script = (
        "import resource, signal, sys, torch\n"
        "from pathlib import Path\n"
        "from plugin.errors import TaskError\n"
        "from plugin.training.state import write_atomic\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))\n"
        "try:\n"
        f"    write_atomic(Path({str(path)!r}), {{'v': torch.zeros(2**20)}})\n"
        "except TaskError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert "cannot write state.pt" in done.stdout and str(path) + ".partial" in done.stdout
    assert path.read_bytes() == old
    assert not path.with_name("state.pt.partial").exists()


def test_no_write_through_a_symlink(tmp_path):
    target = tmp_path / "elsewhere.pt"
    target.write_bytes(b"keep")
    link = tmp_path / "state.pt"
    link.symlink_to(target)
    with pytest.raises(TaskError, match="symbolic link"):
        write_atomic(link, {"v": torch.zeros(1)})
    assert target.read_bytes() == b"keep"


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_sampler_is_distributed_samplers_order(world):
    for epoch in range(3):
        ours, theirs = [], []
        for rank in range(world):
            sampler = EpochSampler(10, rank, world, seed=5)
            sampler.set_position(epoch)
            reference = DistributedSampler(range(10), num_replicas=world, rank=rank, shuffle=True, seed=5)
            reference.set_epoch(epoch)
            ours.append(list(sampler))
            theirs.append(list(reference))
        assert ours == theirs


def test_epoch_sampler_resumes_part_way_with_any_number_of_ranks():
    whole = EpochSampler(10, 0, 1, seed=1)
    whole.set_position(2)
    order = list(whole)
    for world in (1, 2):
        samplers = [EpochSampler(10, r, world, seed=1) for r in range(world)]
        for sampler in samplers:
            sampler.set_position(2, start=4)
        dealt = [list(s) for s in samplers]
        # Global step i takes one index from each rank: together the rest of the epoch's order.
        together = [dealt[r][i] for i in range(len(dealt[0])) for r in range(world)]
        assert together[:6] == order[4:]
        assert len(samplers[0]) == -(-6 // world)


def writer_with(tmp_path: Path, keep: int | None) -> CheckpointWriter:
    return CheckpointWriter(tmp_path / "results", tmp_path / "tmp" / "checkpoints", keep)


def test_keep_checkpoints_keeps_the_best_and_the_last_n(tmp_path, monkeypatch):
    writer = writer_with(tmp_path, keep=1)
    model = nn.Conv2d(1, 1, 1)
    present = []

    # At each CHECKPOINT line its folder and the ones kept so far are on disk.
    def announce(idx, subdir, sizeb, best_now, optional):
        present.append(sorted(p.name for p in writer.results_dir.iterdir()))

    monkeypatch.setattr(agent_log, "log_checkpoint", announce)
    for epoch, loss in enumerate([0.5, 0.9, 0.8, 0.7], start=1):
        writer.save({}, model, float(epoch), {"loss": loss})
    assert present[-1] == ["00000000", "00000002", "00000003"]  # 00000002 goes only after 00000003's line
    assert sorted(p.name for p in writer.results_dir.iterdir()) == ["00000000", "00000003"]
    assert writer.best_subdir == "00000000"


def test_keep_checkpoints_null_keeps_all(tmp_path):
    writer = writer_with(tmp_path, keep=None)
    for epoch in range(3):
        writer.save({}, nn.Conv2d(1, 1, 1), float(epoch), {"loss": 1.0})
    assert len(list(writer.results_dir.iterdir())) == 3


def test_no_checkpoint_from_non_finite_weights(tmp_path):
    model = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    with pytest.raises(TaskError, match="not finite .* lower lr"):
        writer_with(tmp_path, keep=None).save({}, model, 1.0, {"loss": 0.5})
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_a_stop_signal_abandons_the_backward_at_its_next_gradient():
    # In a child process: the signal handler and hooks are process-wide.
    script = (
        "import os, signal, threading, time, torch\n"
        "from torch import nn\n"
        "from plugin.errors import Stopped\n"
        "from plugin.training import stop\n"
        "model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(40)])\n"
        "stop.install(); stop.watch(model)\n"
        "loss = model(torch.randn(256, 512)).sum()\n"
        "before = [p.detach().clone() for p in model.parameters()]\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "try:\n"
        "    loss.backward()\n"
        "except Stopped as e:\n"
        "    grads = sum(p.grad is not None for p in model.parameters())\n"
        "    print('stopped', e.signum, grads < 80)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["stopped", str(int(signal.SIGTERM)), "True"], done.stderr


def _run_state(model: nn.Module, writer: CheckpointWriter | None) -> RunState:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return RunState(model, optimizer, None, Position(), EvalPlanner(0.5, 4, 3), LrPolicy(2, 5.0),
                    EarlyStopping(EarlyStoppingRule(3, "loss")), TimeBudget(60.0), NonFiniteSteps(10, 1e-3),
                    LogInterval(2, torch.device("cpu")), writer)


def test_one_call_captures_the_run_and_one_restores_it(tmp_path):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.arange(16.0))
    sampler = EpochSampler(16, 0, 1, 0)
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler)
    before = _run_state(nn.Linear(3, 2), CheckpointWriter(tmp_path / "results", tmp_path / "staging"))
    before.model(torch.ones(1, 3)).sum().backward()
    before.optimizer.step()
    before.position.epoch, before.position.samples, before.position.step = 1, 6, 11
    before.planner.done, before.validated_step = 2, 8
    before.lr_policy.step(1.0), before.lr_policy.step(2.0)
    before.stopping.step({"loss": 0.5}), before.stopping.step({"loss": 0.7})
    before.nonfinite.in_row = 3
    before.writer.next_id, before.writer.best_subdir = 2, "00000001"
    state = before.state_dict()

    torch.manual_seed(1)
    after = _run_state(nn.Linear(3, 2), CheckpointWriter(tmp_path / "results", tmp_path / "staging"))
    after.load_state_dict(state, loader, iters_per_epoch=8)
    again = after.state_dict()
    for key in ("position", "planner", "lr_policy", "early_stopping", "nonfinite", "validated_step", "checkpoints"):
        assert again[key] == state[key], key
    assert again["position"] == {"epoch": 1, "samples": 6, "step": 11}
    assert (sampler.epoch, sampler.start) == (1, 6)  # the loader continues where the run was
    assert again["time_budget"]["spent"] >= state["time_budget"]["spent"]
    assert all(torch.equal(again["model"][k], state["model"][k]) for k in state["model"])
    assert again["optimizer"]["state"][0]["step"] == state["optimizer"]["state"][0]["step"] == 1
