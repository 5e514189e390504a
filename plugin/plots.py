"""Pictures: the training curves from a log's METRICS lines, and evaluate's confusion matrix.

The curves are read back from the log itself (tmp/train_log.jsonl, or a legacy agent log), so the
progress.png that training redraws after each validation is the picture `sly-unet plot` draws from
the same log. Figures are matplotlib `Figure`s on an Agg canvas, never pyplot: no GUI backend, no
global figure registry, and matplotlib's backend setting is left to whoever else uses it. matplotlib
is imported at the first drawing (about half a second), not with this module.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from plugin.agent_log import EVENT_METRICS
from plugin.errors import TaskError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
CURVES_WIDTH_IN, PANEL_HEIGHT_IN = 10.0, 3.0
LEGEND_ENTRY_IN = 0.19  # a legend line at fontsize "small", with its spacing
# Legacy logs have no IoU: their val accuracy and dice take the scores panel.
LEGACY_SCORES = ("accuracy", "dice")


@dataclass(frozen=True)
class MetricsRecord:
    """One METRICS line: `kind` "train" or "val", the figures, and the LR (train lines of ours only)."""

    kind: str
    epoch: float
    metrics: dict[str, float]
    lr: float | None = None


@dataclass(frozen=True)
class Series:
    epochs: tuple[float, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class Curves:
    """Each metric's series by epoch: `train` and `val` by metric name, `lr` empty for legacy logs."""

    train: dict[str, Series]
    val: dict[str, Series]
    lr: Series


def read_metrics(path: Path) -> list[MetricsRecord]:
    """The METRICS lines of a log file, in order: JSON lines as we write them (tmp/train_log.jsonl,
    stdout) or as the legacy plugin wrote them (stderr, in an agent log).

    Other lines are skipped: other events, plain text (tracebacks, library output) and a line cut
    short while the log is being written. Text before a line's first `{` is ignored, so prefixed
    lines (`docker logs --timestamps`) are read too. Non-numeric figures are left out.
    """
    path = Path(path)
    try:
        # A log may hold any bytes a crashing library printed; those lines are skipped, not fatal.
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = [line for line in file if EVENT_METRICS in line]
    except FileNotFoundError:
        raise TaskError("file not found", where=path) from None
    except IsADirectoryError:
        raise TaskError("expected a log file, found a directory", where=path) from None
    return [record for record in map(_parse_metrics, lines) if record is not None]


def _parse_metrics(line: str) -> MetricsRecord | None:
    try:
        doc = json.loads(line[line.find("{"):])
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("event_type") != EVENT_METRICS or doc.get("type") not in ("train", "val"):
        return None
    epoch, metrics = doc.get("epoch"), doc.get("metrics")
    if not _is_number(epoch) or not isinstance(metrics, dict):
        return None
    lr = doc.get("lr")
    return MetricsRecord(doc["type"], float(epoch), {str(k): float(v) for k, v in metrics.items() if _is_number(v)},
                         float(lr) if _is_number(lr) else None)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curves_from_records(records: list[MetricsRecord]) -> Curves:
    """The series of a log's records, as the last run that wrote them left them.

    tmp/train_log.jsonl is appended to by every run on a task dir. A line whose epoch is not past
    the last of its kind starts a run again (a new run from 0, or a resume from an earlier
    checkpoint): it replaces every figure logged from its epoch on. A run's first line comes after its
    first iteration, so a new run replaces the whole earlier one.
    """
    kept: list[MetricsRecord] = []
    last: dict[str, float] = {}
    for record in records:
        if record.kind in last and record.epoch <= last[record.kind]:
            kept = [r for r in kept if r.epoch < record.epoch]
            last = {r.kind: r.epoch for r in kept}
        kept.append(record)
        last[record.kind] = record.epoch
    lr = [(r.epoch, r.lr) for r in kept if r.kind == "train" and r.lr is not None]
    return Curves(_series(kept, "train"), _series(kept, "val"), _pairs(lr))


def _series(records: list[MetricsRecord], kind: str) -> dict[str, Series]:
    points: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        if record.kind == kind:
            for name, value in record.metrics.items():
                points.setdefault(name, []).append((record.epoch, value))
    return {name: _pairs(pairs) for name, pairs in points.items()}


def _pairs(pairs: list[tuple[float, float]]) -> Series:
    return Series(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))


