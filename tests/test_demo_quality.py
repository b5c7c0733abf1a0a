"""End to end on held-out synthetic scenes: decode, EXIF, resize, VAE, UNet attention capture,
aggregation, merge, NMS at each image's own size, PNG encoding, then ``diffseg eval --format masks``
(the paper's per-image Hungarian protocol) against the scenes' true regions.

tiny-demo must score well, far above tiny-random on the same scenes, and every variant of the
scenes (EXIF-rotated, 3:1 and 1:3, greyscale, ``--paper-preprocess``) must score like the plain
ones: a transposed axis or an off-by-one anywhere in the chain would show here.
The K-Means-C / K-Means-S baselines (``eval --baselines``) are scored on the same scenes.
"""
from __future__ import annotations

import json

import pytest

from diffseg_core.demo_model.scenes import MAX_REGIONS
from tests.scene_sets import PAPER, VARIANTS, held_out_seeds, write_image_list, write_scene_sets

pytestmark = pytest.mark.slow

N_SCENES = 6
SIZE = 256  # tiny-demo's native size
# Measured on these 6 scenes (BENCHMARKS.md has 200), at tiny-demo's defaults (tau 1.5, 8 x 8
# anchors, 2 iterations, weights 1, 2, 0): tiny-demo mIoU 0.711, pixel accuracy 0.900; tiny-random
# 0.144 / 0.720 (one segment: the background's share). Set a little under, not at, the figures.
# With the card's --boundaries pamr (issue 22) tiny-demo measures 0.895 / 0.979 here; the floors are
# kept at the plain method's, which tests/test_pipeline_boundaries.py scores below PAMR.
# The goal (0.80 / 0.90) is NOT reached by the shipped demo model (0.66 / 0.88 on 200 scenes).
MIN_MIOU = 0.66
MIN_ACC = 0.87
MAX_VARIANT_DROP = 0.05  # the same pixels, turned, stretched or cropped: measured within 0.001
# A one-channel file against the same grey pixels stored as RGB: the same input, so the same bound
# (measured: equal). Against the colour scene it is other input (luminance only; two regions may
# differ little in it): measured 0.127 mIoU, 0.039 accuracy lower; bounded apart, as information lost.
# With PAMR on (tiny-demo's card), colour also guides the refinement, grey only luminance: measured
# 0.895 colour against 0.671 grey mIoU (0.224; 0.127 before PAMR).
MAX_GREY_LOSS = 0.26
RANDOM_GAP = 0.35  # tiny-demo's mIoU above tiny-random's, at least (measured: 0.567; greyscale 0.440)


def _eval(capsys, labels, gt, *extra: str) -> dict:
    from pipeline.cli import main

    code = main(["eval", str(labels), str(gt), "--format", "masks", "--num-classes", str(MAX_REGIONS),
                 "--no-ray", "--json", *extra])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


@pytest.fixture(scope="module")
def scored(ray_session, tmp_path_factory):
    """Label every variant with tiny-demo (one run; paper preprocessing in a second) and the
    plain scenes with tiny-random; return the folders."""
    from pipeline.job.run import label

    root = tmp_path_factory.mktemp("scenes")
    ids = write_scene_sets(root, held_out_seeds(N_SCENES), SIZE)
    images = root / "images"
    out = {
        "demo": root / "labels-demo",
        "paper": root / "labels-paper",
        "random": root / "labels-random",
    }
    summaries = {
        "demo": label(str(images), str(out["demo"]), model="tiny-demo", batch_size=4),
        "paper": label(str(root / PAPER / "images"), str(out["paper"]), model="tiny-demo", batch_size=4,
                       paper_preprocess=True),
        "random": label(str(images / "plain"), str(out["random"]), model="tiny-random", batch_size=4),
    }
    for name, s in summaries.items():
        assert s["complete"] and s["errors"] == 0, (name, s)
    return root, ids, out


