"""Synthetic scenes with known regions: what tiny-demo is trained on and scored on.

A scene is a background and 1-4 shapes (ellipses, rotated rectangles,
triangles, regular polygons), each region filled flat, with a linear colour
gradient, stripes, a checkerboard or a smooth noise texture, and per-pixel
noise on top. Every region's colour differs from every other's in RGB and in
luminance (so the greyscale copy of a scene is still segmentable), and every
region keeps at least ``MIN_AREA`` of the picture after occlusion.

The layout lives in normalised coordinates ([0, 1] on both axes), so the same
seed renders the same scene at any size (a non-square size stretches it);
only the per-pixel noise depends on the size. ``regions`` is the ground
truth: 0 is the background, 1..n the visible shapes in drawing order.

Textured scenes (``make_scene(seed, size, textured=True)``) share the layout but not the
looks: every region's mean colour is close to every other's (a shared base colour, each region
within ``_TEXTURE_RGB_GAP`` of it), and regions differ by texture instead: each gets a texture
of its own kind or orientation (stripes, checkerboard, dots, smooth blobs, flat) at an amplitude
well above the colour gaps. Colour alone barely separates them; what a texture looks like does.
Training never renders them.

Seeds: the trainer draws scenes from ``TRAIN_SEEDS``; tests and benchmarks
use ``HELD_OUT_SEEDS``, which training never touches.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Scene", "make_scene", "TRAIN_SEEDS", "HELD_OUT_SEEDS", "MAX_REGIONS", "MIN_AREA"]

TRAIN_SEEDS = range(0, 1_000_000)
HELD_OUT_SEEDS = range(1_000_000_000, 1_000_100_000)
MAX_SHAPES = 4
MAX_REGIONS = MAX_SHAPES + 1
MIN_AREA = 0.03  # each region's visible share of the picture, at least
_MIN_LUMA_GAP = 30.0
_MIN_RGB_GAP = 60.0
_STYLES = ("flat", "gradient", "stripes", "checker", "blobs")
_STYLE_P = (0.3, 0.25, 0.15, 0.1, 0.2)
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    regions: np.ndarray  # (H, W) uint8: 0 background, 1..n shapes
    seed: int

    @property
    def num_regions(self) -> int:
        return int(self.regions.max()) + 1


def make_scene(seed: int, size: int | tuple[int, int] = 256, textured: bool = False) -> Scene:
    """The scene of ``seed`` rendered at ``size`` (side, or (height, width)); ``textured``: its
    textured variant (close colours, distinct textures; the same layout)."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 8 or w < 8:
        raise ValueError(f"scene size must be at least 8 x 8, got {h} x {w}")
    rng = np.random.default_rng([int(seed), 0])  # layout and colours: the same at every size
    v, u = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    regions = _layout(rng, u, v)
    image = np.zeros((h, w, 3), dtype=np.float64)
    if textured:
        _paint_textured(np.random.default_rng([int(seed), 2]), regions, image, u, v)
    else:
        colours = _colours(rng, int(regions.max()) + 1)
        for k, colour in enumerate(colours):
            inside = regions == k
            image[inside] = _fill(rng, colour, u, v)[inside]
    noise = np.random.default_rng([int(seed), 1, h, w])  # per-pixel noise: depends on the size
    image += noise.normal(0.0, rng.uniform(2.0, 8.0), size=image.shape)
    return Scene(np.clip(np.rint(image), 0, 255).astype(np.uint8), regions.astype(np.uint8), int(seed))


