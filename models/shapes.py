"""Procedural "shapes" data set: one coloured shape on a plain background, 64x64 RGB.

Why procedural: the testbed must ship a model family that can be retrained from scratch
without any download, and whose outputs can be judged automatically (a classifier can tell
whether "a red circle on a white background" came out right). Every sample is a pure
function of an integer seed, so data sets never need to be stored.

Seeds below :data:`HELDOUT_SEED_BASE` are for training; held-out evaluation pairs use seeds
from :data:`HELDOUT_SEED_BASE` upwards, so the two never overlap.
"""

from __future__ import annotations

import re
from functools import lru_cache
from dataclasses import dataclass
from typing import Final

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_SIZE: Final[int] = 64

#: Nominal sRGB values; rendering adds a small per-sample jitter so models do not
#: overfit to exact pixel values.
COLOR_RGB: Final[dict[str, tuple[int, int, int]]] = {
    "red": (230, 25, 25),
    "green": (25, 200, 25),
    "blue": (25, 25, 230),
    "yellow": (235, 225, 20),
    "magenta": (225, 20, 225),
    "cyan": (20, 220, 230),
}
BACKGROUND_RGB: Final[dict[str, tuple[int, int, int]]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
COLORS: Final[tuple[str, ...]] = tuple(COLOR_RGB)
SHAPES: Final[tuple[str, ...]] = ("circle", "square", "triangle")
BACKGROUNDS: Final[tuple[str, ...]] = tuple(BACKGROUND_RGB)

#: All (color, shape, background) combinations in a fixed order (54 of them).
COMBINATIONS: Final[tuple[tuple[str, str, str], ...]] = tuple(
    (c, s, b) for s in SHAPES for c in COLORS for b in BACKGROUNDS
)

#: First seed reserved for held-out evaluation; training uses seeds in [0, HELDOUT_SEED_BASE).
HELDOUT_SEED_BASE: Final[int] = 1_000_000_000

CAPTION_TEMPLATE: Final[str] = "a {color} {shape} on a {background} background"
_CAPTION_RE: Final[re.Pattern[str]] = re.compile(
    r"^a (?P<color>\w+) (?P<shape>\w+) on a (?P<background>\w+) background$"
)

_COLOR_JITTER: Final[int] = 20
_BACKGROUND_JITTER: Final[int] = 8
_MIN_HALF_SIZE: Final[float] = 9.0
_MAX_HALF_SIZE: Final[float] = 22.0


@dataclass(frozen=True)
class ShapeSample:
    """One rendered sample together with its caption and labels."""

    image: np.ndarray  # (64, 64, 3) uint8
    caption: str
    color: str
    shape: str
    background: str


def make_caption(color: str, shape: str, background: str) -> str:
    """Caption in the one fixed template the text encoder is trained on."""
    return CAPTION_TEMPLATE.format(color=color, shape=shape, background=background)


def caption_to_labels(caption: str) -> tuple[str, str, str]:
    """Parse a caption back into ``(color, shape, background)``; raises ValueError if invalid."""
    match = _CAPTION_RE.match(caption.strip())
    if match is None:
        raise ValueError(f"not a shapes caption: {caption!r}")
    color, shape, background = match["color"], match["shape"], match["background"]
    if color not in COLORS or shape not in SHAPES or background not in BACKGROUNDS:
        raise ValueError(f"unknown label in caption: {caption!r}")
    return color, shape, background


def labels_to_indices(color: str, shape: str, background: str) -> tuple[int, int, int]:
    """Integer class indices ``(shape, color, background)`` in the order the classifier uses."""
    return SHAPES.index(shape), COLORS.index(color), BACKGROUNDS.index(background)


@lru_cache(maxsize=4)
def _pixel_centres(size: int) -> np.ndarray:
    """Cached (2, size, size) grid of pixel-centre coordinates (y, x)."""
    grid = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    grid.setflags(write=False)
    return grid


def _coverage(shape: str, cx: float, cy: float, half: float, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance evaluated at pixel centres.

    Using ``clip(sdf + 0.5, 0, 1)`` gives one-pixel soft edges without supersampling, which
    keeps rendering cheap enough to generate data on the fly.
    """
    ys, xs = _pixel_centres(size)
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        sdf = half - np.sqrt(dx * dx + dy * dy)
    elif shape == "square":
        sdf = half - np.maximum(np.abs(dx), np.abs(dy))
    elif shape == "triangle":
        # Upward equilateral triangle inscribed in the circle of radius `half`, shifted down so
        # its bounding box is centred on (cx, cy). sdf = min distance to the three edge lines.
        r = half * 1.15
        oy = cy + r * 0.25
        verts = [(cx, oy - r)]
        for ang in (np.pi / 6, 5 * np.pi / 6):
            verts.append((cx + r * np.cos(ang), oy + r * np.sin(ang)))
        sdf = np.full((size, size), np.inf, dtype=np.float32)
        for i in range(3):
            (x0, y0), (x1, y1) = verts[i], verts[(i + 1) % 3]
            ex, ey = x1 - x0, y1 - y0
            norm = np.hypot(ex, ey)
            # Inward normal for a clockwise-in-image-coordinates vertex order.
            nx, ny = -ey / norm, ex / norm
            sdf = np.minimum(sdf, (xs - x0) * nx + (ys - y0) * ny)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(sdf + 0.5, 0.0, 1.0).astype(np.float32)


def render_shape(
    color: str, shape: str, background: str, rng: np.random.Generator, size: int = IMAGE_SIZE
) -> np.ndarray:
    """Render one shape with random size/position/colour jitter drawn from ``rng``.

    Returns an ``(size, size, 3)`` uint8 array.
    """
    scale = size / IMAGE_SIZE
    half = float(rng.uniform(_MIN_HALF_SIZE, _MAX_HALF_SIZE)) * scale
    margin = half + 1.0
    cx = float(rng.uniform(margin, size - margin))
    cy = float(rng.uniform(margin, size - margin))
    fg = np.array(COLOR_RGB[color], np.float32) + rng.integers(
        -_COLOR_JITTER, _COLOR_JITTER + 1, 3
    )
    bg = np.array(BACKGROUND_RGB[background], np.float32) + rng.integers(
        -_BACKGROUND_JITTER, _BACKGROUND_JITTER + 1, 3
    )
    cov = _coverage(shape, cx, cy, half, size)[..., None]
    img = cov * np.clip(fg, 0, 255) + (1.0 - cov) * np.clip(bg, 0, 255)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def sample_combination(color: str, shape: str, background: str, seed: int) -> ShapeSample:
    """Render a given label combination with geometry drawn from ``seed``."""
    rng = np.random.default_rng([seed, 1])
    image = render_shape(color, shape, background, rng)
    return ShapeSample(image, make_caption(color, shape, background), color, shape, background)


def sample(seed: int) -> ShapeSample:
    """Deterministic sample for ``seed``: labels drawn uniformly, then rendered."""
    rng = np.random.default_rng([seed, 0])
    color = COLORS[int(rng.integers(len(COLORS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return sample_combination(color, shape, background, seed)


def heldout_set(n: int, start: int = 0) -> list[tuple[str, int]]:
    """``n`` held-out ``(caption, seed)`` pairs cycling through all 54 combinations, from the ``start``-th on
    (two benchmarks that must not share images take disjoint ranges).

    Balanced by construction (every combination appears ``n // 54`` or ``n // 54 + 1`` times)
    so per-attribute accuracies are not skewed. Seeds start at :data:`HELDOUT_SEED_BASE` and
    are disjoint from training seeds. Render the reference image with
    :func:`heldout_sample`; use the same seed as the generation noise seed.
    """
    pairs = []
    for i in range(start, start + n):
        color, shape, background = COMBINATIONS[i % len(COMBINATIONS)]
        pairs.append((make_caption(color, shape, background), HELDOUT_SEED_BASE + i))
    return pairs


def heldout_sample(caption: str, seed: int) -> ShapeSample:
    """Reference rendering for a held-out ``(caption, seed)`` pair."""
    color, shape, background = caption_to_labels(caption)
    return sample_combination(color, shape, background, seed)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC image -> float CHW tensor in [-1, 1] (the diffusers VAE convention)."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


def render_batch(seeds: list[int] | range) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Render many seeds: ``(images in [-1,1] (N,3,64,64), labels (N,3) long, captions)``."""
    samples = [sample(int(s)) for s in seeds]
    images = torch.stack([image_to_tensor(s.image) for s in samples])
    labels = torch.tensor([labels_to_indices(s.color, s.shape, s.background) for s in samples])
    return images, labels, [s.caption for s in samples]


class ShapesDataset(Dataset):
    """Map-style dataset generating samples on the fly: item ``i`` is ``sample(offset + i)``.

    Items are dicts with ``pixel_values`` (3,64,64) float in [-1, 1], ``caption`` (str) and
    ``labels`` (3,) long in (shape, color, background) order.
    """

    def __init__(self, length: int, seed_offset: int = 0) -> None:
        if seed_offset + length > HELDOUT_SEED_BASE and seed_offset < HELDOUT_SEED_BASE:
            raise ValueError("training seeds would overlap the held-out seed range")
        self.length = length
        self.seed_offset = seed_offset

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, object]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        s = sample(self.seed_offset + index)
        return {
            "pixel_values": image_to_tensor(s.image),
            "caption": s.caption,
            "labels": torch.tensor(labels_to_indices(s.color, s.shape, s.background)),
        }