def draw_curves(curves: Curves) -> Figure:
    """Stacked panels over the epochs: train and val loss; val mean IoU and per-class IoU (legacy
    logs: val accuracy and dice); the learning rate when the log has it. 1000 px wide, 300 px a panel;
    the IoU panel grows past 9 classes, so that its legend fits beside it."""
    ious = {name.split("/", 1)[1]: s for name, s in curves.val.items() if name.startswith("iou/")}
    heights = [PANEL_HEIGHT_IN, max(PANEL_HEIGHT_IN, LEGEND_ENTRY_IN * (len(ious) + 1) + 1.0)]
    heights += [PANEL_HEIGHT_IN] if curves.lr.epochs else []
    width, height = CURVES_WIDTH_IN, sum(heights)
    fig = _figure(width, height, layout=None)
    axes = fig.subplots(len(heights), 1, sharex=True, squeeze=False, height_ratios=heights)[:, 0]
    # Fixed margins in inches (room for the tick labels, the title and the legends on the right):
    # a layout engine would double the cost of a redraw after every validation.
    fig.subplots_adjust(left=0.9 / width, right=1 - 2.5 / width, bottom=0.6 / height, top=1 - 0.5 / height,
                        hspace=0.15)

    loss = axes[0]
    _line(loss, curves.train.get("loss"), "train loss", "tab:blue", width=1.0)
    _line(loss, curves.val.get("loss"), "val loss", "tab:red", marker="o")
    loss.set_ylabel("loss")

    scores = axes[1]
    if "mean_iou" in curves.val or ious:
        _line(scores, curves.val.get("mean_iou"), "val mean IoU", "black", width=2.5, marker="o")
        palette = _palette(len(ious))
        for (title, series), color in zip(ious.items(), palette):
            _line(scores, series, f"IoU {title}", color, marker=".", style="--")
        scores.set_ylabel("val IoU")
    else:
        for name, color in zip(LEGACY_SCORES, ("black", "tab:purple")):
            _line(scores, curves.val.get(name), f"val {name}", color, marker="o")
        scores.set_ylabel("val scores")
    scores.set_ylim(-0.02, 1.02)

    if curves.lr.epochs:
        _line(axes[2], curves.lr, "learning rate", "tab:green")
        axes[2].set_ylabel("learning rate")
        axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axes[-1].set_xlabel("epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.suptitle(_curves_title(curves))
    return fig


def _line(ax, series: Series | None, label: str, color, width: float = 1.5, marker: str | None = None,
          style: str = "-") -> None:
    if series is None or not series.epochs:
        return
    ax.plot(series.epochs, series.values, label=_text(label), color=color, linewidth=width, linestyle=style,
            marker=marker, markersize=5 if marker == "o" else 6)


def _curves_title(curves: Curves) -> str:
    val = curves.val
    if "loss" not in val:
        return "training curves (no validation yet)"
    text = f"last validation: epoch {val['loss'].epochs[-1]:.2f}, val loss {val['loss'].values[-1]:.4f}"
    if "mean_iou" in val:
        text += f", mean IoU {val['mean_iou'].values[-1]:.4f}"
    return text


def draw_confusion(matrix: list[list[int]], titles: list[str], caption: str = "") -> Figure:
    """The confusion matrix (rows: ground truth, columns: prediction), each row coloured by its share
    of the row's pixels, every cell annotated with that share and its pixel count; class titles on
    both axes. Square: 600 px, or 2.5 in plus 0.55 in a class when that is more (at most 40 in)."""
    counts = np.asarray(matrix, dtype=np.float64)
    n = len(titles)
    rows = counts.sum(axis=1, keepdims=True)
    # A class with no ground-truth pixels has an empty row: white, not 0/0.
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    side = confusion_side_in(n)
    fig = _figure(side, side, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    labels = [_text(t) for t in titles]
    ax.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    size = max(5.0, min(9.0, 60.0 / max(n, 1)))
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{100 * shares[i, j]:.1f}%\n{int(counts[i, j]):,}", ha="center", va="center",
                    fontsize=size, color="white" if shares[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the ground-truth class's pixels")
    if caption:
        ax.set_title(_text(caption))
    return fig


def confusion_side_in(n_classes: int) -> float:
    """The confusion picture's side in inches: room for the titles and the annotated cells."""
    return min(40.0, max(6.0, 2.5 + 0.55 * n_classes))


def save_png(fig: Figure, path: Path) -> None:
    """Write `fig` to `path` as a PNG through a temp file in the same folder and os.replace, so a
    reader never sees half a picture and a symbolic link at `path` is replaced, never written through."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp's 0600 would hide the picture from the group that reads the task dir.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as file:
            fig.savefig(file, format="png", dpi=DPI)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_curves(log_path: Path, out_path: Path) -> Curves:
    """Draw the curves of the log at `log_path` to `out_path` (the `plot` command, and progress.png)."""
    records = read_metrics(log_path)
    if not records:
        raise TaskError("no METRICS lines (train or val figures) in this log: nothing to plot", where=log_path)
    curves = curves_from_records(records)
    save_png(draw_curves(curves), out_path)
    return curves


def confusion_figure(report: dict) -> Figure:
    """An evaluate report's confusion matrix (evaluate.py's report), captioned with its mean IoU."""
    mean_iou = report["mean_iou"]
    caption = f"{report['images']} images, mean IoU " + ("n/a" if mean_iou is None else f"{mean_iou:.4f}")
    return draw_confusion(report["confusion_matrix"], list(report["classes"]), caption)


def write_confusion(report: dict, out_path: Path) -> None:
    """Draw an evaluate report's confusion matrix to `out_path`."""
    save_png(confusion_figure(report), out_path)


def _text(text: str) -> str:
    # Paired dollar signs in a class title would be parsed as mathtext (and can fail to draw).
    return text.replace("$", r"\$")


def _palette(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](i / (n - 1)) for i in range(n)]


def _figure(width_in: float, height_in: float, layout: str | None) -> Figure:
    """A figure on its own Agg canvas, whatever backend matplotlib is set to elsewhere."""
    # Only here: importing matplotlib costs about half a second that `sly-unet --help` and inference need not pay.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig
