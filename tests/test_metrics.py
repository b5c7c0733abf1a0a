"""Tests for diffseg_core.metrics on hand-computed examples.

Confusion matrices are written hist[class, segment] (labelled pixels only).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffseg_core.metrics import SegmentationMetrics, hungarian_match

FIXTURES = Path(__file__).parent / "fixtures" / "diffseg-official"


def a(rows):
    return np.array(rows, dtype=np.int64)


def test_perfect_prediction_with_permuted_ids():
    # gt            pred (ids 5, 0, 1 are arbitrary)
    # 0 0 1         5 5 0
    # 2 2 1         1 1 0
    # hist: class0 = {seg5: 2}, class1 = {seg0: 2}, class2 = {seg1: 2}
    # matching 5->0, 0->1, 1->2. TP = [2, 2, 2], FP = FN = 0.
    gt = a([[0, 0, 1], [2, 2, 1]])
    pred = a([[5, 5, 0], [1, 1, 0]])
    m = SegmentationMetrics(num_classes=3)
    r = m.update(pred, gt)
    assert r["mapping"] == {5: 0, 0: 1, 1: 2}
    assert m.tp.tolist() == [2, 2, 2]
    assert m.fp.tolist() == [0, 0, 0]
    assert m.fn.tolist() == [0, 0, 0]
    assert m.pixel_accuracy() == 1.0
    assert m.miou() == 1.0
    assert r["pixel_accuracy"] == 1.0 and r["miou"] == 1.0
    assert m.tp.dtype == np.int64 and m.fp.dtype == np.int64 and m.fn.dtype == np.int64
    assert m.labelled_pixels == 6 and m.num_images == 1


def test_classes_never_seen_are_excluded_from_the_mean():
    # Same image, but 5 classes: classes 3 and 4 are in no gt and no prediction
    # (TP + FP + FN == 0) -> IoU NaN, excluded: mIoU = mean(1, 1, 1) = 1, not 3/5.
    gt = a([[0, 0, 1], [2, 2, 1]])
    pred = a([[5, 5, 0], [1, 1, 0]])
    m = SegmentationMetrics(num_classes=5)
    m.update(pred, gt)
    iou = m.iou_per_class()
    assert iou[:3].tolist() == [1.0, 1.0, 1.0]
    assert np.isnan(iou[3]) and np.isnan(iou[4])
    assert m.miou() == 1.0
    assert m.summary() == {"pixel_accuracy": 1.0, "miou": 1.0, "num_images": 1, "labelled_pixels": 6}


def test_more_segments_than_classes_unmatched_pixels_are_fn_not_fp():
    # gt        pred
    # 0 0 0     0 0 2
    # 1 1 1     1 1 2
    # hist: class0 = {seg0: 2, seg2: 1}, class1 = {seg1: 2, seg2: 1}
    # best one-to-one: 0->0, 1->1 (4 px); seg2 stays unmatched.
    # TP = [2, 2]; FP = [0, 0] (seg2's pixels are NOT FP); FN = [1, 1].
    # acc = 4/6; IoU = [2/3, 2/3]; mIoU = 2/3.
    gt = a([[0, 0, 0], [1, 1, 1]])
    pred = a([[0, 0, 2], [1, 1, 2]])
    assert hungarian_match(pred, gt, num_classes=2) == {0: 0, 1: 1}
    m = SegmentationMetrics(num_classes=2)
    r = m.update(pred, gt)
    assert r["mapping"] == {0: 0, 1: 1}
    assert m.tp.tolist() == [2, 2]
    assert m.fp.tolist() == [0, 0]
    assert m.fn.tolist() == [1, 1]
    assert m.pixel_accuracy() == pytest.approx(4 / 6, abs=1e-15)
    assert m.iou_per_class().tolist() == pytest.approx([2 / 3, 2 / 3], abs=1e-15)
    assert m.miou() == pytest.approx(2 / 3, abs=1e-15)


def test_ignore_label_pixels_are_excluded_from_everything():
    # gt          pred
    # 0  0 -1     0 1 1
    # 1  1 -1     1 1 1
    # labelled pixels: (g0,p0), (g0,p1), (g1,p1), (g1,p1)
    # hist: class0 = {seg0: 1, seg1: 1}, class1 = {seg1: 2}
    # matching 0->0, 1->1 (3 px; the swap gives 1).
    # TP = [1, 2]; FP = [0, 1] (only the labelled (0,1) pixel; the two ignored
    # seg1 pixels are not FP); FN = [1, 0]. labelled = 4.
    # acc = 3/4; IoU = [1/2, 2/3]; mIoU = 7/12.
    gt = a([[0, 0, -1], [1, 1, -1]])
    pred = a([[0, 1, 1], [1, 1, 1]])
    m = SegmentationMetrics(num_classes=2)
    m.update(pred, gt)
    assert m.tp.tolist() == [1, 2]
    assert m.fp.tolist() == [0, 1]
    assert m.fn.tolist() == [1, 0]
    assert m.labelled_pixels == 4
    assert m.pixel_accuracy() == 0.75
    assert m.iou_per_class().tolist() == pytest.approx([1 / 2, 2 / 3], abs=1e-15)
    assert m.miou() == pytest.approx(7 / 12, abs=1e-15)

    # Whatever is predicted on ignored pixels changes nothing, even a new segment.
    m2 = SegmentationMetrics(num_classes=2)
    r2 = m2.update(a([[0, 1, 7], [1, 1, 0]]), gt)
    assert m2.to_dict() == m.to_dict()
    assert 7 not in r2["mapping"]


def test_custom_ignore_index():
    gt = a([[0, 0, 255], [1, 1, 255]])
    pred = a([[0, 1, 1], [1, 1, 1]])
    m = SegmentationMetrics(num_classes=2, ignore_index=255)
    m.update(pred, gt)
    assert (m.tp.tolist(), m.fp.tolist(), m.fn.tolist()) == ([1, 2], [0, 1], [1, 0])


def test_all_pixels_ignored():
    m = SegmentationMetrics(num_classes=2)
    r = m.update(a([[0, 1]]), a([[-1, -1]]))
    assert r["mapping"] == {} and r["labelled_pixels"] == 0
    assert math.isnan(r["pixel_accuracy"]) and math.isnan(r["miou"])
    assert m.num_images == 1 and m.labelled_pixels == 0
    assert math.isnan(m.pixel_accuracy()) and math.isnan(m.miou())


def _image_a():
    # gt    pred      perfect: TP = [2, 2], FP = FN = 0; acc 1, mIoU 1
    # 0 0   0 0
    # 1 1   1 1
    return a([[0, 0], [1, 1]]), a([[0, 0], [1, 1]])


def _image_b():
    # gt       pred
    # 0 0 0    0 0 0
    # 0 0 1    0 0 0
    # hist: class0 = {seg0: 5}, class1 = {seg0: 1}; seg0 -> class0.
    # TP = [5, 0]; FP = [1, 0]; FN = [0, 1].
    # acc = 5/6; IoU = [5/6, 0]; mIoU = 5/12.
    return a([[0, 0, 0], [0, 0, 0]]), a([[0, 0, 0], [0, 0, 1]])


def test_dataset_accumulation_differs_from_averaging_per_image_scores():
    # Per-image average: acc = (1 + 5/6)/2 = 11/12; mIoU = (1 + 5/12)/2 = 17/24.
    # Accumulated: TP = [7, 2], FP = [1, 0], FN = [0, 1], labelled = 10
    #   acc = 9/10; IoU = [7/8, 2/3]; mIoU = (7/8 + 2/3)/2 = 37/48.
    m = SegmentationMetrics(num_classes=2)
    ra = m.update(*_image_a())
    rb = m.update(*_image_b())
    assert (ra["pixel_accuracy"], ra["miou"]) == (1.0, 1.0)
    assert rb["tp"].tolist() == [5, 0] and rb["fp"].tolist() == [1, 0] and rb["fn"].tolist() == [0, 1]
    assert rb["pixel_accuracy"] == pytest.approx(5 / 6, abs=1e-15)
    assert rb["miou"] == pytest.approx(5 / 12, abs=1e-15)

    assert m.tp.tolist() == [7, 2]
    assert m.fp.tolist() == [1, 0]
    assert m.fn.tolist() == [0, 1]
    assert m.labelled_pixels == 10 and m.num_images == 2
    assert m.pixel_accuracy() == pytest.approx(9 / 10, abs=1e-15)
    assert m.iou_per_class().tolist() == pytest.approx([7 / 8, 2 / 3], abs=1e-15)
    assert m.miou() == pytest.approx(37 / 48, abs=1e-15)
    # ... and not the per-image averages.
    assert m.pixel_accuracy() != pytest.approx(11 / 12)
    assert m.miou() != pytest.approx(17 / 24)


def test_segment_matched_to_an_absent_class_counts_as_fp():
    # Reference behaviour: with at most num_classes segments every segment is
    # matched, possibly to a class absent from the image.
    # gt    pred     hist: class0 = {seg0: 3, seg1: 1}, class1 = {}, class2 = {}
    # 0 0   0 0      0->0 (3 px); seg1 is matched to class 1 or 2 (0 px, a tie)
    # 0 0   0 1      TP = [3, 0, 0]; FN = [1, 0, 0]; FP = 1 on that class.
    # acc = 3/4; IoU = [3/4, 0] on the classes seen, the third excluded -> mIoU 3/8.
    m = SegmentationMetrics(num_classes=3)
    r = m.update(a([[0, 0], [0, 1]]), a([[0, 0], [0, 0]]))
    assert r["mapping"][0] == 0 and r["mapping"][1] in (1, 2)
    hit = r["mapping"][1]
    assert m.tp.tolist() == [3, 0, 0]
    assert m.fn.tolist() == [1, 0, 0]
    assert m.fp[0] == 0 and m.fp[hit] == 1 and m.fp.sum() == 1
    assert m.pixel_accuracy() == 0.75
    assert np.isnan(m.iou_per_class()[3 - hit])
    assert m.miou() == pytest.approx(3 / 8, abs=1e-15)


def test_merge_equals_one_accumulator_fed_both_images():
    one = SegmentationMetrics(num_classes=2)
    one.update(*_image_a())
    one.update(*_image_b())
    w1 = SegmentationMetrics(num_classes=2)
    w1.update(*_image_a())
    w2 = SegmentationMetrics(num_classes=2)
    w2.update(*_image_b())
    assert w1.merge(w2) is w1
    assert w1.to_dict() == one.to_dict()
    assert w1.summary() == one.summary()
    assert w2.num_images == 1  # other is left untouched

    with pytest.raises(ValueError, match="num_classes"):
        w1.merge(SegmentationMetrics(num_classes=3))
    with pytest.raises(ValueError, match="ignore_index"):
        w1.merge(SegmentationMetrics(num_classes=2, ignore_index=255))
    with pytest.raises(TypeError):
        w1.merge(one.to_dict())  # type: ignore[arg-type]


def test_merge_on_random_images_matches_single_accumulator():
    rng = np.random.default_rng(0)
    images = []
    for _ in range(6):
        gt = rng.integers(-1, 27, size=(32, 40))
        pred = rng.integers(0, 12, size=(32, 40))
        images.append((pred, gt))
    one = SegmentationMetrics(27)
    for p, g in images:
        one.update(p, g)
    parts = [SegmentationMetrics(27) for _ in range(3)]
    for i, (p, g) in enumerate(images):
        parts[i % 3].update(p, g)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.to_dict() == one.to_dict()
    assert one.labelled_pixels == int((np.stack([g for _, g in images]) != -1).sum())
    assert one.labelled_pixels == int(one.tp.sum() + one.fn.sum())


def test_to_dict_from_dict_round_trip():
    m = SegmentationMetrics(num_classes=2)
    m.update(*_image_a())
    m.update(*_image_b())
    d = m.to_dict()
    d2 = json.loads(json.dumps(d))  # plain JSON-able data
    assert d2 == d
    r = SegmentationMetrics.from_dict(d2)
    assert r.num_classes == 2 and r.ignore_index == -1
    assert r.tp.tolist() == [7, 2] and r.fp.tolist() == [1, 0] and r.fn.tolist() == [0, 1]
    assert r.tp.dtype == np.int64
    assert r.labelled_pixels == 10 and r.num_images == 2
    assert r.summary() == m.summary()
    # the restored accumulator keeps accumulating
    r.update(*_image_a())
    assert r.tp.tolist() == [9, 4] and r.num_images == 3


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("tp"),
        lambda d: d.update(tp=[1]),
        lambda d: d.update(fp=[-1, 0]),
        lambda d: d.update(fn=[0.5, 0.0]),
        lambda d: d.update(labelled_pixels=11),
        lambda d: d.update(num_classes=0),
    ],
)
def test_from_dict_rejects_malformed(mutate):
    m = SegmentationMetrics(num_classes=2)
    m.update(*_image_b())
    d = m.to_dict()
    mutate(d)
    with pytest.raises(ValueError):
        SegmentationMetrics.from_dict(d)


def test_torch_inputs_and_unsigned_dtypes():
    gt, pred = _image_b()
    ref = SegmentationMetrics(2)
    ref.update(pred, gt)
    t = SegmentationMetrics(2)
    t.update(torch.from_numpy(pred), torch.from_numpy(gt).to(torch.int32))
    u = SegmentationMetrics(2)
    u.update(pred.astype(np.uint8), gt.astype(np.int16))
    assert t.to_dict() == ref.to_dict() == u.to_dict()


def test_large_arbitrary_segment_ids_give_the_same_result():
    gt = a([[0, 0, 0], [1, 1, 1]])
    pred = a([[0, 0, 2], [1, 1, 2]])
    m = SegmentationMetrics(2)
    m.update(pred, gt)
    big = SegmentationMetrics(2)
    r = big.update(pred * 10**9 + 7, gt)
    assert r["mapping"] == {7: 0, 10**9 + 7: 1}
    assert big.to_dict() == m.to_dict()


@pytest.mark.parametrize(
    "pred, gt, match",
    [
        (a([[0, 1]]), a([[0, 1, 1]]), "shapes differ"),
        (a([[[0, 1]]]), a([[[0, 1]]]), r"\(H, W\)"),
        (np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int64), "empty"),
        (a([[0, 1]]), a([[0, 2]]), "outside"),  # gt == num_classes
        (a([[0, 1]]), a([[0, -2]]), "outside"),  # negative but not ignore_index
        (a([[0, -1]]), a([[0, 1]]), "negative"),
        (np.array([[0.0, 1.0]]), a([[0, 1]]), "integer dtype"),
        (a([[0, 1]]), np.array([[0.0, 1.0]]), "integer dtype"),
        (np.array([[True, False]]), a([[0, 1]]), "integer dtype"),
        (torch.tensor([[0.0, 1.0]]), a([[0, 1]]), "integer dtype"),
        ([[0, 1]], a([[0, 1]]), "numpy array or a torch tensor"),
    ],
)
def test_update_value_errors(pred, gt, match):
    m = SegmentationMetrics(num_classes=2)
    with pytest.raises(ValueError, match=match):
        m.update(pred, gt)
    with pytest.raises(ValueError, match=match):
        hungarian_match(pred, gt, num_classes=2)
    # a rejected image adds nothing
    assert m.num_images == 0 and m.labelled_pixels == 0 and m.tp.sum() == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"num_classes": 0}, {"num_classes": 2.0}, {"num_classes": 2, "ignore_index": 1}, {"num_classes": 2, "ignore_index": 0}],
)
def test_constructor_value_errors(kwargs):
    with pytest.raises(ValueError):
        SegmentationMetrics(**kwargs)


@pytest.mark.parametrize("case", ["voronoi-0", "blobs-0", "gradient-1", "hard-0"])
def test_reproduces_official_fixture_scores(case):
    # official_summary.json holds the reference evaluator's acc/mIoU of the
    # official segmentor's labels against the planted truth (num_classes = regions).
    summary = json.loads((FIXTURES / "official_summary.json").read_text())[case]
    z = np.load(FIXTURES / f"{case}.npz")
    m = SegmentationMetrics(num_classes=summary["regions"])
    m.update(z["official"], z["labels"])
    assert m.pixel_accuracy() == pytest.approx(summary["acc"], rel=1e-12)
    assert m.miou() == pytest.approx(summary["miou"], rel=1e-12)


# ----------------------------------------------------------------------------- class maps, no matching


def test_class_maps_are_scored_without_matching():
    # gt            pred (classes; 255 = unknown)
    # 0 0 1 -1      0 1 1 2
    # 2 2 1  1      255 2 1 0
    # labelled pixels: 7 (one ignored). per class (true rows, predicted cols):
    # class 0: TP 1 (0,0); FP: gt1 predicted 0 at (1,3) -> 1; FN: (0,1) predicted 1 -> 1
    # class 1: TP 2 ((0,2), (1,2)); FP: (0,1) -> 1; FN: (1,3) predicted 0 -> 1
    # class 2: TP 1 ((1,1)); FP 0 (the ignored pixel does not count); FN: (1,0) unknown -> 1
    gt = a([[0, 0, 1, -1], [2, 2, 1, 1]])
    pred = a([[0, 1, 1, 2], [255, 2, 1, 0]])
    m = SegmentationMetrics(num_classes=3, matching="none")
    r = m.update(pred, gt)
    assert m.tp.tolist() == [1, 2, 1]
    assert m.fp.tolist() == [1, 1, 0]
    assert m.fn.tolist() == [1, 1, 1]
    assert m.labelled_pixels == 7 == m.tp.sum() + m.fn.sum()
    assert m.pixel_accuracy() == pytest.approx(4 / 7)
    assert m.miou() == pytest.approx((1 / 3 + 2 / 4 + 1 / 2) / 3)
    assert r["mapping"] == {0: 0, 1: 1, 2: 2}
    # Hungarian matching would have permuted nothing here, but it would on swapped classes:
    swapped = SegmentationMetrics(num_classes=3, matching="none")
    swapped.update(a([[1, 1, 0, 0]]), a([[0, 0, 1, 1]]))
    assert swapped.pixel_accuracy() == 0.0
    hungarian = SegmentationMetrics(num_classes=3)
    hungarian.update(a([[1, 1, 0, 0]]), a([[0, 0, 1, 1]]))
    assert hungarian.pixel_accuracy() == 1.0


def test_class_map_metrics_round_trip_and_refuse_to_merge_with_matched_ones():
    m = SegmentationMetrics(num_classes=2, matching="none")
    m.update(a([[0, 1]]), a([[0, 0]]))
    again = SegmentationMetrics.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again.matching == "none" and again.tp.tolist() == m.tp.tolist()
    with pytest.raises(ValueError, match="matching"):
        m.merge(SegmentationMetrics(num_classes=2))
    with pytest.raises(ValueError, match="matching must be"):
        SegmentationMetrics(num_classes=2, matching="greedy")
