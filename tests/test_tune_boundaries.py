"""diffseg tune searches --boundaries: PAMR scored exactly as label refines, chosen where it wins,
and each fold chooses only among the PAMR variants of its own training folds' best plain settings."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from after_helpers import write_png
from diffseg_core.boundaries import DEFAULT_DILATIONS
from diffseg_core.metrics import SegmentationMetrics
from diffseg_core.segmentor import DiffSeg
from pipeline.tune import tune
from pipeline.tune.cache import CACHE_DIR, AttentionCache, extraction_key, load_maps, load_pixels, model_identity
from pipeline.tune.grid import Grid, GridError, Setting, check_values
from pipeline.tune.score import Group, score_chunk
from pipeline.tune.select import select
from tests.synthetic_attention import paired_block_attention

R = 16
SIZE = 8 * R  # the model input and the label frame: 128 px
SHIFT = 3  # the true edges lie 3 px past the attention's 8-px block edges
PLANTED_MODEL = "test-only/planted-attention-with-pixels"
SPLITS = [(5, 7), (8, 8), (11, 5), (6, 10), (9, 4), (7, 12), (4, 6), (12, 9), (10, 11), (6, 5)]
COLOURS = np.array([[200, 60, 40], [190, 70, 50], [40, 160, 70], [50, 60, 200]], dtype=np.float64)


def plant(root: Path) -> dict[str, Path]:
    """128 px images whose colour edges (and ground truth) lie SHIFT px past the block edges of their
    planted attention (paired_block_attention: labels right at the block level for tau 0.9)."""
    rng = np.random.default_rng(1)
    cache = AttentionCache(root / "out" / CACHE_DIR)
    identity = model_identity(PLANTED_MODEL)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    for i, (row, col) in enumerate(SPLITS):
        image_id = f"img{i}.png"
        rect = (ys >= 8 * row + SHIFT).astype(int) * 2 + (xs >= 8 * col + SHIFT).astype(int)
        image = np.clip(COLOURS[rect] + rng.normal(0, 4, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        write_png(root / "images" / image_id, image)
        write_png(root / "gt" / image_id, np.array([0, 0, 1, 2], dtype=np.uint8)[rect])
        maps, _, _ = paired_block_attention(R, (row, col))
        sha = hashlib.sha256((root / "images" / image_id).read_bytes()).hexdigest()
        key = extraction_key(identity, sha, image_size=None, timestep=300, dtype="fp32", paper_preprocess=False)
        cache.put(key, {R: maps[0]}, {"image_id": image_id, "height": SIZE, "width": SIZE, "image_size": SIZE},
                  pixels=image)
    return {"images": root / "images", "gt": root / "gt", "out": root / "out", "cache": cache.root}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, Path]:
    return plant(tmp_path_factory.mktemp("tune-pamr"))


def test_the_cache_keeps_the_model_input_pixels_as_the_extractor_makes_them(planted):
    from diffseg_core.extract import preprocess_images

    path = sorted(planted["cache"].glob("*.safetensors"))[0]
    pixels = load_pixels(path)
    assert pixels.shape == (1, 3, SIZE, SIZE) and set(load_maps(path)) == {R}
    raw = ((pixels[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    torch.testing.assert_close(pixels, preprocess_images(raw[None], SIZE), rtol=0, atol=1e-6)


def test_tune_scores_pamr_exactly_as_diffseg_labels_with_it(planted):
    """score_chunk's TP/FP/FN for plain, PAMR 1 and PAMR 6 (one chain of iterations) equal those of
    DiffSeg(boundaries=...).label_maps on the same attention and pixels: what label writes."""
    paths = sorted(str(p) for p in planted["cache"].glob("*.safetensors"))[:3]
    targets = []
    schedule = (0.9,)
    members = [(schedule, False, None), (schedule, False, (1, DEFAULT_DILATIONS)), (schedule, False, (6, DEFAULT_DILATIONS))]
    per_member = {n: np.zeros((3, 3), dtype=np.int64) for n in (None, 1, 6)}
    for path in paths:
        maps, pixels = load_maps(path), load_pixels(path)
        diffseg_plain = DiffSeg(kl_threshold=0.9, iterations=1, num_points=8, weights=[1.0])
        proposals = diffseg_plain.proposals(maps)
        # the ground truth of this image: the plain labels shifted by SHIFT px show what differs
        labels = {None: diffseg_plain.label_maps(proposals, [(SIZE, SIZE)])[0]}
        for n in (1, 6):
            d = DiffSeg(kl_threshold=0.9, iterations=1, num_points=8, weights=[1.0], boundaries="pamr",
                        pamr_iterations=n)
            labels[n] = d.label_maps(proposals, [(SIZE, SIZE)], pixels)[0]
        assert not torch.equal(labels[None], labels[1]) and not torch.equal(labels[1], labels[6])
        target = np.asarray(torch.roll(labels[None], shifts=(SHIFT, SHIFT), dims=(0, 1)).numpy(), dtype=np.int16)
        targets.append(target)
        for n, m in labels.items():
            one = SegmentationMetrics(3).update(m.numpy(), target)
            per_member[n] += np.stack([one["tp"], one["fp"], one["fn"]])
    got = score_chunk(paths, targets, [0] * len(paths), Group((1.0,), 8, tuple(members)), 3, 1)
    for i, n in enumerate((None, 1, 6)):
        np.testing.assert_array_equal(got["counts"][i, 0], per_member[n])
    assert got["scored"] == 3 * len(paths)


def test_tune_chooses_pamr_where_the_image_edges_lie_between_the_attention_blocks(planted, ray_session):
    report = tune(str(planted["images"]), str(planted["gt"]), "masks", num_classes=3, model=PLANTED_MODEL,
                  dtype="fp32", out=str(planted["out"]), progress=False, folds=5,
                  grid=Grid(taus=[0.7, 0.9, 1.1], iterations=[1], tau_steps=[0.0], num_points=[8],
                            weights=["proportional"], pamr_iterations=[3, 10], boundary_candidates=2))
    rows = {r["setting"]: r for r in report["ranking"]}
    plain = rows["tau=0.9 iterations=1 num_points=8 weights=proportional refine=off boundaries=off"]
    best = report["best"]
    assert best["boundaries"] == "pamr" and best["kl_threshold"] == [0.9], best
    assert best["in_sample"]["miou"] > plain["miou"] + 0.02
    assert best["held_out"]["miou"] > plain["miou"] + 0.02  # every fold chose PAMR too
    assert all("boundaries=pamr" in f["setting"] for f in report["folds"])
    assert report["label_params"]["boundaries"] == "pamr"
    assert report["label_params"]["pamr_iterations"] == best["pamr_iterations"]
    assert f"--boundaries pamr --pamr-iterations {best['pamr_iterations']}" in report["label_flags"]
    assert "  boundaries: pamr\n" in report["method_block"] + "\n"
    # PAMR was scored on the 2 best plain settings of each grouping only: of the KL merge's, 2 x 2
    # iteration counts at most, not on all 3 taus
    pamr_rows = [r for r in report["ranking"] if r["boundaries"] == "pamr" and r["grouping"] == "kl-merge"]
    assert 2 <= len(pamr_rows) <= 4 and {r["kl_threshold"] for r in pamr_rows} <= {"0.9", "0.7", "1.1"}
    assert len({r["kl_threshold"] for r in pamr_rows}) <= 2
    assert any("--boundaries pamr scored on the best 2" in n for n in report["notes"])


def test_boundaries_off_scores_no_pamr(planted, ray_session, tmp_path):
    import shutil

    shutil.copytree(planted["out"] / CACHE_DIR, tmp_path / "out" / CACHE_DIR)
    report = tune(str(planted["images"]), str(planted["gt"]), "masks", num_classes=3, model=PLANTED_MODEL,
                  dtype="fp32", out=str(tmp_path / "out"), progress=False,
                  grid=Grid(taus=[0.9], iterations=[1], tau_steps=[0.0], num_points=[8], weights=["proportional"],
                            boundaries=["off"]))
    assert {r["boundaries"] for r in report["ranking"]} == {"off"}
    assert report["label_params"]["boundaries"] == "off" and "--boundaries off" in report["label_flags"]


def test_a_fold_chooses_only_the_pamr_variants_of_its_own_candidates():
    # 3 settings, 2 folds, 1 class: setting 2 is best on both folds, but fold 0 may not choose it
    counts = np.zeros((3, 2, 3, 1), dtype=np.int64)
    for s, tp in enumerate((5, 7, 9)):
        counts[s, :, 0, 0] = tp
        counts[s, :, 2, 0] = 10 - tp  # FN
    eligible = np.array([[True, True, False], [True, True, True], [True, True, True]])
    sel = select(counts, np.array([1, 1]), 0, eligible)
    assert [f["chosen"] for f in sel.folds] == [1, 2] and sel.best == 2
    sel = select(counts, np.array([1, 1]), 0, np.array([[True, True, False]] * 3))
    assert sel.best == 1


def test_bad_boundary_grids_are_one_sentence():
    with pytest.raises(GridError, match="--boundaries takes off, pamr"):
        check_values(Grid(boundaries=["sharp"]))
    with pytest.raises(GridError, match="--pamr-iterations must be integers >= 1"):
        check_values(Grid(pamr_iterations=[0]))
    with pytest.raises(GridError, match="--boundary-candidates must be at least 1"):
        check_values(Grid(boundary_candidates=0))
    # a setting with boundaries off is one setting whatever PAMR's unused parameters say
    assert Setting((1.0,), 8, boundaries="off", pamr_iterations=3) == Setting((1.0,), 8)
    assert Setting((1.0,), 8).with_pamr(5).describe().endswith("boundaries=pamr(5)")
