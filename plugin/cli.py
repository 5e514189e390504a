"""The `sly-unet` command: train, infer, serve, predict, export, evaluate, masks, augment-preview, plot, demo.
Each subcommand runs inside the agent's crash wrapper."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from plugin import agent_log
from plugin.config.typed import BACKENDS, SDK_RUNTIMES
from plugin.errors import Stopped, TaskError

log = logging.getLogger(__name__)

# Handlers import their stage lazily: `masks` and `--help` should not pay for importing torch.


def _train(args: argparse.Namespace) -> None:
    from plugin.task_dir import resolve_task_dir
    from plugin.training.task import train_task

    train_task(resolve_task_dir(args.task_dir))


def _infer(args: argparse.Namespace) -> None:
    from plugin.inference.task import infer_task
    from plugin.task_dir import resolve_task_dir

    summary = infer_task(resolve_task_dir(args.task_dir))
    log.info(
        f"wrote {summary.output_dir} ({summary.images} images, {summary.objects} objects added, {summary.skipped} skipped)",
        extra={"output_project": str(summary.output_dir)},
    )


def _serve(args: argparse.Namespace) -> None:
    import os

    from plugin.inference.serve import serve
    from plugin.inference.serving import ServeOptions
    from plugin.task_dir import DEFAULT_TASK_DIR, TASK_DIR_ENV

    # No task dir is needed, only its model/: a missing one is the loader's error naming the files.
    task_dir = Path(os.environ.get(TASK_DIR_ENV) or DEFAULT_TASK_DIR)
    serve(ServeOptions(
        Path(args.model) if args.model else task_dir / "model", args.host, args.port, args.device, args.amp,
        _backend(args), args.queue_size, args.max_request_bytes, args.max_image_pixels, args.drain_seconds,
        args.max_batch_files, args.max_async_requests, args.async_ttl_seconds, args.allow_url_fetch,
        args.url_timeout_seconds,
    ))


def _predict(args: argparse.Namespace) -> None:
    import json

    from plugin.files import parse_json, read_json, write_json

    mode = None if args.mode is None else parse_json(args.mode, "--mode")
    if args.model is not None:
        from plugin.inference.predict_local import predict_local

        output = Path(args.output or "predictions")
        summary = predict_local([Path(p) for p in args.input], Path(args.model), output, mode, args.device,
                                _backend(args), args.amp)
        log.info(f"wrote {summary.output_dir} ({summary.images} images, {summary.objects} objects added)",
                 extra={"output_project": str(summary.output_dir)})
        return
    from plugin.inference.client import Client

    if len(args.input) != 1:
        raise TaskError(f"a server predicts one image per call, not {len(args.input)}; predict a folder with "
                        "--model instead of --url", where="INPUT")
    annotation = None if args.annotation is None else read_json(Path(args.annotation))
    result = Client(args.url).predict(Path(args.input[0]), mode, annotation, args.confidence)
    if args.output is None:
        print(json.dumps(result))
        return
    write_json(Path(args.output), result)
    log.info(f"wrote {args.output} ({len(result['objects'])} objects)", extra={"objects": len(result["objects"])})


def _evaluate(args: argparse.Namespace) -> None:
    from plugin.format.images import set_max_image_pixels
    from plugin.inference.evaluate import run_evaluate

    if args.max_image_pixels is not None:
        set_max_image_pixels(args.max_image_pixels)
    run_evaluate(
        Path(args.gt), Path(args.pred), args.suffix, Path(args.out) if args.out else None, args.background, args.neutral,
        Path(args.confusion_png) if args.confusion_png else None,
    )


def _masks(args: argparse.Namespace) -> None:
    from plugin.format.images import set_max_image_pixels
    from plugin.format.masks import write_masks

    background, neutral, limit = "bg", "neutral", args.max_image_pixels
    if args.config is not None:
        # Only with --config: the schema validator costs a quarter of the command's start-up.
        from plugin.config.load import read_train_config

        config = read_train_config(Path(args.config))
        background, neutral = config.background, config.neutral
        # The option wins; else the limit the config trains with.
        limit = config.max_image_pixels if limit is None else limit
    if limit is not None:
        set_max_image_pixels(limit)
    workers = None if args.workers == "auto" else int(args.workers)
    count = write_masks(Path(args.project), Path(args.out), background, neutral, workers)
    log.info(
        f"wrote {count} masks and class_title_to_idx.json to {args.out}", extra={"masks": count}
    )


def _augment_preview(args: argparse.Namespace) -> None:
    from plugin.task_dir import resolve_task_dir
    from plugin.training.preview import write_preview

    written = write_preview(resolve_task_dir(args.task_dir), Path(args.out), args.n)
    log.info(f"wrote {len(written)} augmented samples to {args.out}", extra={"previews": len(written)})


def _plot(args: argparse.Namespace) -> None:
    from plugin.plots import write_curves

    curves = write_curves(Path(args.log), Path(args.out))
    validations = len(curves.val["loss"].epochs) if "loss" in curves.val else 0
    log.info(f"wrote {args.out}: the training curves of {args.log} ({validations} validations)",
             extra={"out": args.out, "validations": validations})


def _export(args: argparse.Namespace) -> None:
    from plugin.inference.export import default_output, export_onnx

    model_dir = Path(args.model)
    export_onnx(model_dir, Path(args.out) if args.out else default_output(model_dir))


def _demo(args: argparse.Namespace) -> None:
    from plugin.demo import run_demo

    run_demo(Path(args.out))


# Subcommand -> (main_name in the crash line, handler). The train name is the legacy plugin's.
COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], None]]] = {
    "train": ("UNET_V2_TRAIN", _train),
    "infer": ("UNET_V2_INFERENCE", _infer),
    "serve": ("UNET_V2_SERVICE", _serve),
    "predict": ("UNET_V2_PREDICT", _predict),
    "evaluate": ("UNET_V2_EVALUATE", _evaluate),
    "masks": ("UNET_V2_MASKS", _masks),
    "export": ("UNET_V2_EXPORT", _export),
    "demo": ("UNET_V2_DEMO", _demo),
    "augment-preview": ("UNET_V2_AUGMENT_PREVIEW", _augment_preview),
    "plot": ("UNET_V2_PLOT", _plot),
}


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _workers(text: str) -> str:
    if text != "auto":
        _positive_int(text)
    return text


def _device(text: str) -> int | None:
    """--device: "cpu" (None), "cuda" or "cuda:N" as the SDK spells it, or a CUDA index N."""
    if text == "cpu":
        return None
    index = {"cuda": "0"}.get(text, text.removeprefix("cuda:"))
    if not index.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not cpu, cuda, cuda:N or a device index N")
    return int(index)


def _backend(args: argparse.Namespace) -> str:
    return SDK_RUNTIMES[args.runtime] if args.runtime is not None else args.backend


def _add_model_options(parser: argparse.ArgumentParser, model_help: str | None) -> None:
    """The options that say how a model is loaded: --model (unless the command has its own), --device,
    --amp, --backend / --runtime."""
    if model_help is not None:
        parser.add_argument("--model", help=f"model directory: config.json and model.pt of a train checkpoint {model_help}")
    parser.add_argument("--device", type=_device, default=0,
                        help="cpu, cuda, cuda:N or N (default: 0, the first CUDA device; the CPU without CUDA)")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                        help="precision of the forward, as model.amp of the inference config (default: auto)")
    backend = parser.add_mutually_exclusive_group()
    backend.add_argument("--backend", choices=BACKENDS, default="torch",
                         help="run model.pt with torch, or model.onnx (from `sly-unet export`) with onnxruntime "
                         "(default: torch)")
    backend.add_argument("--runtime", choices=tuple(SDK_RUNTIMES), help="the same, as the Supervisely SDK names it")


def _add_pixel_limit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-image-pixels",
        type=_positive_int,
        help="refuse images, bitmaps and annotation sizes of more pixels (width x height); default 2^28, "
        "at most 2^30",
    )


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sly-unet", description="UNet v2 segmentation for Supervisely task dirs.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--log-format",
            choices=("auto", "json", "human"),
            default="auto",
            help="json: the agent's log lines; human: progress bar and metric lines; auto: human on a terminal",
        )
        return p

    p = add("train", "train on a task dir (the train container's command)")
    p.add_argument("--task-dir", help="task directory (default: $SLY_TASK_DIR, else /sly_task_data)")

    p = add("infer", "apply a trained model to a task dir's project (the inference container's command)")
    p.add_argument("--task-dir", help="task directory (default: $SLY_TASK_DIR, else /sly_task_data)")

    p = add("serve", "serve a trained model over HTTP: POST /model/inference, GET /model/info, GET /health, and "
            "the Supervisely SDK's routes (Session, ModelAPI)")
    _add_model_options(p, "(default: the task dir's model/: $SLY_TASK_DIR/model, else /sly_task_data/model, as the "
                       "legacy REST server)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free port, logged)")
    p.add_argument("--queue-size", type=_positive_int, default=16,
                   help="requests that may wait for the model; more get 503 with Retry-After (default: 16)")
    p.add_argument("--max-request-bytes", type=_positive_int, default=64 * 2**20,
                   help="larger requests get 413 (default: 64 MiB)")
    p.add_argument("--drain-seconds", type=float, default=60.0,
                   help="on SIGTERM, how long the requests in flight may take to finish (default: 60)")
    p.add_argument("--max-batch-files", type=_positive_int, default=64,
                   help="images in one /inference_batch(_async) request; more get 413 (default: 64)")
    p.add_argument("--max-async-requests", type=_positive_int, default=8,
                   help="async requests held at once, each with its images and unpopped results; more get 429 "
                   "(default: 8)")
    p.add_argument("--async-ttl-seconds", type=float, default=600.0,
                   help="an async request no client asked about for this long is stopped and dropped (default: 600)")
    p.add_argument("--allow-url-fetch", action="store_true",
                   help="let /inference_image_url fetch http(s) URLs (off: 403), within --max-request-bytes")
    p.add_argument("--url-timeout-seconds", type=float, default=30.0,
                   help="how long /inference_image_url may take to fetch an image (default: 30)")
    _add_pixel_limit(p)

    p = add("predict", "predict images with a model in this process (--model), as the Supervisely SDK's predict "
            "verb, or send one image to a running `sly-unet serve` (--url)")
    p.add_argument("input", nargs="+", metavar="INPUT",
                   help="image files, a folder of images, or a Supervisely project (--model); one image (--url)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="the server, e.g. http://127.0.0.1:8000")
    where.add_argument("--model", help="model directory: config.json and model.pt of a train checkpoint")
    _add_model_options(p, None)
    p.add_argument("--mode", help='the inference mode as JSON, e.g. \'{"name": "sliding_window"}\' '
                   "(default: full_image)")
    p.add_argument("--annotation", help="--url: the image's annotation JSON file (bboxes predicts inside its objects)")
    p.add_argument("--confidence", action="store_true", help="--url: each object also gets its confidence map")
    p.add_argument("--output", help="--model: the Supervisely project to write (default: ./predictions); --url: "
                   "the annotation file to write (default: print it on stdout)")

    p = add("evaluate", "compare a predicted project with the ground-truth project: IoU, Dice, accuracy")
    p.add_argument("--gt", required=True, help="ground-truth project (or a folder holding one)")
    p.add_argument("--pred", required=True, help="predicted project, e.g. the inference output")
    p.add_argument("--suffix", default="_unet", help="suffix of the predicted class titles (default: _unet)")
    p.add_argument("--out", help="also write the metrics as JSON to this file")
    p.add_argument("--background", default="bg", help="background class title (default: bg)")
    p.add_argument("--neutral", default="neutral", help="neutral class title, ignored (default: neutral)")
    p.add_argument("--confusion-png", help="also draw the confusion matrix (row shares and pixel counts) to this PNG")
    _add_pixel_limit(p)

    p = add("masks", "write the training targets of a project as PNG class masks, for checking annotations")
    p.add_argument("--project", required=True, help="project directory (meta.json + datasets)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", help="task_config.json to take special_classes and max_image_pixels from "
                   "(default: bg / neutral, 2^28)")
    p.add_argument("--workers", type=_workers, default="auto",
                   help="processes that draw and write the masks (default: auto, one per available core)")
    _add_pixel_limit(p)

    p = add("augment-preview", "write augmented training samples as PNGs, the mask overlaid in the class colours")
    p.add_argument("--task-dir", help="task directory (default: $SLY_TASK_DIR, else /sly_task_data)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=_positive_int, default=16, help="how many samples (default: 16)")

    p = add("plot", "draw the training curves (loss, val IoU, learning rate) of a train log as a PNG")
    p.add_argument("--log", required=True, help="tmp/train_log.jsonl, or an agent log of a legacy UNet v2 training")
    p.add_argument("--out", required=True, help="the PNG to write")

    p = add("export", "write a trained model as ONNX (dynamic batch and size, softmax included) for onnxruntime")
    p.add_argument("--model", required=True, help="model folder: config.json + model.pt (a task dir's model/ "
                   "or a checkpoint in results/)")
    p.add_argument("--out", help="the .onnx file to write (default: model.onnx in the model folder, where "
                   "the inference backend onnxruntime reads it)")

    p = add("demo", "generate a synthetic task dir and train on it on the CPU")
    p.add_argument("--out", default="build/demo", help="where the demo task dir goes (default: build/demo)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = create_parser().parse_args(argv)
    agent_log.setup(args.log_format)
    main_name, handler = COMMANDS[args.command]
    try:
        return agent_log.run_main(main_name, lambda: handler(args))
    except Stopped as stopped:
        # A stop signal, as a process killed by it would report (docker stop: 143).
        if not stopped.logged:
            name = signal.Signals(stopped.signum).name
            log.warning(f"stopped by {name} before training started; nothing was trained, so there is no new "
                        "resume state", extra={"signal": name})
        return 128 + stopped.signum


if __name__ == "__main__":
    sys.exit(main())
