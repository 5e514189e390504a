"""`sly-unet export` and the onnxruntime backend: the file's graph and metadata, parity with torch in
every mode, the inference task end to end, and bad model folders. One real export of the session's
trained model serves every test."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnxruntime
import pytest
import torch

from plugin.config.load import read_inference_config
from plugin.errors import TaskError
from plugin.format.images import read_image
from plugin.format.project import list_items, read_annotation, read_meta
from plugin.inference import modes
from plugin.inference.client import Client
from plugin.inference.export import export_onnx
from plugin.inference.onnx_model import OnnxNetwork
from plugin.inference.predictor import Predictor, load_predictor
from plugin.inference.task import infer_task
from plugin.synthetic import create_project
from plugin.task_dir import TaskDir
from tests.conftest import REPO, Run, run_entrypoint
from tests.server_process import start_server
from tests.test_infer import MODES, create_inference_task, link_model

TOLERANCE = 1e-4
ALL_FLIPS = ("horizontal", "vertical", "both")


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> tuple[Path, Run]:
    """A model folder (links to the shared checkpoint) with model.onnx written by `sly-unet export`."""
    model_dir = tmp_path_factory.mktemp("export") / "model"
    link_model(checkpoint, model_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "export", "--model", str(model_dir), "--log-format", "json"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    return model_dir, Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def model_dir(exported) -> Path:
    model_dir, run = exported
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return model_dir


@pytest.fixture(scope="module")
def crop_model_dir(model_dir, tmp_path_factory) -> Path:
    """The same network recorded as crop-trained: config.json and the file's metadata both say so."""
    crop_dir = tmp_path_factory.mktemp("crop") / "model"
    crop_dir.mkdir()
    os.link(model_dir / "model.pt", crop_dir / "model.pt")
    config = json.loads((model_dir / "config.json").read_text())
    config["settings"]["scale"] = {"mode": "crop", "factor": 1.0}
    (crop_dir / "config.json").write_text(json.dumps(config))
    proto = onnx.load(str(model_dir / "model.onnx"))
    next(p for p in proto.metadata_props if p.key == "scale").value = json.dumps(config["settings"]["scale"])
    onnx.save(proto, str(crop_dir / "model.onnx"))
    return crop_dir


@pytest.fixture(scope="module")
def predictors(model_dir, crop_model_dir) -> dict[str, tuple[Predictor, Predictor]]:
    """(torch, onnxruntime) predictors of the resize-trained and the crop-trained folder."""
    pairs = {}
    for name, folder in (("resize", model_dir), ("crop", crop_model_dir)):
        pairs[name] = (load_predictor(folder, 0), load_predictor(folder, 0, backend="onnxruntime"))
        assert isinstance(pairs[name][1].network, OnnxNetwork)
    return pairs


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, tuple[np.ndarray, list]]:
    """A real project image (96x96, not the training size) with two of its labels, and a noise image."""
    project = create_project(tmp_path_factory.mktemp("images") / "p", n_train=0, n_val=1, size=96, seed=7)
    [item] = list_items(project)
    labels = read_annotation(item.ann_path, read_meta(project)).labels[:2]
    noise = np.random.default_rng(3).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    return {"real": (read_image(item.image_path), labels), "noise": (noise, labels)}


def test_export_writes_one_file_of_json_log_lines(exported):
    model_dir, run = exported
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [line] = [line for line in run.lines if line.get("onnx")]  # every stdout line parses as JSON
    assert line["onnx"] == str(model_dir / "model.onnx") and line["max_difference"] <= TOLERANCE
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.onnx", "model.pt"]


def test_the_file_outputs_probabilities_at_any_batch_and_multiple_of_32(model_dir, predictors):
    torch_predictor = predictors["resize"][0]
    session = onnxruntime.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    [image], [probs] = session.get_inputs(), session.get_outputs()
    assert (image.name, image.shape[:2], probs.name, probs.shape[:2]) == ("image", ["batch", 3], "probabilities", ["batch", 4])
    generator = torch.Generator().manual_seed(0)
    # The default network (a UNet on efficientnet_lite0) takes sides that are multiples of 32.
    for shape in ((1, 3, 64, 64), (3, 3, 32, 96), (2, 3, 96, 32)):
        batch = torch.randn(shape, generator=generator)
        [out] = session.run(None, {"image": batch.numpy()})
        assert out.shape == (shape[0], 4, *shape[2:])
        assert np.allclose(out.sum(axis=1), 1, atol=1e-5) and out.min() >= 0
        with torch.inference_mode():
            reference = torch_predictor.network(batch).numpy()
        assert np.abs(out - reference).max() <= TOLERANCE, shape


