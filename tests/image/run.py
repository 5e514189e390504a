"""`make image-test`: the train, inference and serve images run on small task dirs, as the agent runs them.

    make image-test          # builds the three images first
    .venv/bin/python -m tests.image.run --train-image sly-unet-train:0.1.0 --inference-image sly-unet-inference:0.1.0 \
        --serve-image sly-unet-serve:0.1.0

Not collected by pytest (it needs a container engine and takes minutes). Steps:
1. a synthetic task dir is trained on by the train image and, for reference, by the local entrypoint:
   the container's checkpoints must load and match the local ones, and its stdout must hold the same
   kinds of JSON log lines in the same order;
2. an inference task dir whose model/ is the best checkpoint goes through the inference image: the
   output project must load with plugin.format.project and hold `_unet` predictions next to the input objects;
3. the serve image, started with the SDK's `deploy` verb on the inference task dir's model/ (its default
   /sly_task_data/model), answers each image with the very objects the inference image added to it, and
   `docker stop` ends it with exit 0; its `predict` verb writes the same objects into a project;
4. bad input: a broken config and a missing task dir mount must exit non-zero from `docker run`
   (the latter with one line naming /sly_task_data and -v), and extra arguments reach the entrypoint.
Containers run as the owner of the task dir (`--user UID:GID`), so their files belong to that user; run
as root, the test hands the task dirs to uid 1000 first so that this is exercised. The work dir is
removed on success and kept for inspection on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from plugin.errors import TaskError
from plugin.format.images import read_image
from plugin.format.project import Annotation, list_items, read_annotation, read_meta
from plugin.inference.client import Client
from plugin.nn.weights import load_state_dict
from plugin.synthetic import create_project

REPO = Path(__file__).resolve().parents[2]
MOUNT = "/sly_task_data"
# What the agent sets (agent-protocol.md); the local reference run gets the same.
AGENT_ENV = {"LOG_LEVEL": "DEBUG", "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"}
# Small enough for two CPU cores (checkpoints are ~244 MB whatever the input size), yet enough
# training (8 images x 3 epochs, a high lr) that the model predicts the shapes, not only background;
# val_every 1.5 gives two checkpoints, so "the best one" is a real choice; one loader worker runs
# inside the container.
TRAIN_CONFIG = {
    "input_size": {"width": 64, "height": 64},
    "batch_size": {"train": 4, "val": 2},
    "data_workers": {"train": 1, "val": 0},
    "epochs": 3,
    "val_every": 1.5,
    "lr": 0.003,
    "gpu_devices": [0],
}
BROKEN_CONFIG = {"input_size": {"width": 250, "height": 64}}  # 250 is not a multiple of 16
INFERENCE_CONFIG = {"model": {"gpu_device": 0}, "mode": {"name": "full_image"}}
SUFFIX = "_unet"
PROJECT = "shapes"
HOST_UID_WHEN_ROOT = 1000
LEVELS = {"debug", "info", "warn", "error", "fatal"}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
RUN_TIMEOUT_S = 900
# Seconds the serve container has to load the model and answer /health with 200.
SERVE_READY_S = 120


class Failure(Exception):
    pass


@dataclass
class Run:
    label: str
    returncode: int
    stdout: str
    stderr: str

    def lines(self) -> list[dict]:
        """Every stdout line as the agent reads it; a line that is not a JSON log line is a failure."""
        parsed = []
        for number, text in enumerate(self.stdout.splitlines(), 1):
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                raise Failure(f"{self.label}: stdout line {number} is not JSON: {text[:300]!r}") from None
            if not (isinstance(line, dict) and isinstance(line.get("message"), str)
                    and line.get("level") in LEVELS and TIMESTAMP.match(str(line.get("timestamp", "")))):
                raise Failure(f"{self.label}: stdout line {number} is not an agent log line: {text[:300]}")
            parsed.append(line)
        return parsed

    def events(self, name: str) -> list[dict]:
        return [line for line in self.lines() if line.get("event_type") == f"EventType.{name}"]

    def tail(self) -> str:
        return f"--- stdout (end) ---\n{self.stdout[-3000:]}\n--- stderr (end) ---\n{self.stderr[-3000:]}"


@dataclass
class Docker:
    command: str
    user: str

    def run(self, label: str, image: str, *args: str, task_dir: Path | None = None) -> Run:
        """`docker run` as the agent does it: task dir mounted, the agent's environment, stdout not a tty."""
        # No --rm: with the podman engine of these machines (before podman 4.6) `docker run --rm`
        # reports exit code 0 whatever the container returned; the container is removed below instead.
        name = f"sly-unet-image-test-{os.getpid()}-{label}"
        cmd = [self.command, "run", "--name", name, "--user", self.user]
        for key, value in AGENT_ENV.items():
            cmd += ["-e", f"{key}={value}"]
        if task_dir is not None:
            cmd += ["-v", f"{task_dir}:{MOUNT}"]
        try:
            proc = subprocess.run([*cmd, image, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        finally:
            subprocess.run([self.command, "rm", "-f", name], capture_output=True)
        return Run(label, proc.returncode, proc.stdout, proc.stderr)

    def start(self, label: str, image: str, *args: str, task_dir: Path) -> str:
        """`docker run -d` of a server on the host's network (it binds a loopback port); returns its name."""
        name = f"sly-unet-image-test-{os.getpid()}-{label}"
        subprocess.run([self.command, "rm", "-f", name], capture_output=True)
        cmd = [self.command, "run", "-d", "--name", name, "--user", self.user, "--network", "host",
               "-v", f"{task_dir}:{MOUNT}", image, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        if proc.returncode != 0:
            raise Failure(f"`docker run -d {image}` exited {proc.returncode}: {proc.stderr.strip()}")
        return name

    def stop(self, name: str) -> Run:
        """`docker stop` (SIGTERM, then SIGKILL after 30 s); the container's exit code and logs, then removed."""
        try:
            subprocess.run([self.command, "stop", "-t", "30", name], capture_output=True, timeout=120)
            code = self.inspect_container(name, "{{.State.ExitCode}}")
            logs = subprocess.run([self.command, "logs", name], capture_output=True, text=True)
        finally:
            subprocess.run([self.command, "rm", "-f", name], capture_output=True)
        return Run(name, int(code), logs.stdout, logs.stderr)

    def inspect_container(self, name: str, template: str) -> str:
        proc = subprocess.run([self.command, "inspect", "--format", template, name], capture_output=True, text=True)
        return proc.stdout.strip()

    def inspect(self, image: str, template: str) -> str:
        proc = subprocess.run([self.command, "image", "inspect", "--format", template, image],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise Failure(f"image {image} not found ({proc.stderr.strip()}); build it with `make images`")
        return proc.stdout.strip()


def run_local(label: str, module: str, task_dir: Path) -> Run:
    """The same entrypoint from the plugin's venv, for reference."""
    env = {k: v for k, v in os.environ.items() if k != "SLY_TASK_DIR"} | AGENT_ENV
    proc = subprocess.run([sys.executable, "-m", module, "--task-dir", str(task_dir), "--log-format", "json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    return Run(label, proc.returncode, proc.stdout, proc.stderr)


def expect(condition: bool, message: str, run: Run | None = None) -> None:
    if not condition:
        raise Failure(message + ("\n" + run.tail() if run is not None else ""))


def make_task_dir(root: Path, config: dict) -> Path:
    create_project(root / "data" / PROJECT, n_train=8, n_val=2, size=64, seed=3)
    (root / "task_config.json").write_text(json.dumps(config, indent=4))
    return root


def hand_over(root: Path, user: str) -> None:
    """Give the task dir to the user the container runs as, as a host user's own folder would be."""
    uid, gid = (int(v) for v in user.split(":"))
    for path in [root, *root.rglob("*")]:
        os.chown(path, uid, gid)


def check_owned(root: Path, user: str, what: str) -> None:
    uid = int(user.split(":")[0])
    foreign = [p for p in [root, *root.rglob("*")] if p.stat().st_uid != uid]
    expect(not foreign, f"{what}: files not owned by uid {uid}, the --user of the run: "
           + ", ".join(str(p) for p in foreign[:5]))


def line_kind(line: dict, task_dir: str) -> tuple:
    """What must agree between a container run and a local run: the event, its fields and counters,
    and the text of plain messages (with the task dir path taken out); not timings or metric values."""
    kind: tuple = (line["level"], line.get("event_type"), tuple(sorted(k for k in line if k != "timestamp")))
    event = line.get("event_type")
    if event == "EventType.PROGRESS":
        kind += (line["subtask"], line["current"], line["total"])
    elif event == "EventType.METRICS":
        kind += (line["type"], line["epoch"], tuple(sorted(line["metrics"])))
    elif event == "EventType.CHECKPOINT":
        kind += (line["id"], line["subdir"], tuple(sorted(line["optional"])))
    elif event is None:
        kind += (line["message"].replace(task_dir, "TASK_DIR"),)
    return kind


def compare_logs(container: Run, local: Run, local_dir: Path) -> None:
    ours = [line_kind(line, MOUNT) for line in container.lines()]
    theirs = [line_kind(line, str(local_dir)) for line in local.lines()]
    if ours == theirs:
        return
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    raise Failure(
        f"the train image's log lines differ from a local run's ({len(ours)} vs {len(theirs)} lines); "
        f"first difference at line {at + 1}:\n  container: {ours[at] if at < len(ours) else '(none)'}\n"
        f"  local:     {theirs[at] if at < len(theirs) else '(none)'}"
    )


def check_checkpoints(run: Run, task_dir: Path, reference_dir: Path) -> Path:
    """The checkpoint folders against their CHECKPOINT lines and the local run's; returns the best one."""
    checkpoints = run.events("CHECKPOINT")
    expect(bool(checkpoints), "the train image logged no CHECKPOINT line", run)
    results = task_dir / "results"
    expect(sorted(p.name for p in results.iterdir()) == [c["subdir"] for c in checkpoints],
           f"results/ holds {sorted(p.name for p in results.iterdir())}, the log names "
           f"{[c['subdir'] for c in checkpoints]}")
    reference = reference_dir / "results" / checkpoints[0]["subdir"]
    ref_weights = {k: tuple(v.shape) for k, v in load_state_dict(reference / "model.pt").items()}
    ref_classes = json.loads((reference / "config.json").read_text())["class_title_to_idx"]
    for line in checkpoints:
        folder = results / line["subdir"]
        expect(sorted(p.name for p in folder.iterdir()) == ["config.json", "model.pt"],
               f"{folder}: expected exactly config.json and model.pt")
        expect(line["sizeb"] == sum(p.stat().st_size for p in folder.iterdir()),
               f"{folder}: sizeb {line['sizeb']} in the log is not the folder's size")
        weights = {k: tuple(v.shape) for k, v in load_state_dict(folder / "model.pt").items()}
        expect(weights == ref_weights, f"{folder}/model.pt: parameter names or shapes differ from a local run's")
        classes = json.loads((folder / "config.json").read_text())["class_title_to_idx"]
        expect(classes == ref_classes, f"{folder}/config.json: class_title_to_idx {classes} != local {ref_classes}")
    best = [line for line in checkpoints if line["best_now"]][-1]
    return results / best["subdir"]


def check_output_project(run: Run, task_dir: Path) -> int:
    """The inference output loads with the project reader and holds predictions; returns their count."""
    applied = run.events("MODEL_APPLIED")
    expect(len(applied) == 1, f"expected one MODEL_APPLIED line, got {len(applied)}", run)
    source = task_dir / "data" / PROJECT
    output = task_dir / "results" / PROJECT
    expect(sorted(p.name for p in (task_dir / "results").iterdir()) == [PROJECT],
           f"results/ should hold just the output project {PROJECT}/")
    source_meta, meta = read_meta(source), read_meta(output)
    source_titles = [c.title for c in source_meta.classes]
    new_titles = [c.title for c in meta.classes if c.title not in source_titles]
    expect(all(c in [m.title for m in meta.classes] for c in source_titles), "the output meta lost input classes")
    expect(bool(new_titles) and all(t.endswith(SUFFIX) for t in new_titles),
           f"the output meta should add `{SUFFIX}` classes, added {new_titles}")
    items, source_items = list_items(output), list_items(source)
    expect([(i.dataset, i.name) for i in items] == [(i.dataset, i.name) for i in source_items],
           "the output project's images differ from the input's")
    predicted = 0
    for item, source_item in zip(items, source_items):
        ann: Annotation = read_annotation(item.ann_path, meta)
        image = read_image(item.image_path)
        expect(image.shape[:2] == (ann.height, ann.width), f"{item.image_path}: size differs from its annotation")
        source_labels = read_annotation(source_item.ann_path, source_meta).labels
        kept = [label for label in ann.labels if label.class_title in source_titles]
        expect(len(kept) == len(source_labels),
               f"{item.ann_path}: {len(kept)} input objects kept of {len(source_labels)}")
        predicted += sum(label.class_title in new_titles for label in ann.labels)
    expect(predicted > 0, f"no `{SUFFIX}` object in any of the {len(items)} output annotations")
    return predicted


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_server(docker: Docker, image: str, infer_dir: Path) -> int:
    """The serve image on the inference task dir: every image's answer holds exactly the objects the
    inference image added to it; `docker stop` drains and exits 0. Returns the images compared."""
    port = free_port()
    name = docker.start("serve", image, "deploy", "--device", "cpu", "--runtime", "PyTorch", "--host", "127.0.0.1",
                        "--port", str(port), task_dir=infer_dir)
    client = Client(f"http://127.0.0.1:{port}", timeout=300)
    compared = 0
    try:
        deadline = time.monotonic() + SERVE_READY_S
        while True:
            try:
                if client.health().get("status") == "ready":
                    break
            except TaskError:  # not listening yet
                pass
            if time.monotonic() > deadline:
                raise Failure(f"the serve image answered no /health 200 within {SERVE_READY_S} s")
            time.sleep(0.5)
        source, output = infer_dir / "data" / PROJECT, infer_dir / "results" / PROJECT
        for item in list_items(source):
            answer = client.predict(item.image_path, {"name": "full_image"})
            written = json.loads((output / item.dataset / "ann" / f"{item.name}.json").read_text())
            added = [obj for obj in written["objects"] if obj["classTitle"].endswith(SUFFIX)]
            expect(answer["objects"] == added,
                   f"{item.name}: the server answered {len(answer['objects'])} objects, the inference image "
                   f"added {len(added)}, or they differ")
            compared += 1
    finally:
        stopped = docker.stop(name)
    expect(stopped.returncode == 0, f"the serve image exited {stopped.returncode} after docker stop", stopped)
    return compared


def check_predict_verb(docker: Docker, image: str, infer_dir: Path) -> int:
    """The serve image's `predict` verb on the inference task dir's project: a project in --output whose
    annotations hold the objects the inference image added. Returns the images compared."""
    run = docker.run("predict", image, "predict", f"{MOUNT}/data/{PROJECT}", "--model", f"{MOUNT}/model",
                     "--device", "cpu", "--output", f"{MOUNT}/predicted", "--log-format", "json", task_dir=infer_dir)
    expect(run.returncode == 0, f"the serve image's predict verb exited {run.returncode}", run)
    inferred, predicted = infer_dir / "results" / PROJECT, infer_dir / "predicted"
    compared = 0
    for item in list_items(inferred):
        want = json.loads(item.ann_path.read_text())["objects"]
        got = json.loads((predicted / item.dataset / "ann" / item.ann_path.name).read_text())["objects"]
        expect(got == want, f"{item.name}: the predict verb wrote other objects than the inference image", run)
        compared += 1
    return compared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docker", default="docker", help="the Docker CLI (default: docker)")
    parser.add_argument("--train-image", required=True)
    parser.add_argument("--inference-image", required=True)
    parser.add_argument("--serve-image", required=True)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "image-test", help="scratch dir (emptied)")
    args = parser.parse_args(argv)

    user = f"{HOST_UID_WHEN_ROOT}:{HOST_UID_WHEN_ROOT}" if os.getuid() == 0 else f"{os.getuid()}:{os.getgid()}"
    docker = Docker(args.docker, user)
    work = args.work.absolute()
    started = time.monotonic()

    def step(text: str) -> None:
        print(f"image-test [{time.monotonic() - started:5.0f} s] {text}", flush=True)

    try:
        for image in (args.train_image, args.inference_image, args.serve_image):
            size = int(docker.inspect(image, "{{.Size}}"))
            step(f"{image}: {size / 1e9:.2f} GB")
        if work.exists():
            shutil.rmtree(work)

        step("train image: a 64x64, 3-epoch task; the local entrypoint on a copy for reference")
        train_dir = make_task_dir(work / "train", TRAIN_CONFIG)
        local_dir = work / "local"
        shutil.copytree(train_dir, local_dir)
        hand_over(train_dir, user)
        trained = docker.run("train", args.train_image, task_dir=train_dir)
        expect(trained.returncode == 0, f"the train image exited {trained.returncode}", trained)
        local = run_local("local train", "entrypoints.train", local_dir)
        expect(local.returncode == 0, f"the local train run exited {local.returncode}", local)
        compare_logs(trained, local, local_dir)
        best = check_checkpoints(trained, train_dir, local_dir)
        check_owned(train_dir, user, "train task dir")
        step(f"train image ok: {len(trained.lines())} log lines of the same kinds as the local run, "
             f"checkpoints {[c['subdir'] for c in trained.events('CHECKPOINT')]}, best {best.name}")
        shutil.rmtree(local_dir)

        step(f"inference image: model/ = results/{best.name}")
        infer_dir = work / "infer"
        (infer_dir / "model").mkdir(parents=True)
        for name in ("config.json", "model.pt"):
            shutil.copyfile(best / name, infer_dir / "model" / name)
        shutil.copytree(train_dir / "data", infer_dir / "data")
        (infer_dir / "task_config.json").write_text(json.dumps(INFERENCE_CONFIG, indent=4))
        hand_over(infer_dir, user)
        inferred = docker.run("inference", args.inference_image, task_dir=infer_dir)
        expect(inferred.returncode == 0, f"the inference image exited {inferred.returncode}", inferred)
        predicted = check_output_project(inferred, infer_dir)
        check_owned(infer_dir, user, "inference task dir")
        step(f"inference image ok: results/{PROJECT}/ loads, {predicted} `{SUFFIX}` objects")

        step("serve image: the inference task dir's model/, each image of its project")
        compared = check_server(docker, args.serve_image, infer_dir)
        step(f"serve image ok: {compared} answers equal to the inference image's objects, docker stop exit 0")
        compared = check_predict_verb(docker, args.serve_image, infer_dir)
        step(f"serve image predict verb ok: {compared} annotations equal to the inference image's")

        step("bad input: a broken config, no task dir mounted; extra arguments pass through")
        broken_dir = make_task_dir(work / "broken", BROKEN_CONFIG)
        hand_over(broken_dir, user)
        broken = docker.run("broken", args.train_image, task_dir=broken_dir)
        crashed = broken.events("TASK_CRASHED")
        expect(broken.returncode != 0, "`docker run` exited 0 on a broken config", broken)
        expect(len(crashed) == 1 and "input_size.width" in crashed[0]["message"],
               "a broken config should log one TASK_CRASHED line naming input_size.width", broken)
        for label, image in (("train", args.train_image), ("inference", args.inference_image)):
            unmounted = docker.run(f"{label}-unmounted", image)
            said = [text for text in (unmounted.stdout + unmounted.stderr).splitlines() if text.strip()]
            expect(unmounted.returncode != 0, f"the {label} image exited 0 without a task dir", unmounted)
            expect(len(said) == 1 and MOUNT in said[0] and "-v " in said[0],
                   f"the {label} image without a task dir should print one line naming {MOUNT} and -v, "
                   f"printed {len(said)}", unmounted)
            helped = docker.run(f"{label}-help", image, "--help")
            expect(helped.returncode == 0 and "--task-dir" in helped.stdout,
                   f"`docker run {image} --help` should reach the entrypoint's argument parser", helped)
        step(f"bad input ok: broken config exit {broken.returncode}, missing mount exit {unmounted.returncode}")
    except Failure as failure:
        print(f"image-test FAILED: {failure}\n(work dir kept: {work})", file=sys.stderr, flush=True)
        return 1
    shutil.rmtree(work)
    step("passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
