"""Runs that survive being stopped: real SIGKILL and SIGTERM on the train entrypoint, then a resume.

Each test starts `python -m entrypoints.train` as the container does, signals it at a moment read
from its own log lines, and runs it again on the same task dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_CONFIG, Run, make_task, run_entrypoint

# 4 train images, batch 2: 2 iterations an epoch; a checkpoint after each epoch.
THREE_EPOCHS = dict(TINY_CONFIG, epochs=3, val_every=1)
# The tests that signal a run mid-way need steps and state writes that take longer than the test's
# reaction: the legacy network's (about 0.5 s a 64 px step, a 506 MB state), not the default's (tens of ms).
SLOW_NETWORK = {"arch": "unet_v2"}


class Training:
    """The train entrypoint in a child process, its JSON lines read as they come."""

    def __init__(self, task: Path, env: dict | None = None, preexec=None, launcher: tuple[str, ...] = ()) -> None:
        self.marker = uuid.uuid4().hex
        environ = {k: v for k, v in os.environ.items() if k != "SLY_TASK_DIR"}
        # Hidden CUDA: cpu_processes decides the number of processes on a GPU machine too.
        environ.update(CUDA_VISIBLE_DEVICES="", SLY_TEST_MARKER=self.marker, **(env or {}))
        self.process = subprocess.Popen(
            [*(launcher or (sys.executable,)), "-m", "entrypoints.train", "--task-dir", str(task), "--log-format", "json"],
            cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec,
        )
        self.lines: list[dict] = []

    def until(self, predicate) -> dict:
        """Read lines until one satisfies predicate; returns it."""
        for text in self.process.stdout:
            line = json.loads(text)
            self.lines.append(line)
            if predicate(line):
                return line
        raise AssertionError(f"the run ended first (rc {self.process.wait()}): {self.process.stderr.read()[-3000:]}")

    def finish(self, timeout: float = 300) -> Run:
        out, err = self.process.communicate(timeout=timeout)
        self.lines += [json.loads(t) for t in out.splitlines() if t.strip()]
        return Run(self.process.returncode, "\n".join(json.dumps(line) for line in self.lines), err)

    def survivors(self, wait: float = 3.0) -> list[int]:
        """Processes that this run started (they inherit its marker) still alive `wait` s after it ended."""
        deadline = time.monotonic() + wait
        while True:
            found = []
            for entry in Path("/proc").iterdir():
                try:
                    if entry.name.isdigit() and self.marker.encode() in (entry / "environ").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    continue
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


def is_checkpoint(number: int):
    return lambda line: line.get("event_type") == "EventType.CHECKPOINT" and line["id"] == number


def is_train_step(epoch: float):
    return lambda line: (line.get("event_type") == "EventType.METRICS" and line["type"] == "train"
                         and line["epoch"] == pytest.approx(epoch))


def kill_after_the_first_checkpoint(task: Path) -> int:
    """Train on `task` and SIGKILL it right after its CHECKPOINT 0 line; returns the exit status."""
    run = Training(task)
    run.until(is_checkpoint(0))
    run.process.kill()
    return run.process.wait()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(task: Path, subdir: str) -> dict[str, torch.Tensor]:
    return torch.load(task / "results" / subdir / "model.pt", weights_only=True)


def state_path(task: Path) -> Path:
    return task / "tmp" / "resume" / "state.pt"


def resumed_from(run: Run) -> tuple[int, float, int | None]:
    """(iteration, epoch, last checkpoint) of the run's one "resuming" line."""
    [line] = [line for line in run.lines if "resumed_iteration" in line]
    return line["resumed_iteration"], line["resumed_epoch"], line["resumed_checkpoint"]


def stopped_at(run: Run) -> tuple[str, int, int]:
    """(signal, iteration, iterations in all) of the run's one "stopped by" line."""
    [line] = [line for line in run.lines if "signal" in line and "iteration" in line]
    return line["signal"], line["iteration"], line["iterations"]