def test_the_metadata_is_enough_to_predict_without_our_code(model_dir, predictors, images):
    config = json.loads((model_dir / "config.json").read_text())
    proto = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    by_index = sorted(config["class_title_to_idx"], key=config["class_title_to_idx"].get)
    assert [c["title"] for c in meta["classes"]] == by_index == ["bg", "blob", "box", "ring"]
    colors = {c["title"]: c["color"] for c in config["out_classes"]}
    assert [c["color"] for c in meta["classes"]] == [colors[t] for t in by_index]
    assert meta["input_size"] == {"width": 64, "height": 64} and meta["size_divisor"] == 32
    assert meta["network"] == config["network"] and meta["network"]["encoder"] == "efficientnet_lite0"
    assert meta["scale"] == {"mode": "resize", "factor": 1.0}
    norm = meta["normalization"]
    assert (norm["mean"], norm["std"]) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

    # A consumer's own preprocessing from the metadata alone, on an image already at the input size.
    image = images["real"][0][:64, :64]
    x = (image.astype(np.float32) / 255 - np.float32(norm["mean"])) / np.float32(norm["std"])
    session = onnxruntime.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    [probs] = session.run(None, {"image": x.transpose(2, 0, 1)[None].copy()})
    ours = modes.full_image(predictors["resize"][0], image).probs
    assert np.abs(probs[0] - ours).max() <= TOLERANCE


def _mode_prediction(mode: str, predictor: Predictor, image: np.ndarray, labels: list) -> modes.Prediction:
    if mode.startswith("full_image"):
        return modes.full_image(predictor, image)
    if mode == "roi":
        return modes.roi(predictor, image, MODES["roi"]["bounds"])
    if mode == "bboxes":
        return modes.bboxes(predictor, image, labels, MODES["bboxes"]["padding"])
    # Four windows on these images, each resized to the 64x64 input, in one forward.
    return modes.sliding_window(predictor, image, (56, 64), (16, 32), 4)


PARITY = {  # case -> (mode, model folder, TTA flips, images); each forward of this UNet costs, so few images
    "full_image": ("full_image", "resize", (), ("real", "noise")),
    "full_image of a crop model with tta": ("full_image", "crop", ("horizontal",), ("real",)),
    "roi": ("roi", "resize", (), ("noise",)),
    "roi with tta": ("roi", "resize", ALL_FLIPS, ("real",)),
    "bboxes": ("bboxes", "resize", (), ("real",)),
    "sliding_window": ("sliding_window", "resize", (), ("real", "noise")),
}


@pytest.mark.parametrize("case", PARITY, ids=list(PARITY))
def test_onnxruntime_predicts_what_torch_does(predictors, images, case):
    mode, folder, flips, names = PARITY[case]
    torch_predictor, ort_predictor = (dataclasses.replace(p, tta=flips) for p in predictors[folder])
    for image, labels in (images[name] for name in names):
        expected = _mode_prediction(mode, torch_predictor, image, labels)
        got = _mode_prediction(mode, ort_predictor, image, labels)
        assert got.probs.shape == expected.probs.shape and got.boxes == expected.boxes
        covered = np.ones(image.shape[:2], bool) if expected.covered is None else expected.covered
        assert np.array_equal(covered, np.ones_like(covered) if got.covered is None else got.covered)
        assert covered.any()
        assert np.abs(got.probs - expected.probs)[:, covered].max() <= TOLERANCE
        # The class maps agree wherever torch's two likeliest classes are not tied within the tolerance.
        top_two = np.sort(expected.probs, axis=0)[-2:]
        tied = top_two[1] - top_two[0] <= 2 * TOLERANCE
        assert np.array_equal(got.class_map()[~tied], expected.class_map()[~tied])


def test_an_inference_task_on_onnxruntime_writes_the_objects_torch_does(model_dir, tmp_path):
    outputs = {}
    for backend in ("torch", "onnxruntime"):
        config = {"model": {"backend": backend}, "mode": {"name": "full_image", "tta": ["vertical"]}}
        task = create_inference_task(tmp_path / backend, model_dir, config)
        if backend == "torch":
            out = infer_task(TaskDir(task)).output_dir
        else:
            run = run_entrypoint("entrypoints.inference", task)
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            [loaded] = [line for line in run.lines if line.get("backend")]
            assert loaded["backend"] == "onnxruntime" and loaded["network"].startswith("onnxruntime")
            out = task / "results" / "shapes"
        outputs[backend] = {item.name: json.loads(item.ann_path.read_text()) for item in list_items(out)}
    assert list(outputs["torch"]) == list(outputs["onnxruntime"]) and len(outputs["torch"]) == 5
    for name, doc in outputs["torch"].items():
        assert outputs["onnxruntime"][name]["objects"] == doc["objects"], name
    assert any(o["classTitle"].endswith("_unet") for doc in outputs["torch"].values() for o in doc["objects"])