def _layout(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Region ids: shapes drawn in order, each kept only if every region stays >= MIN_AREA."""
    regions = np.zeros(u.shape, dtype=np.int64)
    n_shapes = int(rng.integers(1, MAX_SHAPES + 1))
    placed = 0
    for _ in range(n_shapes * 8):  # tries
        if placed == n_shapes:
            break
        mask = _shape(rng, u, v)
        trial = np.where(mask, placed + 1, regions)
        areas = np.bincount(trial.ravel(), minlength=placed + 2) / trial.size
        if areas.min() >= MIN_AREA:
            regions = trial
            placed += 1
    return regions


def _shape(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    kind = rng.choice(("ellipse", "rectangle", "triangle", "polygon"))
    cx, cy = rng.uniform(0.15, 0.85, size=2)
    r = rng.uniform(0.12, 0.32)
    aspect = np.exp(rng.uniform(-0.5, 0.5))
    angle = rng.uniform(0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    x = ((u - cx) * c + (v - cy) * s) / (r * aspect)
    y = (-(u - cx) * s + (v - cy) * c) * aspect / r
    if kind == "ellipse":
        return x * x + y * y <= 1.0
    if kind == "rectangle":
        return (np.abs(x) <= 0.85) & (np.abs(y) <= 0.85)
    sides = 3 if kind == "triangle" else int(rng.integers(5, 7))
    # A regular polygon: inside every edge's half-plane (apothem cos(pi/sides)).
    inside = np.ones(u.shape, dtype=bool)
    for k in range(sides):
        a = 2 * np.pi * (k + 0.5) / sides
        inside &= x * np.cos(a) + y * np.sin(a) <= np.cos(np.pi / sides)
    return inside


def _colours(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """n colours, pairwise apart in RGB and in luminance (the constraint loosens if it must)."""
    chosen: list[np.ndarray] = []
    for k in range(n):
        for attempt in range(400):
            relax = 1.0 - attempt / 800  # never below half the gaps
            c = rng.uniform(25, 230, size=3)
            if all(
                abs((c - o) @ _LUMA) >= _MIN_LUMA_GAP * relax and np.linalg.norm(c - o) >= _MIN_RGB_GAP * relax
                for o in chosen
            ):
                break
        chosen.append(c)
    return chosen


def _fill(rng: np.random.Generator, colour: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(H, W, 3) float appearance of one region over the whole frame (masked by the caller)."""
    style = rng.choice(_STYLES, p=_STYLE_P)
    angle = rng.uniform(0, np.pi)
    proj = u * np.cos(angle) + v * np.sin(angle)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    if style == "flat":
        field = np.zeros(u.shape)
        amp = 0.0
    elif style == "gradient":
        field = proj - proj.mean()
        amp = rng.uniform(25, 50)
    elif style in ("stripes", "checker"):
        period = rng.uniform(0.035, 0.08)
        field = np.sign(np.sin(2 * np.pi * proj / period))
        if style == "checker":
            other = -u * np.sin(angle) + v * np.cos(angle)
            field = field * np.sign(np.sin(2 * np.pi * other / period))
        amp = rng.uniform(8, 16)
    else:  # blobs: smooth noise, bilinearly upsampled from 8 x 8
        coarse = rng.normal(size=(8, 8))
        field = _bilinear(coarse, u, v)
        amp = rng.uniform(10, 18)
    return colour + amp * field[..., None] * direction


def _bilinear(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    n = grid.shape[0]
    x = np.clip(u * n - 0.5, 0, n - 1)
    y = np.clip(v * n - 0.5, 0, n - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, n - 1), np.minimum(y0 + 1, n - 1)
    fx, fy = x - x0, y - y0
    top = grid[y0, x0] * (1 - fx) + grid[y0, x1] * fx
    bottom = grid[y1, x0] * (1 - fx) + grid[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


_TEXTURE_RGB_GAP = 12.0  # each textured region's mean colour within this of the shared base, per channel
_TEXTURES = ("stripes", "checker", "dots", "blobs", "flat")


def _paint_textured(rng: np.random.Generator, regions: np.ndarray, image: np.ndarray,
                    u: np.ndarray, v: np.ndarray) -> None:
    """Fill each region with a close colour and a texture unlike its neighbours': kinds drawn without
    replacement (stripes twice at most, then at orientations 60+ degrees apart)."""
    n = int(regions.max()) + 1
    base = rng.uniform(70, 185, size=3)
    kinds = list(rng.permutation(_TEXTURES))
    if n > len(kinds):
        kinds.append("stripes")
    stripe_angle = rng.uniform(0, np.pi)
    for k in range(n):
        kind = kinds[k]
        colour = base + rng.uniform(-_TEXTURE_RGB_GAP, _TEXTURE_RGB_GAP, size=3)
        if kind == "stripes":
            angle, stripe_angle = stripe_angle, stripe_angle + np.pi / 2
        else:
            angle = rng.uniform(0, np.pi)
        inside = regions == k
        image[inside] = (colour + _texture(rng, kind, angle, u, v)[..., None])[inside]


def _texture(rng: np.random.Generator, kind: str, angle: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(H, W) zero-mean-ish luminance pattern of one texture kind, amplitude 30-45 (0-255 units)."""
    amp = rng.uniform(30, 45)
    a = u * np.cos(angle) + v * np.sin(angle)
    b = -u * np.sin(angle) + v * np.cos(angle)
    if kind == "flat":
        return np.zeros(u.shape)
    if kind == "stripes":
        return amp * np.sign(np.sin(2 * np.pi * a / rng.uniform(0.05, 0.09)))
    if kind == "checker":
        period = rng.uniform(0.06, 0.1)
        return amp * np.sign(np.sin(2 * np.pi * a / period) * np.sin(2 * np.pi * b / period))
    if kind == "dots":
        period = rng.uniform(0.05, 0.08)
        fa, fb = (a / period) % 1 - 0.5, (b / period) % 1 - 0.5
        return amp * (2.0 * (fa * fa + fb * fb < 0.06) - 0.4)
    coarse = rng.normal(size=(12, 12))  # blobs: smooth noise
    field = _bilinear(coarse, u, v)
    return amp * field / max(float(np.abs(field).max()), 1e-6)
