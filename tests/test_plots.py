"""The training curves and the confusion matrix as real PNGs: decoded, sized, and read back at the
pixels where matplotlib's own axes transform puts the logged numbers."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.colors import to_rgb
from PIL import Image

from plugin import plots
from plugin.plots import (
    Series,
    curves_from_records,
    draw_curves,
    read_metrics,
    save_png,
    write_curves,
)
from tests.conftest import REPO, Run
from tests.test_evaluate import GT_A, PRED_A, gt_and_pred

VAL = {1.0: (0.9, 0.2, 0.1), 2.0: (0.5, 0.6, 0.7), 3.0: (0.3, 0.8, 0.9)}  # epoch: (loss, mean IoU, IoU kiwi)


def metrics_line(kind: str, epoch: float, metrics: dict, **extra) -> str:
    """A METRICS line as agent_log writes it (and, without lr, as the legacy plugin did)."""
    return json.dumps({"message": "metrics", "event_type": "EventType.METRICS", "type": kind, "epoch": epoch,
                       "metrics": metrics, **extra, "timestamp": "2026-12-01T10:00:00.000Z", "level": "info"})


def our_log(path: Path, val: dict = VAL) -> Path:
    lines = [json.dumps({"message": "progress", "event_type": "EventType.PROGRESS", "subtask": "Model training: ",
                         "current": 0, "total": 12, "timestamp": "2026-12-01T10:00:00.000Z", "level": "info"})]
    for step in range(1, 13):
        epoch = step / 4
        lines.append(metrics_line("train", epoch, {"loss": 1.2 - 0.08 * step, "accuracy": 0.8}, lr=1e-3 * step / 12))
        if epoch in val:
            loss, mean_iou, kiwi = val[epoch]
            lines.append(metrics_line("val", epoch, {"loss": loss, "accuracy": 0.9, "mean_iou": mean_iou,
                                                     "iou/bg": 0.95, "iou/kiwi": kiwi}, absent_classes=[]))
    path.write_text("\n".join(lines) + "\n")
    return path


def decode(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def colour_near(image: np.ndarray, fig, ax, x: float, y: float, colour, radius: int = 2, tol: int = 40) -> bool:
    """Whether a pixel of `colour` lies within `radius` of where data point (x, y) of `ax` lands."""
    px, py = ax.transData.transform((x, y))
    col, row = int(px), int(fig.bbox.height - py)  # figure pixels count from the bottom, image rows from the top
    patch = image[max(0, row - radius) : row + radius + 1, max(0, col - radius) : col + radius + 1].astype(int)
    target = np.array([round(255 * c) for c in to_rgb(colour)[:3]])
    return bool((np.abs(patch - target).max(axis=-1) <= tol).any())


def line_colour(ax, label: str):
    return next(line.get_color() for line in ax.lines if line.get_label() == label)


def test_curves_put_the_logged_points_where_the_axes_say(tmp_path: Path) -> None:
    curves = curves_from_records(read_metrics(our_log(tmp_path / "train_log.jsonl")))
    fig = draw_curves(curves)
    save_png(fig, tmp_path / "drawn.png")
    image = decode(tmp_path / "drawn.png")
    assert image.shape == (900, 1000, 3)  # three panels of 300 px, 1000 px wide
    loss_ax, iou_ax, lr_ax = fig.axes
    red, black = line_colour(loss_ax, "val loss"), line_colour(iou_ax, "val mean IoU")
    for epoch, (loss, mean_iou, kiwi) in VAL.items():
        assert colour_near(image, fig, loss_ax, epoch, loss, red), epoch
        assert colour_near(image, fig, iou_ax, epoch, mean_iou, black), epoch
        assert colour_near(image, fig, iou_ax, epoch, kiwi, line_colour(iou_ax, "IoU kiwi")), epoch
    # Far from every val loss point and from the train loss line: no red there.
    assert not colour_near(image, fig, loss_ax, 2.0, 0.9, red)
    assert colour_near(image, fig, lr_ax, 1.5, 0.5e-3, line_colour(lr_ax, "learning rate"))
    assert [line.get_label() for line in iou_ax.lines] == ["val mean IoU", "IoU bg", "IoU kiwi"]
    # `plot` and progress.png draw exactly this picture from the log.
    write_curves(tmp_path / "train_log.jsonl", tmp_path / "plotted.png")
    assert (tmp_path / "plotted.png").read_bytes() == (tmp_path / "drawn.png").read_bytes()


def test_the_picture_follows_the_log(tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    write_curves(our_log(tmp_path / "a.jsonl"), out)
    before = out.read_bytes()
    changed = {**VAL, 3.0: (0.05, 0.8, 0.9)}
    write_curves(our_log(tmp_path / "b.jsonl", changed), out)
    assert out.read_bytes() != before
    fig = draw_curves(curves_from_records(read_metrics(tmp_path / "b.jsonl")))
    save_png(fig, tmp_path / "check.png")
    image = decode(out)
    red = line_colour(fig.axes[0], "val loss")
    assert colour_near(image, fig, fig.axes[0], 3.0, 0.05, red)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "check.png", "curves.png"]  # no temp file left


def test_a_later_run_replaces_the_figures_from_its_epoch_on(tmp_path: Path) -> None:
    # train_log.jsonl is appended to: a run to epoch 3, a resume from the epoch-2 checkpoint, then a fresh run.
    first = our_log(tmp_path / "first.jsonl").read_text()
    resumed = "\n".join([metrics_line("train", 2.25, {"loss": 0.4}, lr=1e-4),
                         metrics_line("val", 3.0, {"loss": 0.25, "mean_iou": 0.85})])
    log = tmp_path / "train_log.jsonl"
    log.write_text(first + resumed + "\n")
    curves = curves_from_records(read_metrics(log))
    assert curves.val["loss"] == Series((1.0, 2.0, 3.0), (0.9, 0.5, 0.25))
    assert curves.train["loss"].epochs == (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25)
    assert curves.lr.values[-1] == 1e-4
    # A new run's first line is after its first iteration, as early as any line of the earlier run.
    fresh = metrics_line("train", 0.25, {"loss": 2.0}, lr=1e-5)
    log.write_text(first + resumed + "\n" + fresh + "\n")
    curves = curves_from_records(read_metrics(log))
    assert (curves.train["loss"], curves.val, curves.lr) == (Series((0.25,), (2.0,)), {}, Series((0.25,), (1e-5,)))


def run_cli(*args: str) -> Run:
    proc = subprocess.run([sys.executable, "-m", "plugin.cli", *args, "--log-format", "json"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def test_plot_reads_a_legacy_agent_log(tmp_path: Path) -> None:
    # The legacy plugin's lines on stderr as the agent captured them: local times, library text and a
    # traceback between them, NaN where a metric was not defined, a line cut short at the end.
    val = {0.5: (0.7, 0.6, 0.3), 1.0: (0.4, 0.8, 0.55)}  # epoch: (loss, accuracy, dice)
    lines = ["Downloading: 100%|##########| 528M/528M", '{"message": "train", "level": "info"}']
    for it in range(1, 9):
        lines.append(metrics_line("train", it / 8, {"loss": 1.0 - it / 10, "accuracy": 0.7, "dice": float("nan")}))
        if it / 8 in val:
            loss, accuracy, dice = val[it / 8]
            lines.append(metrics_line("val", it / 8, {"loss": loss, "accuracy": accuracy, "dice": dice}))
    lines[5] = "2020-06-01T10:00:00.000000000Z " + lines[5]  # docker logs --timestamps
    cut_short = metrics_line("train", 1.125, {"loss": 0.1})[:60]
    lines += ["Traceback (most recent call last):", '  File "train.py", line 1', cut_short]
    log = tmp_path / "agent.log"
    log.write_text("\n".join(lines) + "\n")

    run = run_cli("plot", "--log", str(log), "--out", str(tmp_path / "curves.png"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.lines[-1]["validations"] == 2
    curves = curves_from_records(read_metrics(log))
    assert len(curves.train["loss"].epochs) == 8 and "dice" not in curves.train and not curves.lr.epochs
    fig = draw_curves(curves)
    save_png(fig, tmp_path / "drawn.png")
    assert (tmp_path / "curves.png").read_bytes() == (tmp_path / "drawn.png").read_bytes()
    image = decode(tmp_path / "curves.png")
    assert image.shape == (600, 1000, 3)  # no learning rate in a legacy log: two panels
    loss_ax, scores_ax = fig.axes
    for epoch, (loss, accuracy, dice) in val.items():
        assert colour_near(image, fig, loss_ax, epoch, loss, line_colour(loss_ax, "val loss"))
        assert colour_near(image, fig, scores_ax, epoch, accuracy, line_colour(scores_ax, "val accuracy"))
        assert colour_near(image, fig, scores_ax, epoch, dice, line_colour(scores_ax, "val dice"))


def test_plot_of_a_log_without_metrics_fails_naming_the_file(tmp_path: Path) -> None:
    log = tmp_path / "infer_log.jsonl"
    log.write_text('{"message": "model applied", "event_type": "EventType.MODEL_APPLIED", "level": "info"}\n')
    run = run_cli("plot", "--log", str(log), "--out", str(tmp_path / "curves.png"))
    assert run.returncode == 1
    crash = run.lines[-1]
    assert crash["event_type"] == "EventType.TASK_CRASHED" and crash["main_name"] == "UNET_V2_PLOT"
    assert crash["message"] == f"{log}: no METRICS lines (train or val figures) in this log: nothing to plot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["infer_log.jsonl"]


def test_training_writes_progress_png_from_its_log(trained_task, tmp_path: Path) -> None:
    root, run = trained_task
    assert run.returncode == 0, run.stderr[-3000:]
    train = [m for m in run.events("METRICS") if m["type"] == "train"]
    assert all(isinstance(m["lr"], float) and m["lr"] > 0 for m in train)
    progress = root / "tmp" / "progress.png"
    assert decode(progress).shape == (900, 1000, 3)
    # The last redraw came after the last METRICS line: it is the picture `plot` draws from the whole log.
    write_curves(root / "tmp" / "train_log.jsonl", tmp_path / "plotted.png")
    assert progress.read_bytes() == (tmp_path / "plotted.png").read_bytes()
    assert not [p.name for p in (root / "tmp").iterdir() if p.name.endswith(".tmp")]


def test_a_picture_that_cannot_be_drawn_only_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from plugin.training.task import write_progress

    (tmp_path / "progress.png").mkdir()  # os.replace cannot put a file there
    with caplog.at_level(logging.WARNING, logger="plugin"):
        write_progress(our_log(tmp_path / "train_log.jsonl"), tmp_path / "progress.png")
    [record] = [r for r in caplog.records if "training goes on" in r.getMessage()]
    assert str(tmp_path / "progress.png") in record.getMessage()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["progress.png", "train_log.jsonl"]


def test_evaluate_draws_the_confusion_matrix(tmp_path: Path) -> None:
    gt, pred = gt_and_pred(tmp_path, [GT_A], [PRED_A])
    png, report_path = tmp_path / "confusion.png", tmp_path / "metrics.json"
    run = run_cli("evaluate", "--gt", str(gt), "--pred", str(pred), "--out", str(report_path), "--confusion-png", str(png))
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(report_path.read_text())
    # bg 0, a 1, b 2, c 3; rows ground truth: 72 bg pixels right, 12 each way wrong, 4 of a right.
    assert report["confusion_matrix"] == [[72, 12, 0, 0], [12, 4, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    fig = plots.confusion_figure(report)
    save_png(fig, tmp_path / "drawn.png")
    assert png.read_bytes() == (tmp_path / "drawn.png").read_bytes()
    image = decode(png)
    assert image.shape == (600, 600, 3)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [t.get_text() for t in ax.get_yticklabels()] == ["bg", "a", "b", "c"]
    blues = colormaps["Blues"]
    # Off the cell centres, where the annotations are: colours are the row shares.
    for (row, col), share in {(0, 0): 72 / 84, (0, 1): 12 / 84, (1, 0): 0.75, (1, 1): 0.25, (2, 2): 0.0}.items():
        assert colour_near(image, fig, ax, col - 0.3, row - 0.3, blues(share), radius=1, tol=6), (row, col)
    annotations = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert annotations[(1, 1)] == "25.0%\n4" and annotations[(0, 0)] == "85.7%\n72"