def _variant(capsys, scored, variant: str) -> dict:
    root, ids, out = scored
    listing = write_image_list(root / f"{variant}.txt", ids[variant])
    return _eval(capsys, out["demo"], root / "gt", "--image-list", listing)


def test_tiny_demo_segments_held_out_scenes_and_tiny_random_does_not(scored, capsys):
    root, ids, out = scored
    demo = _variant(capsys, scored, "plain")
    rand = _eval(capsys, out["random"], root / "gt" / "plain")
    print(f"\ntiny-demo   mIoU {demo['miou']:.3f}  acc {demo['pixel_accuracy']:.3f}  ({demo['num_images']} scenes)")
    print(f"tiny-random mIoU {rand['miou']:.3f}  acc {rand['pixel_accuracy']:.3f}")
    assert demo["num_images"] == rand["num_images"] == N_SCENES
    assert demo["miou"] >= MIN_MIOU and demo["pixel_accuracy"] >= MIN_ACC
    assert demo["miou"] >= rand["miou"] + RANDOM_GAP and demo["miou"] >= 3 * rand["miou"]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in ("plain", "grey_rgb")] + [PAPER])
def test_every_variant_of_the_scenes_scores_like_the_plain_ones(scored, capsys, variant):
    """Each variant against the same pixels in the plain form: a one-channel file against its
    grey pixels as RGB, every other variant against the colour scene."""
    root, ids, out = scored
    reference = "grey_rgb" if variant == "grey" else "plain"
    plain = _variant(capsys, scored, reference)
    if variant == PAPER:
        got = _eval(capsys, out["paper"], root / PAPER / "gt")
    else:
        got = _variant(capsys, scored, variant)
    print(f"\n{variant}: mIoU {got['miou']:.3f} acc {got['pixel_accuracy']:.3f} "
          f"({reference} {plain['miou']:.3f} / {plain['pixel_accuracy']:.3f})")
    assert got["num_images"] == N_SCENES
    assert abs(got["miou"] - plain["miou"]) <= MAX_VARIANT_DROP
    assert abs(got["pixel_accuracy"] - plain["pixel_accuracy"]) <= MAX_VARIANT_DROP


def test_grey_scenes_lose_only_what_colour_gave(scored, capsys):
    """Luminance alone separates the regions less well (the scenes keep a luminance gap between
    regions, but gradients and textures blur it), so grey scores lower than colour, within a bound,
    and still far above tiny-random."""
    root, ids, out = scored
    plain, grey = _variant(capsys, scored, "plain"), _variant(capsys, scored, "grey")
    rand = _eval(capsys, out["random"], root / "gt" / "plain")
    print(f"\ngrey: mIoU {grey['miou']:.3f} acc {grey['pixel_accuracy']:.3f} "
          f"(colour {plain['miou']:.3f} / {plain['pixel_accuracy']:.3f})")
    assert plain["miou"] - grey["miou"] <= MAX_GREY_LOSS
    assert plain["pixel_accuracy"] - grey["pixel_accuracy"] <= MAX_GREY_LOSS
    assert grey["miou"] >= rand["miou"] + RANDOM_GAP


def test_kmeans_baselines_are_scored_beside_diffseg(scored, capsys):
    root, ids, out = scored
    listing = write_image_list(root / "plain-baselines.txt", ids["plain"])
    r = _eval(capsys, out["demo"], root / "gt", "--image-list", listing,
              "--baselines", "--images", str(root / "images"))
    b = r["baselines"]
    assert b["model"] == "tiny-demo" and b["image_size"] == SIZE
    print()
    for name, m in [("DiffSeg", r)] + list(b["methods"].items()):
        print(f"{name:<10} mIoU {m['miou']:.3f}  acc {m['pixel_accuracy']:.3f}")
        assert m["num_images"] == N_SCENES
    # K-Means-S is told the number of regions of each scene; it must find real structure too.
    assert b["methods"]["K-Means-S"]["miou"] > 0.5  # measured 0.634
