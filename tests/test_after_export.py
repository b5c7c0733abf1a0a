"""diffseg export: COCO JSON and PNG folders decode back to exactly the stored label maps; COCO results
load in COCOeval; the Datumaro layout holds the same instances file."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from after_helpers import write_labels
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.after.cli import main as after_main
from pipeline.after.evaluate import evaluate
from pipeline.after.export import png_relpath
from pipeline.data.encode import compact, decode_png

# pycocotools 2.0.x on numpy 2: a DeprecationWarning per decode, nothing wrong with the masks
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _maps() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    blocks = np.kron(rng.integers(0, 5, size=(6, 8)), np.ones((5, 5), dtype=np.int64))  # 30 x 40, 5 segments
    ring = np.zeros((17, 23), dtype=np.int64)
    ring[3:14, 4:19] = 1
    ring[6:11, 8:15] = 2  # a segment with a hole in it
    many = np.arange(20 * 20).reshape(20, 20) % 300  # 300 segments: a 16-bit label PNG
    return {"set0/blocks.jpg": blocks, "set1/ring.png": ring, "shard-0.tar/key/many": many}


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    maps = _maps()
    rows = list(maps.items())
    root = write_labels(tmp_path_factory.mktemp("exp") / "labels",
                        [rows[:2] + [("bad.jpg", "truncated image: half a file")], rows[2:]])
    return root, {k: compact(v)[0].astype(np.int64) for k, v in maps.items()}


def test_coco_round_trip(labels, tmp_path, capsys):
    root, expected = labels
    out = tmp_path / "coco" / "labels.json"
    assert after_main(["export", str(root), "--to", "coco", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 images" in printed and "1 error rows skipped" in printed
    doc = json.loads(out.read_text())
    assert doc["categories"] == [{"id": 1, "name": "segment", "supercategory": "segment"}]
    coco = COCO(str(out))  # the reference API loads it
    assert len(coco.getImgIds()) == 3
    for img in coco.loadImgs(coco.getImgIds()):
        want = expected[img["file_name"]]
        assert (img["height"], img["width"]) == want.shape
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert len(anns) == len(np.unique(want))
        rebuilt = np.full(want.shape, -1, dtype=np.int64)
        for ann in anns:
            assert isinstance(ann["segmentation"]["counts"], str)
            mask = coco.annToMask(ann).astype(bool)
            assert not (rebuilt[mask] >= 0).any(), "segments overlap"
            rebuilt[mask] = ann["attributes"]["segment_id"]
            assert ann["area"] == mask.sum()
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert np.array_equal(rebuilt, want)


def test_coco_results_load_in_cocoeval_and_pair_with_the_instances(labels, tmp_path, capsys):
    root, expected = labels
    instances, results = tmp_path / "instances.json", tmp_path / "results.json"
    assert after_main(["export", str(root), "--to", "coco", str(instances)]) == 0
    assert after_main(["export", str(root), "--to", "coco-results", str(results)]) == 0
    assert "score = area fraction (1 error rows skipped)" in capsys.readouterr().out
    listed = json.loads(results.read_text())
    assert isinstance(listed, list) and len(listed) == sum(len(np.unique(m)) for m in expected.values())
    gt = COCO(str(instances))
    dt = gt.loadRes(str(results))  # fails on an instances file: needs a results list
    for img in gt.loadImgs(gt.getImgIds()):
        found = dt.loadAnns(dt.getAnnIds(imgIds=[img["id"]]))
        # score = area fraction: the segments of an image partition it, so its scores sum to 1
        assert sum(a["score"] for a in found) == pytest.approx(1.0, abs=1e-9)
        assert all(a["score"] == pytest.approx(a["area"] / (img["width"] * img["height"]), abs=1e-12)
                   for a in found)
    ev = COCOeval(gt, dt, "segm")
    ev.params.maxDets = [1, 10, 1000]  # one image has 300 segments
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    # the results are the instances' own segments: each matches its own at every IoU threshold,
    # so precision is 1 at every recall level (area "all", 1000 detections) and so is recall
    assert (ev.eval["precision"][:, :, :, 0, -1] == 1).all() and ev.stats[8] == pytest.approx(1.0)


def test_datumaro_layout_holds_the_instances_file(labels, tmp_path, capsys):
    """Datumaro's coco_instances importer needs annotations/instances_<subset>.json and an images/ folder
    (images/<subset>/<file_name>); checked by hand with Datumaro 1.13.12, which is not a test dependency."""
    root, _ = labels
    flat, folder = tmp_path / "flat.json", tmp_path / "dm"
    assert after_main(["export", str(root), "--to", "coco", str(flat)]) == 0
    assert after_main(["export", str(root), "--to", "coco", str(folder), "--layout", "datumaro"]) == 0
    written = folder / "annotations" / "instances_default.json"
    printed = capsys.readouterr().out
    assert f"wrote {written}: 3 images" in printed
    assert "images/default: the input images are not local: copy or link them there" in printed
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "annotations", "annotations/instances_default.json", "images", "images/default"]
    assert json.loads(written.read_text()) == json.loads(flat.read_text())
    assert len(COCO(str(written)).getImgIds()) == 3


def test_datumaro_layout_links_a_local_input_folder(labels, tmp_path, capsys):
    root, expected = labels
    photos = tmp_path / "photos"
    for image_id in expected:
        (photos / image_id).parent.mkdir(parents=True, exist_ok=True)
        (photos / image_id).write_bytes(b"pixels of " + image_id.encode())
    labelled = tmp_path / "labels"
    shutil.copytree(root, labelled)
    (labelled / "_manifest.json").write_text(json.dumps({"input": photos.as_uri()}))
    folder = tmp_path / "dm"
    assert after_main(["export", str(labelled), "--to", "coco", str(folder), "--layout", "datumaro"]) == 0
    assert f"images/default: link to {photos}" in capsys.readouterr().out
    coco = COCO(str(folder / "annotations" / "instances_default.json"))
    for img in coco.loadImgs(coco.getImgIds()):  # where Datumaro looks for each picture
        assert (folder / "images" / "default" / img["file_name"]).read_bytes() == b"pixels of " + img["file_name"].encode()


@pytest.mark.parametrize("source, argv, message", [
    ("labels", ["--to", "coco-results", "R.json", "--layout", "datumaro"], "--layout datumaro applies to --to coco only"),
    ("labels", ["--to", "voc", "X"], "--to must be coco, coco-results or png, not 'voc'"),
    ("empty", ["--to", "coco-results", "R.json"], "No committed label Parquet files under 'empty'."),
])
def test_export_misuse_is_one_sentence_and_leaves_nothing(labels, tmp_path, capsys, source, argv, message):
    root, _ = labels
    (tmp_path / "empty").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert after_main(["export", str(root) if source == "labels" else source, *argv]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"diffseg export: error: {message}"
    assert [p.name for p in tmp_path.rglob("*")] == ["empty"]


def test_png_round_trip_and_masks_eval(labels, tmp_path, capsys):
    root, expected = labels
    out = tmp_path / "png"
    assert after_main(["export", str(root), "--to", "png", str(out)]) == 0
    assert "3 label maps" in capsys.readouterr().out
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == sorted(png_relpath(i) for i in expected)
    for image_id, want in expected.items():
        assert np.array_equal(decode_png((out / png_relpath(image_id)).read_bytes()), want)
    # the exported folder is a valid `masks` ground truth: labels scored against themselves are perfect
    r = evaluate(str(root), str(out), "masks", num_classes=300, ignore_values=[], use_ray=False)
    assert r["num_images"] == 3 and r["pixel_accuracy"] == 1.0 and r["miou"] == 1.0


def test_png_relpath_is_safe():
    assert png_relpath("a/b.jpg") == "a/b.png"
    assert png_relpath("../../etc/passwd") == "etc/passwd.png"
    assert png_relpath("/abs/x.PNG") == "abs/x.png"
    assert png_relpath("shard.tar/k:1") == "shard.tar/k_1.png"
