"""A synthetic project in Supervisely format: the demo's data and the end-to-end tests' fixture.

Textured backgrounds carry three classes drawn from every geometry the trainer reads (rings as
polygons with holes, blobs as bitmaps, boxes as rectangles) plus a neutral class, with train/val
tags. Pixels are painted from the annotation's own rasterization, so images and labels agree exactly.
natural_image makes photograph-like content for the decoding tests and the loader benchmark.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from plugin.files import write_json
from plugin.format.classes import create_mapping
from plugin.format.geometry import encode_bitmap
from plugin.format.masks import rasterize
from plugin.format.project import read_annotation, read_meta

CLASSES = [
    {"title": "ring", "shape": "polygon", "color": "#E04040"},
    {"title": "blob", "shape": "bitmap", "color": "#40C040"},
    {"title": "box", "shape": "rectangle", "color": "#4060E0"},
    {"title": "neutral", "shape": "polygon", "color": "#E0E040"},
]
# Painted colours (RGB) differ from the meta colours on purpose: the net must learn from pixels.
PAINT = {"ring": (200, 70, 60), "blob": (70, 170, 80), "box": (60, 90, 200), "neutral": (210, 200, 70)}
TAGS = [
    {"name": "train", "value_type": "none", "color": "#00FF00"},
    {"name": "val", "value_type": "none", "color": "#0000FF"},
]


def _ring(rng: np.random.Generator, size: int) -> dict:
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    outer = rng.uniform(0.12, 0.22) * size
    inner = outer * rng.uniform(0.35, 0.6)
    angles = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    exterior = [[float(cx + outer * np.cos(a)), float(cy + outer * np.sin(a))] for a in angles]
    hole = [[float(cx + inner * np.cos(a)), float(cy + inner * np.sin(a))] for a in angles[::-1]]
    return {"geometryType": "polygon", "points": {"exterior": exterior, "interior": [hole]}}


def _blob(rng: np.random.Generator, size: int) -> dict:
    mask = np.zeros((size, size), np.uint8)
    center = tuple(int(v) for v in rng.uniform(0.15, 0.85, 2) * size)
    axes = tuple(int(v) for v in rng.uniform(0.06, 0.16, 2) * size)
    cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
    return {"geometryType": "bitmap", "bitmap": encode_bitmap(mask.astype(bool))}


def _box(rng: np.random.Generator, size: int) -> dict:
    left, top = (rng.uniform(0.0, 0.7, 2) * size).astype(int)
    w, h = (rng.uniform(0.12, 0.3, 2) * size).astype(int)
    return {"geometryType": "rectangle", "points": {"exterior": [[int(left), int(top)], [int(left + w), int(top + h)]], "interior": []}}


def _neutral(rng: np.random.Generator, size: int) -> dict:
    x, y = rng.uniform(0.0, 0.9, 2) * size
    r = 0.06 * size
    return {"geometryType": "polygon", "points": {"exterior": [[x, y], [x + 2 * r, y], [x + r, y + 2 * r]], "interior": []}}


MAKERS = {"ring": _ring, "blob": _blob, "box": _box, "neutral": _neutral}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    noise = rng.normal(0, 1, (size // 8 + 1, size // 8 + 1, 3)).astype(np.float32)
    smooth = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0, 6, (size, size, 3))
    return np.clip(120 + 25 * smooth + grain, 0, 255).astype(np.uint8)


def natural_image(height: int, width: int, seed: int) -> np.ndarray:
    """RGB uint8 with the statistics of a photograph, where smooth test images would hide decoding
    differences and flatter a JPEG decoder's speed: a 1/f amplitude spectrum per channel (pixel std
    40), and a dozen shapes with sharp edges in random colours."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    frequency = np.hypot(fx, fy)
    frequency[0, 0] = 1.0
    channels = []
    for _ in range(3):
        spectrum = (rng.normal(size=frequency.shape) + 1j * rng.normal(size=frequency.shape)) / frequency
        texture = np.fft.irfft2(spectrum, s=(height, width))
        channels.append((texture - texture.mean()) / texture.std())
    image = np.clip(128 + 40 * np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
    for _ in range(12):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.circle(image, centre, int(rng.integers(5, max(6, min(height, width) // 4))), colour, -1, cv2.LINE_AA)
        else:
            cv2.fillPoly(image, [rng.integers(0, [width, height], (5, 2)).astype(np.int32)], colour)
    return image


def create_project(root: Path, n_train: int, n_val: int, size: int = 96, seed: int = 0) -> Path:
    """Write a project with n_train + n_val images of size x size into root; returns root."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "meta.json", {"classes": CLASSES, "tags": TAGS})
    meta = read_meta(root)
    mapping = create_mapping(meta, "bg", "neutral")
    titles = {idx: title for title, idx in mapping.with_neutral().items()}
    for i in range(n_train + n_val):
        dataset = "shapes_a" if i % 2 == 0 else "shapes_b"
        img_dir, ann_dir = root / dataset / "img", root / dataset / "ann"
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        order = ["ring", "blob", "box"] * 2
        rng.shuffle(order)
        objects = [{"classTitle": t, "tags": [], **MAKERS[t](rng, size)} for t in order[: rng.integers(2, 6)]]
        objects.append({"classTitle": "neutral", "tags": [], **_neutral(rng, size)})
        tag = "train" if i < n_train else "val"
        ann = {"size": {"height": size, "width": size}, "tags": [{"name": tag, "value": None}], "objects": objects}
        # Lossless PNG for most, JPEG for some, so both decoders are exercised.
        name = f"img_{i:04d}.{'jpg' if i % 5 == 4 else 'png'}"
        ann_path = ann_dir / f"{name}.json"
        write_json(ann_path, ann)

        labels = rasterize(read_annotation(ann_path, meta), mapping)
        image = _background(rng, size)
        for idx in np.unique(labels):
            title = titles.get(int(idx))
            if title in PAINT:
                shade = rng.normal(0, 12, 3)
                image[labels == idx] = np.clip(np.array(PAINT[title]) + shade, 0, 255).astype(np.uint8)
        cv2.imwrite(str(img_dir / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return root