def test_sigkill_after_a_checkpoint_then_resume_ends_bitwise_equal(tmp_path):
    straight = make_task(tmp_path / "straight", THREE_EPOCHS)
    assert run_entrypoint("entrypoints.train", straight).returncode == 0

    task = make_task(tmp_path / "killed", THREE_EPOCHS)
    assert kill_after_the_first_checkpoint(task) == -signal.SIGKILL
    assert sorted(p.name for p in (task / "results").iterdir()) == ["00000000"]  # beside results/, not in it
    assert state_path(task).is_file()

    resumed = run_entrypoint("entrypoints.train", task)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_from(resumed) == (2, 1.0, "00000000")
    # Ids and epochs go on where the killed run stopped.
    assert [c["id"] for c in resumed.events("CHECKPOINT")] == [1, 2]
    assert [m["epoch"] for m in resumed.events("METRICS") if m["type"] == "train"] == [1.5, 2.0, 2.5, 3.0]
    expected, got = weights(straight, "00000002"), weights(task, "00000002")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed weights differ from the straight run's"
    assert not state_path(task).exists()  # a finished run leaves no state to resume


def test_sigterm_stops_a_256px_step_with_workers_inside_the_grace_period_and_resumes(tmp_path):
    # The legacy network's 256 px step takes seconds on a CPU, so the second one is surely in flight when
    # the signal comes.
    config = dict(TINY_CONFIG, input_size={"width": 256, "height": 256}, data_workers={"train": 2, "val": 1},
                  network=SLOW_NETWORK)
    task = make_task(tmp_path / "task", config, size=256)
    run = Training(task)
    run.until(is_train_step(0.5))  # the second step is in flight from here
    time.sleep(0.5)
    sent = time.monotonic()
    run.process.send_signal(signal.SIGTERM)
    stopped = run.finish()
    took = time.monotonic() - sent
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert took < 10, f"the stop took {took:.1f} s, over docker's grace period"
    assert not run.survivors(), "a data loader worker outlived the run"
    assert stopped_at(stopped) == ("SIGTERM", 1, 2)
    assert stopped.events("CHECKPOINT") == []
    assert state_path(task).is_file()

    resumed = run_entrypoint("entrypoints.train", task)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_from(resumed) == (1, 0.5, None)  # before the first checkpoint
    assert [m["epoch"] for m in resumed.events("METRICS") if m["type"] == "train"] == [1.0]
    assert [c["id"] for c in resumed.events("CHECKPOINT")] == [0]


def test_a_second_signal_while_the_state_is_written_keeps_the_previous_state(tmp_path):
    task = make_task(tmp_path / "task", dict(THREE_EPOCHS, network=SLOW_NETWORK))
    run = Training(task)
    run.until(is_checkpoint(0))
    before = {"state": digest(state_path(task)), "checkpoint": digest(task / "results" / "00000000" / "model.pt")}
    run.until(is_train_step(1.5))  # one more step: the stop then writes a new state
    run.process.send_signal(signal.SIGTERM)
    partial = state_path(task).with_name("state.pt.partial")
    deadline = time.monotonic() + 60
    while not partial.exists():
        assert time.monotonic() < deadline and run.process.poll() is None, "the state was never written"
        time.sleep(0.002)
    run.process.send_signal(signal.SIGINT)
    assert run.finish().returncode == 128 + signal.SIGINT
    assert digest(state_path(task)) == before["state"]
    assert digest(task / "results" / "00000000" / "model.pt") == before["checkpoint"]
    assert sorted(p.name for p in (task / "results").iterdir()) == ["00000000"]
    # The surviving state is whole: the next run continues from it.
    resumed = run_entrypoint("entrypoints.train", task)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_from(resumed) == (2, 1.0, "00000000")


def test_sigterm_reaches_every_rank_and_the_state_resumes_with_one_process(tmp_path):
    two = dict(THREE_EPOCHS, epochs=2, batch_size={"train": 1, "val": 1}, cpu_processes=2, network=SLOW_NETWORK)
    task = make_task(tmp_path / "task", two)
    run = Training(task)
    run.until(is_train_step(1.5))
    run.process.send_signal(signal.SIGTERM)
    stopped = run.finish()
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert not run.survivors(), "a rank or a worker outlived the launcher"
    # The fourth step may have finished before the signal came; then its validation is what was cut short.
    signal_name, iteration, iterations = stopped_at(stopped)
    assert signal_name == "SIGTERM" and iteration in (3, 4) and iterations == 4

    (task / "task_config.json").write_text(json.dumps(dict(two, cpu_processes=1)))
    resumed = run_entrypoint("entrypoints.train", task)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_from(resumed)[2] == "00000000"
    # One process makes a global batch of 1 instead of 2: what is left of epoch 1 takes more, smaller steps.
    assert [c["id"] for c in resumed.events("CHECKPOINT")] == [1]
    assert resumed.events("CHECKPOINT")[0]["optional"]["epoch"] == 2.0


def test_sigterm_to_torchrun_stops_every_worker_and_rank_0_writes_the_state(tmp_path):
    task = make_task(tmp_path / "task", dict(THREE_EPOCHS, batch_size={"train": 1, "val": 1}, network=SLOW_NETWORK))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    run = Training(task, launcher=(torchrun, "--nproc-per-node", "2"))
    run.until(is_train_step(1.5))
    run.process.send_signal(signal.SIGTERM)
    stopped = run.finish()
    assert stopped.returncode != 0  # torchrun's own code for a job it stopped
    assert not run.survivors(), "a torchrun worker outlived it"
    signal_name, iteration, iterations = stopped_at(stopped)
    assert signal_name == "SIGTERM" and iteration in (3, 4) and iterations == 6
    resumed = run_entrypoint("entrypoints.train", task)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_from(resumed)[2] is not None
    assert [c["id"] for c in resumed.events("CHECKPOINT")][-1] == 2


def test_a_changed_config_or_project_starts_afresh_and_says_what_changed(tmp_path):
    task = make_task(tmp_path / "task", THREE_EPOCHS)
    kill_after_the_first_checkpoint(task)
    (task / "task_config.json").write_text(json.dumps(dict(THREE_EPOCHS, epochs=1, lr=0.002, data_workers={"train": 1, "val": 0})))
    ann = sorted((task / "data" / "shapes").glob("*/ann/*.json"))[0]
    doc = json.loads(ann.read_text())
    doc["objects"] = doc["objects"][:-1]
    ann.write_text(json.dumps(doc))
    fresh = run_entrypoint("entrypoints.train", task)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    [warning] = [line for line in fresh.lines if "changed" in line]
    # data_workers only says how the run is operated: not a change of run.
    assert warning["changed"] == ["config epochs, lr", "1 item changed"]
    assert warning["file"] == str(state_path(task))
    assert not [line for line in fresh.lines if "resumed_iteration" in line]
    assert [c["id"] for c in fresh.events("CHECKPOINT")] == [0]


def test_resume_never_ignores_the_state(tmp_path):
    task = make_task(tmp_path / "task", THREE_EPOCHS)
    kill_after_the_first_checkpoint(task)
    (task / "task_config.json").write_text(json.dumps(dict(THREE_EPOCHS, epochs=1, resume="never")))
    fresh = run_entrypoint("entrypoints.train", task)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert [line["file"] for line in fresh.lines if line.get("state_ignored")] == [str(state_path(task))]
    assert [m["epoch"] for m in fresh.events("METRICS") if m["type"] == "train"] == [0.5, 1.0]


def _limit_file_size(limit: int):
    def apply() -> None:
        import resource

        # Ignored SIGXFSZ: a write past the limit then fails with EFBIG, as a full disk fails a write.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_failed_checkpoint_write_names_the_path_and_keeps_what_was_written(tmp_path):
    task = make_task(tmp_path / "task", dict(THREE_EPOCHS, epochs=2))
    kill_after_the_first_checkpoint(task)
    before = {"state": digest(state_path(task)), "checkpoint": digest(task / "results" / "00000000" / "model.pt")}

    # Half a model.pt: the next checkpoint's cannot be written, every smaller file can.
    limit = (task / "results" / "00000000" / "model.pt").stat().st_size // 2
    failing = Training(task, preexec=_limit_file_size(limit)).finish()
    assert failing.returncode == 1
    [crash] = failing.events("TASK_CRASHED")
    assert "cannot write checkpoint 00000001" in crash["message"]
    assert str(task / "tmp" / "checkpoints" / "00000001.partial") in crash["message"]
    assert sorted(p.name for p in (task / "results").iterdir()) == ["00000000"]
    assert not (task / "tmp" / "checkpoints" / "00000001.partial").exists()
    assert digest(task / "results" / "00000000" / "model.pt") == before["checkpoint"]
    assert digest(state_path(task)) == before["state"]
