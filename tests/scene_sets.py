"""Held-out synthetic scenes written as image folders + ground-truth masks, in every variant
the end-to-end quality test compares: the right label must land on the right pixel.

Layout under ``root``: ``images/<variant>/scene-<k>.<ext>`` and ``gt/<variant>/scene-<k>.png``
(class map: 0 background, 1..n shapes; 255 ignored), so ``diffseg eval --format masks``
matches each label row to its mask by relative path; the paper variant (labelled in a run
of its own) under ``paper/images`` and ``paper/gt``.

Variants of the same scenes (rendered at ``size``):
  plain   the scene as a PNG;
  exif3/6/8  stored rotated, as a JPEG whose EXIF orientation (3, 6, 8) turns it back upright;
  wide / tall  stretched to 3:1 and 1:3 (labels are made at that size);
  grey    one-channel (L) PNG;
  grey_rgb  the same grey pixels stored as an RGB PNG: what the L file must decode to;
  paper   rendered at 2x in the middle of a 3:2 canvas whose side strips hold another
          scene (ignored in the ground truth): ``--paper-preprocess`` crops the square back out.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from diffseg_core.demo_model.scenes import HELD_OUT_SEEDS, make_scene

VARIANTS = ("plain", "exif3", "exif6", "exif8", "wide", "tall", "grey", "grey_rgb")
PAPER = "paper"
IGNORE = 255
# What PIL's exif_transpose applies for each orientation, undone here to store the image.
_STORE_ROTATED = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def held_out_seeds(n: int, offset: int = 0) -> list[int]:
    return [HELD_OUT_SEEDS[offset + k] for k in range(n)]


def _save(img: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)


def _exif_jpeg(image: np.ndarray, orientation: int) -> bytes:
    stored = Image.fromarray(image).transpose(_STORE_ROTATED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def write_scene_sets(root: Path, seeds: list[int], size: int, variants=VARIANTS, paper: bool = True) -> dict:
    """Write the variants of the scenes of ``seeds``; return {variant: [image ids]} (ids relative to images/)."""
    ids: dict[str, list[str]] = {v: [] for v in variants}
    if paper:
        ids[PAPER] = []
    images, gt = root / "images", root / "gt"
    for k, seed in enumerate(seeds):
        scene = make_scene(seed, size)
        name = f"scene-{k}"
        regions = Image.fromarray(scene.regions)
        for variant in variants:
            if variant.startswith("exif"):
                rel = f"{variant}/{name}.jpg"
                path = images / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(_exif_jpeg(scene.image, int(variant[4:])))
                _save(regions, gt / variant / f"{name}.png")
            elif variant in ("wide", "tall"):
                w, h = (3 * size, size) if variant == "wide" else (size, 3 * size)
                rel = f"{variant}/{name}.png"
                _save(Image.fromarray(scene.image).resize((w, h), Image.Resampling.BICUBIC), images / rel)
                _save(regions.resize((w, h), Image.Resampling.NEAREST), gt / variant / f"{name}.png")
            else:
                rel = f"{variant}/{name}.png"
                img = Image.fromarray(scene.image)
                if variant.startswith("grey"):
                    img = img.convert("L") if variant == "grey" else img.convert("L").convert("RGB")
                _save(img, images / rel)
                _save(regions, gt / variant / f"{name}.png")
            ids[variant].append(rel)
        if paper:
            big = make_scene(seed, 2 * size)
            side = make_scene(seed + 1, (2 * size, 3 * size))  # another scene fills the strips
            canvas = side.image.copy()
            mask = np.full((2 * size, 3 * size), IGNORE, dtype=np.uint8)
            left = size // 2
            canvas[:, left : left + 2 * size] = big.image
            mask[:, left : left + 2 * size] = big.regions
            _save(Image.fromarray(canvas), root / PAPER / "images" / f"{name}.png")
            _save(Image.fromarray(mask), root / PAPER / "gt" / f"{name}.png")
            ids[PAPER].append(f"{name}.png")
    return ids


def write_image_list(path: Path, ids: list[str]) -> str:
    path.write_text("\n".join(ids) + "\n")
    return str(path)
