"""The README's picture of the two groupings: held-out scenes (textured, then plain) labelled by
tiny-demo (a small demo model, not Stable Diffusion) with the KL merge and with the normalized cut,
both with the card's PAMR.

    python benchmarks/grouping_figure.py --out docs/images/kl-merge-vs-ncut.jpg

Each row: the scene | kl-merge | ncut (segments coloured, boundaries white).
"""
from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from diffseg_core.demo_model.scenes import HELD_OUT_SEEDS, make_scene
from diffseg_core.segmentor import DiffSeg
from pipeline.after.gallery import overlay


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images/kl-merge-vs-ncut.jpg")
    parser.add_argument("--first-scene", type=int, default=300, help="index into HELD_OUT_SEEDS")
    parser.add_argument("--textured", type=int, default=3)
    parser.add_argument("--plain", type=int, default=2)
    args = parser.parse_args(argv)
    scenes = [make_scene(HELD_OUT_SEEDS[args.first_scene + k], 256, textured=True) for k in range(args.textured)]
    scenes += [make_scene(HELD_OUT_SEEDS[args.first_scene + k], 256) for k in range(args.plain)]
    images = [s.image for s in scenes]
    labels = {g: DiffSeg.from_pretrained("tiny-demo", grouping=g)(images) for g in ("kl-merge", "ncut")}
    rows = []
    for b, image in enumerate(images):
        merged = overlay(image, labels["kl-merge"][b])
        cut = overlay(image, labels["ncut"][b])[:, image.shape[1]:]  # the coloured half only
        rows.append(np.concatenate([merged, cut], 1))
        rows.append(np.full((6, rows[-1].shape[1], 3), 255, np.uint8))
    Image.fromarray(np.concatenate(rows[:-1], 0)).save(args.out, quality=88)
    print(f"wrote {args.out}: {len(images)} scenes (image | kl-merge | ncut), tiny-demo with PAMR")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
