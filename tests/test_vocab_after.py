"""After labeling with a vocabulary: eval --semantic, export, gallery and reader on class maps.

Label rows are written directly in the pipeline's format (tests/after_helpers.py),
with hand-chosen segment classes, so every expected number is computed by hand.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from after_helpers import write_labels, write_png

from diffseg_core.vocabulary import PRESETS
from pipeline.after.cli import main as after_main
from pipeline.after.evaluate import evaluate

CITY = PRESETS["cityscapes"]
ROAD, SKY, CAR = CITY.index("road"), CITY.index("sky"), CITY.index("car")  # 0, 16, 19 (ids 7, 23, 26)


def _city_gt(tmp_path):
    ids = np.array([[7, 7, 26, 26], [0, 23, 23, 26]], dtype=np.uint8)  # road road car car / void sky sky car
    gt_dir = tmp_path / "cityscapes" / "gtFine" / "val" / "frankfurt"
    write_png(gt_dir / "frankfurt_000000_000294_gtFine_labelIds.png", ids)
    return tmp_path / "cityscapes" / "gtFine"


IMAGE = "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"


def test_semantic_cityscapes_scores_class_maps_without_matching(tmp_path):
    gt = _city_gt(tmp_path)
    # segments: 0 = top-left pixel, 1 = the rest of the top row + (1,3), 2 = (1,1),(1,2), 3 = (1,0) (void)
    pred = np.array([[0, 1, 1, 1], [3, 2, 2, 1]])
    # classes: seg0 road, seg1 car, seg2 unknown, seg3 sky
    classes = np.array([ROAD, CAR, -1, SKY])
    labels = write_labels(tmp_path / "labels", [[(IMAGE, (pred, classes, np.array([1.0, 0.75, 0.4, 1.0])))]],
                          vocabulary=CITY)
    r = evaluate(str(labels), str(gt), "cityscapes", use_ray=False, semantic=True)
    # labelled pixels: 7 (the void pixel (1,0) is ignored, so seg3's "sky" costs nothing)
    # road: TP (0,0); FN (0,1) predicted car           -> IoU 1/2
    # car:  TP (0,2),(0,3),(1,3); FP (0,1)             -> IoU 3/4
    # sky:  TP 0; FN (1,1),(1,2) unknown; FP 0         -> IoU 0
    assert r["semantic"] is True
    assert r["pixel_accuracy"] == pytest.approx(4 / 7)
    assert r["per_class_iou"]["road"] == pytest.approx(0.5)
    assert r["per_class_iou"]["car"] == pytest.approx(0.75)
    assert r["per_class_iou"]["sky"] == 0.0
    assert r["miou"] == pytest.approx((0.5 + 0.75 + 0.0) / 3)
    assert any("no matching" in n for n in r["notes"])
    # the same labels scored as segments (Hungarian) permute freely and score higher
    matched = evaluate(str(labels), str(gt), "cityscapes", use_ray=False)
    assert matched["pixel_accuracy"] > r["pixel_accuracy"]


def test_semantic_masks_class_i_is_mask_value_i_and_cli(tmp_path, capsys):
    vocab = ["water", "boat", "sky"]
    write_png(tmp_path / "gt" / "a" / "img.png", np.array([[0, 0, 1], [2, 2, 255]], dtype=np.uint8))
    pred = np.array([[0, 0, 1], [1, 1, 1]])
    labels = write_labels(tmp_path / "labels", [[("a/img.jpg", (pred, np.array([0, 2]), np.array([1.0, 0.6])))]],
                          vocabulary=vocab)
    assert after_main(["eval", str(labels), str(tmp_path / "gt"), "--format", "masks", "--semantic", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    # class map: water water sky / sky sky (sky); labelled 5 px
    # water TP 2; boat FN 1 (predicted sky); sky TP 2, FP 1
    assert r["pixel_accuracy"] == pytest.approx(4 / 5)
    assert r["per_class_iou"] == {"water": 1.0, "boat": 0.0, "sky": pytest.approx(2 / 3)}
    assert after_main(["eval", str(labels), str(tmp_path / "gt"), "--format", "masks", "--semantic"]) == 0
    assert "masks class maps: 1 images scored" in capsys.readouterr().out


def test_semantic_errors_are_one_sentence(tmp_path, capsys):
    gt = _city_gt(tmp_path)
    plain = write_labels(tmp_path / "plain", [[(IMAGE, np.zeros((2, 4), dtype=np.int64))]])
    own = write_labels(tmp_path / "own", [[(IMAGE, (np.zeros((2, 4), dtype=np.int64), np.array([0]), np.array([1.0])))]],
                       vocabulary=["road", "car"])
    cases = [
        ([str(plain), str(gt), "--format", "cityscapes", "--semantic"], "holds no class maps: label with --vocabulary"),
        ([str(own), str(gt), "--format", "cityscapes", "--semantic"], "made with --vocabulary cityscapes"),
        ([str(own), str(gt), "--format", "cityscapes", "--semantic", "--baselines", "--images", "x"],
         "run them separately"),
    ]
    for argv, message in cases:
        assert after_main(["eval", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def _photo_folder(tmp_path, names, size=(12, 16)):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_reader_yields_class_maps(tmp_path):
    from pipeline.after.reader import PseudoLabelDataset, iter_pairs

    images = _photo_folder(tmp_path, ["a.png", "b.png"])
    left_right = np.zeros((12, 16), dtype=np.int64)
    left_right[:, 8:] = 1
    rows = [("a.png", (left_right, np.array([2, -1]), np.array([0.9, 0.2]))),
            ("b.png", (np.zeros((12, 16), dtype=np.int64), np.array([0]), np.array([1.0]))),
            ("c.png", "decode error: not an image")]
    labels = write_labels(tmp_path / "labels", [rows], vocabulary=["road", "car", "sky"])
    got = {i: lab for i, _, lab in PseudoLabelDataset(str(labels), str(images), target="class_map", return_id=True)}
    assert sorted(got) == ["a.png", "b.png"]
    expected_a = np.where(left_right == 0, 2, 255)
    assert got["a.png"].dtype == torch.int64 and np.array_equal(got["a.png"].numpy(), expected_a)
    assert np.array_equal(got["b.png"].numpy(), np.zeros((12, 16)))
    # resized for batching: nearest, so 255 stays 255 and no class is invented
    for _, _, classes in iter_pairs(str(labels), str(images), size=6, target="class_map", return_id=True):
        assert classes.shape == (6, 6) and set(np.unique(classes)) <= {0, 2, 255}
    plain = write_labels(tmp_path / "plain", [[("a.png", left_right)]])
    with pytest.raises(ValueError, match="no class maps"):
        PseudoLabelDataset(str(plain), str(images), target="class_map")
    with pytest.raises(ValueError, match="target must be"):
        PseudoLabelDataset(str(labels), str(images), target="classes")


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_coco_export_round_trips_the_vocabulary_as_categories(tmp_path, capsys):
    from pycocotools.coco import COCO

    from pipeline.data.encode import decode_png

    vocab = ["person", "dog", "grass field"]
    blocks = np.kron(np.array([[0, 1], [2, 3]]), np.ones((4, 5), dtype=np.int64))  # 8 x 10, 4 segments
    classes = np.array([2, 0, -1, 0])  # grass field, person, unknown, person
    scores = np.array([0.9, 0.8, 0.3, 0.55])
    rows = [("a.jpg", (blocks, classes, scores)), ("b.jpg", "decode error: nope"),
            ("c.jpg", (np.zeros((3, 4), dtype=np.int64), np.array([1]), np.array([1.0])))]
    labels = write_labels(tmp_path / "labels", [rows], vocabulary=vocab)

    out = tmp_path / "coco.json"
    assert after_main(["export", str(labels), "--to", "coco", str(out)]) == 0
    coco = COCO(str(out))
    cats = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert cats == {1: "person", 2: "dog", 3: "grass field", 4: "unknown"}
    a = coco.loadImgs([i for i in coco.getImgIds() if coco.loadImgs(i)[0]["file_name"] == "a.jpg"])[0]
    rebuilt = np.full(blocks.shape, "", dtype=object)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[a["id"]])):
        seg = ann["attributes"]["segment_id"]
        assert ann["attributes"]["class_score"] == pytest.approx(scores[seg])
        rebuilt[coco.annToMask(ann).astype(bool)] = cats[ann["category_id"]]
    names = np.array(["grass field", "person", "unknown", "person"], dtype=object)
    assert (rebuilt == names[blocks]).all()
    c = coco.loadImgs([i for i in coco.getImgIds() if coco.loadImgs(i)[0]["file_name"] == "c.jpg"])[0]
    assert [cats[x["category_id"]] for x in coco.loadAnns(coco.getAnnIds(imgIds=[c["id"]]))] == ["dog"]

    results = tmp_path / "results.json"
    assert after_main(["export", str(labels), "--to", "coco-results", str(results)]) == 0
    assert "score = class score" in capsys.readouterr().out
    listed = json.loads(results.read_text())
    assert sorted(r["score"] for r in listed) == pytest.approx(sorted([*scores, 1.0]))
    coco.loadRes(str(results))  # the reference API takes it, categories and all

    pngs = tmp_path / "classes"
    assert after_main(["export", str(labels), "--to", "png", str(pngs), "--maps", "class"]) == 0
    assert "wrote 2 class maps" in capsys.readouterr().out
    assert np.array_equal(decode_png((pngs / "a.png").read_bytes()), np.where(classes >= 0, classes, 255)[blocks])
    plain = write_labels(tmp_path / "plain", [[("a.jpg", blocks)]])
    assert after_main(["export", str(plain), "--to", "png", str(tmp_path / "x"), "--maps", "class"]) == 2
    assert "holds no class maps" in capsys.readouterr().err
    assert after_main(["export", str(labels), "--to", "coco", str(tmp_path / "y.json"), "--maps", "class"]) == 2


def test_overlay_colours_by_class_and_writes_the_names():
    from pipeline.after.gallery import PALETTE, UNKNOWN_COLOUR, name_positions, overlay

    image = np.full((80, 80, 3), 100, dtype=np.uint8)
    labels = np.kron(np.array([[0, 1], [2, 3]]), np.ones((40, 40), dtype=np.int64))
    classes = np.array([0, 0, -1, 1])  # two segments of one class, one unknown
    out = overlay(image, labels, classes=classes, names=["person", "dog"])[:, -80:]
    blend = lambda colour: tuple((100 * 0.5 + np.array(colour) * 0.5).astype(np.uint8))  # noqa: E731
    assert tuple(out[3, 3]) == tuple(out[3, 76]) == blend(PALETTE[0])  # same class, same colour
    assert tuple(out[76, 3]) == blend(UNKNOWN_COLOUR)
    assert tuple(out[76, 76]) == blend(PALETTE[1])
    # names are written where each named segment is deepest: the centres of blocks 0, 1, 3
    assert [p[0] for p in name_positions(labels, classes)] == [0, 1, 3]
    for r, c in ((20, 20), (20, 60), (60, 60)):
        patch = out[r - 8 : r + 8, c - 20 : c + 20].reshape(-1, 3)
        assert (patch == 0).all(axis=1).any() and (patch == 255).all(axis=1).any()  # stroke and fill
    assert not (out[52:68, 12:28].reshape(-1, 3) == 0).all(axis=1).any()  # nothing written on the unknown one


def test_gallery_lists_class_names(tmp_path, capsys):
    images = _photo_folder(tmp_path, ["a.png"], size=(40, 60))
    halves = np.zeros((40, 60), dtype=np.int64)
    halves[:, 30:] = 1
    labels = write_labels(tmp_path / "labels", [[("a.png", (halves, np.array([1, -1]), np.array([0.8, 0.1])))]],
                          vocabulary=["sky", "traffic light"])
    assert after_main(["show", str(labels), "--images", str(images), "--out", str(tmp_path / "g")]) == 0
    page = (tmp_path / "g" / "index.html").read_text()
    assert '<span class="classes">traffic light</span> (1 unknown)' in page
    assert (tmp_path / "g" / "overlays" / "00000.png").is_file()
