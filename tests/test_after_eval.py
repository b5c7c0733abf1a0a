"""diffseg eval: hand-computed accuracy and mIoU on tiny COCO-Stuff-27, Cityscapes and masks layouts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from after_helpers import write_labels, write_png

from pipeline.after.cli import main as after_main
from pipeline.after.datasets_gt import COCO_27, GroundTruthError, load_ground_truth
from pipeline.after.evaluate import evaluate
from pipeline.after.image_index import center_crop_resize

# COCO-Stuff stuffthingmaps pixel values (category id - 1) and their coarse classes.
PERSON, CAR, GRASS, SKY, OTHER, UNLABELLED = 0, 2, 123, 156, 182, 255
CATEGORIES_THINGS = [{"id": 1, "name": "person", "supercategory": "person"},
                     {"id": 3, "name": "car", "supercategory": "vehicle"}]
CATEGORIES_STUFF = [{"id": 124, "name": "grass", "supercategory": "plant"},
                    {"id": 157, "name": "sky-other", "supercategory": "sky"},
                    {"id": 183, "name": "other", "supercategory": "other"}]

# Image A, 4x4, same size as its label.
GT_A = np.array([[SKY, SKY, SKY, SKY],
                 [SKY, SKY, SKY, SKY],
                 [GRASS, GRASS, PERSON, PERSON],
                 [GRASS, GRASS, PERSON, UNLABELLED]], dtype=np.uint8)
PRED_A = np.array([[0, 0, 0, 0],
                   [0, 0, 0, 1],
                   [1, 1, 2, 2],
                   [1, 1, 2, 2]])
# seg0->sky (7 of 8 sky), seg1->grass (4 + 1 sky pixel), seg2->person (3; its 4th pixel is unlabelled)
# sky TP7 FP0 FN1; grass TP4 FP1 FN0; person TP3 FP0 FN0; 15 labelled pixels

# Image B: what its 6x8 ground truth must become at the label's 4x4 (centre crop 6x6, nearest).
GT_B_AT_LABEL = np.array([[SKY, SKY, SKY, UNLABELLED],
                          [PERSON, PERSON, GRASS, GRASS],
                          [PERSON, PERSON, GRASS, GRASS],
                          [OTHER, OTHER, GRASS, GRASS]], dtype=np.uint8)
PRED_B = np.array([[0, 0, 0, 0],
                   [1, 1, 1, 2],
                   [1, 1, 2, 2],
                   [0, 0, 2, 2]])
# seg0->sky 3, seg1->person 4 (+1 grass pixel), seg2->grass 5; 13 labelled pixels
# sky TP3; person TP4 FP1; grass TP5 FN1

ACC_AB = (14 + 12) / (15 + 13)
MIOU_AB = np.mean([10 / 11, 9 / 11, 7 / 8])  # sky, grass, person over both images
ACC_A, MIOU_A = 14 / 15, np.mean([7 / 8, 4 / 5, 1.0])


def _gt_b_full() -> np.ndarray:
    """A 6x8 map whose centre-crop + nearest resize to 4x4 is GT_B_AT_LABEL; every other pixel is 'car'."""
    full = np.full((6, 8), CAR, dtype=np.uint8)
    rows = cols = [0, 2, 3, 5]  # floor((i + 0.5) * 6 / 4)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            full[r, 1 + c] = GT_B_AT_LABEL[i, j]  # crop starts at column (8 - 6) // 2 = 1
    return full


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cocostuff")
    ann = root / "annotations"
    write_png(ann / "val2017" / "000000000139.png", GT_A)
    write_png(ann / "val2017" / "000000000285.png", _gt_b_full())
    write_png(ann / "val2017" / "000000000632.png", GT_A)  # its label row is an error
    (ann / "instances_val2017.json").write_text(json.dumps({"categories": CATEGORIES_THINGS}))
    (ann / "stuff_val2017.json").write_text(json.dumps({"categories": CATEGORIES_STUFF}))
    labels = write_labels(root / "labels", [
        [("val2017/000000000139.jpg", PRED_A), ("val2017/000000000285.jpg", PRED_B)],
        [("val2017/000000000632.jpg", "decode error: broken"), ("val2017/000000000724.jpg", PRED_A)],  # 724: no GT
    ], uncommitted=[("val2017/000000000139.jpg", np.zeros((4, 4), dtype=np.int64))])
    (root / "curated.txt").write_text("000000000139\n000000099999\n")
    return {"labels": labels, "gt": ann, "list": root / "curated.txt"}


def test_center_crop_resize_matches_the_papers_crop():
    gt = _gt_b_full()
    assert np.array_equal(center_crop_resize(gt, (4, 4), nearest=True), GT_B_AT_LABEL)
    same = np.arange(12).reshape(3, 4)
    assert center_crop_resize(same, (3, 4), nearest=True) is same


def test_coco_stuff_27_hand_computed(coco):
    r = evaluate(str(coco["labels"]), str(coco["gt"]), "coco-stuff-27", use_ray=False)
    assert r["num_images"] == 2
    assert r["pixel_accuracy"] == pytest.approx(ACC_AB)
    assert r["miou"] == pytest.approx(MIOU_AB)
    iou = r["per_class_iou"]
    assert iou["sky"] == pytest.approx(10 / 11) and iou["plant"] == pytest.approx(9 / 11)
    assert iou["person"] == pytest.approx(7 / 8) and iou["vehicle"] is None
    assert r["skipped"] == {"label_errors": 1, "missing_gt": 1, "gt_errors": 0}
    assert r["gt_resized"] == 1 and any("centre-cropped" in n for n in r["notes"])
    assert r["label_rows"] == 4  # the uncommitted part is not read


def test_coco_image_list_restricts_to_the_curated_subset(coco):
    r = evaluate(str(coco["labels"]), str(coco["gt"]), "coco-stuff-27", image_list=str(coco["list"]), use_ray=False)
    assert r["num_images"] == 1
    assert r["pixel_accuracy"] == pytest.approx(ACC_A) and r["miou"] == pytest.approx(MIOU_A)
    assert r["image_list"]["listed"] == 2 and r["image_list"]["with_label_row"] == 1


def test_coco_needs_things_and_stuff_categories(coco, tmp_path):
    only_stuff = tmp_path / "stuff.json"
    only_stuff.write_text(json.dumps({"categories": CATEGORIES_STUFF}))
    with pytest.raises(GroundTruthError, match="both things and stuff"):
        load_ground_truth("coco-stuff-27", str(coco["gt"]), categories=[str(only_stuff)])
    gt = load_ground_truth("coco-stuff-27", str(coco["gt"]))
    assert gt.lut[GRASS] == COCO_27.index("plant") and gt.lut[OTHER] == -1 and gt.lut[UNLABELLED] == -1


def test_eval_on_ray_equals_in_process(coco, ray_session):
    local = evaluate(str(coco["labels"]), str(coco["gt"]), "coco-stuff-27", use_ray=False)
    on_ray = evaluate(str(coco["labels"]), str(coco["gt"]), "coco-stuff-27", use_ray=True, workers=1)
    assert on_ray["ray"] is True
    assert on_ray["metrics"] == local["metrics"] and on_ray["skipped"] == local["skipped"]


def test_cityscapes_hand_computed(tmp_path):
    ids = np.array([[7, 7, 26, 26], [0, 23, 23, 26]], dtype=np.uint8)  # road road car car / void sky sky car
    gt_dir = tmp_path / "cityscapes" / "gtFine" / "val" / "frankfurt"
    write_png(gt_dir / "frankfurt_000000_000294_gtFine_labelIds.png", ids)
    write_png(gt_dir / "frankfurt_000000_000294_gtFine_color.png", np.zeros((2, 4, 3), dtype=np.uint8))
    pred = np.array([[0, 1, 1, 1], [1, 2, 2, 1]])
    labels = write_labels(tmp_path / "labels", [[("leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png",
                                                  pred)]])
    r = evaluate(str(labels), str(tmp_path / "cityscapes" / "gtFine"), "cityscapes", use_ray=False)
    # seg0->road 1 of 2, seg1->car 3 (+1 road pixel), seg2->sky 2; the void pixel is ignored
    assert r["pixel_accuracy"] == pytest.approx(6 / 7)
    assert r["miou"] == pytest.approx((1 / 2 + 3 / 4 + 1) / 3)
    assert r["per_class_iou"]["road"] == pytest.approx(0.5) and r["per_class_iou"]["car"] == pytest.approx(0.75)


def test_masks_cli_json_and_table(tmp_path, capsys):
    gt = np.array([[0, 0, 1], [2, 2, 255]], dtype=np.uint8)
    write_png(tmp_path / "gt" / "a" / "img.png", gt)
    labels = write_labels(tmp_path / "labels", [[("a/img.jpg", np.array([[3, 3, 3], [1, 1, 1]]))]])
    assert after_main(["eval", str(labels), str(tmp_path / "gt"), "--format", "masks", "--num-classes", "3",
                       "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    # seg3 (renumbered 1) -> class 0 (2 px, +1 class-1 px FP); seg1 (0) -> class 2 (2 px, the ignored one is out)
    assert r["pixel_accuracy"] == pytest.approx(4 / 5)
    assert r["miou"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert after_main(["eval", str(labels), str(tmp_path / "gt"), "--format", "masks", "--num-classes", "3"]) == 0
    table = capsys.readouterr().out
    assert "pixel accuracy     80.0 %" in table and "mIoU" in table
    assert after_main(["eval", str(labels), str(tmp_path / "gt"), "--format", "masks"]) == 2
    assert "needs --num-classes" in capsys.readouterr().err


def test_table_says_how_many_problems_it_does_not_list(tmp_path, capsys):
    write_png(tmp_path / "gt" / "a" / "img.png", np.array([[0, 1]], dtype=np.uint8))
    rows = [("a/img.jpg", np.array([[0, 1]]))] + [(f"b/missing-{i:02d}.jpg", np.array([[0, 0]])) for i in range(25)]
    labels = write_labels(tmp_path / "labels", [rows[:13], rows[13:] + [("c/bad.jpg", "truncated image: x")]])
    argv = ["eval", str(labels), str(tmp_path / "gt"), "--format", "masks", "--num-classes", "2", "--no-ray"]
    assert after_main(argv) == 0
    table = capsys.readouterr().out
    assert "(skipped: 1 label errors, 25 without ground truth, 0 unreadable ground truth)" in table
    listed = [line for line in table.splitlines() if line.startswith("missing gt: ")]
    assert len(listed) == 6 and "b/missing-00.jpg" in listed[0]
    assert listed[-1] == "missing gt: ... and 20 more (--json lists the first 20)"
    assert [line for line in table.splitlines() if line.startswith("label errors")] == [
        "label errors: c/bad.jpg: truncated image: x"]  # all of them shown: no "more" line
    assert after_main(argv + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["skipped"]["missing_gt"] == 25 and len(r["examples"]["missing_gt"]) == 20
