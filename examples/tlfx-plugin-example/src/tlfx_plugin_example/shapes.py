"""``shapes[:N]``: synthetic images of four shapes drawn with Pillow, N per class (default 50), reproducible."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from tlfx.datasets import ArrayDataset
from tlfx.errors import TlfxError

SHAPES = ["circle", "square", "triangle", "star"]
SIZE = 64
ROTATION_JITTER = 0.2  # radians: shapes stay roughly upright, so orientation histograms tell them apart
SEEDS = {"train": 1, "test": 2}  # different images per split, the same images every time


def _polygon(cx, cy, r, n, rotation, inner=None):
    points = []
    for k in range(n * (2 if inner else 1)):
        radius = inner if inner and k % 2 else r
        a = rotation + k * math.pi / (n if inner else n / 2)
        points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return points


def draw_shape(shape: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One ``size x size`` RGB uint8 image of ``shape``: random colours, position, scale and rotation."""
    background = rng.integers(0, 256, 3)
    fill = (background + rng.integers(80, 176, 3)) % 256  # far enough from the background in every channel
    img = Image.new("RGB", (size, size), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.36) * size
    cx, cy = rng.uniform(r, size - r, 2)
    rotation = ROTATION_JITTER * rng.uniform(-1, 1)
    colour = tuple(int(c) for c in fill)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r, 4, rotation), fill=colour)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rotation), fill=colour)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r, 5, rotation, inner=r * 0.45), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    return np.asarray(img)


def shapes_dataset(arg, split=None, root=None) -> ArrayDataset:
    """The dataset factory tlfx calls: ``factory(arg, split, root)`` for the spec ``shapes[:N]``."""
    try:
        per_class = int(arg) if arg else 50
    except ValueError:
        per_class = 0
    if per_class < 1:
        raise TlfxError(f"shapes:{arg} is not valid; pass shapes:N with N >= 1 images per class (e.g. shapes:50)")
    split = split or "train"
    if split not in SEEDS:
        raise TlfxError(f"unknown split {split!r} for dataset 'shapes'; valid choices: {', '.join(SEEDS)}")
    rng = np.random.default_rng(SEEDS[split])
    labels = np.tile(np.arange(len(SHAPES)), per_class)  # interleaved, so --limit keeps every class
    images = np.stack([draw_shape(SHAPES[k], rng) for k in labels])
    return ArrayDataset(f"shapes:{per_class}", split, images, labels, SHAPES)