def test_the_server_on_onnxruntime_answers_the_objects_torch_infer_adds(model_dir, tmp_path):
    mode = {"name": "sliding_window", "window": {"width": 48, "height": 48}, "min_overlap": {"x": 16, "y": 16}}
    task = create_inference_task(tmp_path / "torch", model_dir, {"mode": mode})
    out = infer_task(TaskDir(task)).output_dir
    server = start_server(model_dir, "--backend", "onnxruntime")
    try:
        server.wait_ready()
        client = Client(server.url)
        assert client.info()["network"].startswith("onnxruntime")
        added = 0
        for item in list_items(task / "data" / "shapes"):
            original = json.loads(item.ann_path.read_text())
            written = json.loads((out / item.dataset / "ann" / f"{item.name}.json").read_text())
            answer = client.predict(item.image_path, mode)
            assert answer["objects"] == written["objects"][len(original["objects"]):], item.name
            added += len(answer["objects"])
        assert added > 0
    finally:
        assert server.stop() == 0


def _folder(tmp_path: Path, model_dir: Path, files: tuple[str, ...] = ("config.json", "model.pt")) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in files:
        os.link(model_dir / name, folder / name)
    return folder


def test_backend_onnxruntime_without_the_file_says_to_export(model_dir, tmp_path):
    folder = _folder(tmp_path, model_dir)
    with pytest.raises(TaskError, match=r"sly-unet export") as error:
        load_predictor(folder, 0, backend="onnxruntime")
    assert error.value.where == str(folder / "model.onnx")


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_an_unreadable_onnx_file_fails_at_start_up(model_dir, tmp_path, content):
    folder = _folder(tmp_path, model_dir)
    with open(model_dir / "model.onnx", "rb") as whole:
        (folder / "model.onnx").write_bytes(b"not a model" if content == "garbage" else whole.read(2**20))
    with pytest.raises(TaskError, match="not a readable ONNX model") as error:
        load_predictor(folder, 0, backend="onnxruntime")
    assert error.value.where == str(folder / "model.onnx")


def test_an_onnx_file_of_another_model_is_refused(model_dir, tmp_path):
    folder = _folder(tmp_path, model_dir, ("model.pt", "model.onnx"))
    config = json.loads((model_dir / "config.json").read_text())
    config["class_title_to_idx"] = {"bg": 0, "blob": 1, "disc": 2, "ring": 3}
    config["settings"]["input_size"] = {"width": 128, "height": 64}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TaskError, match="come from different models") as error:
        load_predictor(folder, 0, backend="onnxruntime")
    message = error.value.message
    assert '"box"' in message and '"disc"' in message and "input_size" in message and "scale" not in message
    assert error.value.where == str(folder / "model.onnx")


def test_an_onnx_file_not_written_by_export_is_refused(model_dir, tmp_path):
    folder = _folder(tmp_path, model_dir)
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Softmax", ["image"], ["probabilities"], axis=1)], "plain",
        [value("image", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [value("probabilities", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    with pytest.raises(TaskError, match="no sly-unet metadata"):
        load_predictor(folder, 0, backend="onnxruntime")


def test_export_without_model_pt_fails_and_writes_nothing(model_dir, tmp_path):
    folder = _folder(tmp_path, model_dir, ("config.json",))
    with pytest.raises(TaskError, match="model.pt") as error:
        export_onnx(folder, folder / "model.onnx")
    assert error.value.where == str(folder / "model.pt")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]


@pytest.mark.parametrize("model, expected", [
    ({"backend": "onnxruntime", "amp": "bf16"}, "model.amp: 'bf16' is a torch autocast"),
    ({"backend": "tensorrt"}, "model.backend"),
])
def test_the_backend_key_is_checked_with_the_config(tmp_path, model, expected):
    path = tmp_path / "task_config.json"
    path.write_text(json.dumps({"model": model, "mode": {"name": "full_image"}}))
    with pytest.raises(TaskError, match=expected):
        read_inference_config(path)
    path.write_text(json.dumps({"model": {"backend": "onnxruntime"}, "mode": {"name": "full_image"}}))
    assert read_inference_config(path).backend == "onnxruntime"


@pytest.mark.parametrize("command, hidden, extra", [
    (["export", "--model", "MODEL"], "onnxscript", "export"),
    (["serve", "--model", "MODEL", "--port", "0"], "uvicorn", "serve"),
])
def test_a_missing_optional_dependency_names_its_extra(model_dir, command, hidden, extra):
    # The package made unimportable, as in an install without the extra.
    code = (f"import sys; sys.modules[{hidden!r}] = None; from plugin.cli import main; "
            f"sys.exit(main({[str(model_dir) if a == 'MODEL' else a for a in command]!r} + ['--log-format', 'json']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    [crash] = [json.loads(line) for line in proc.stdout.splitlines() if "TASK_CRASHED" in line]
    assert hidden in crash["message"] and f"pip install 'sly-unet[{extra}]'" in crash["message"]
