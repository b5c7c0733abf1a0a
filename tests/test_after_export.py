"""diffseg export: COCO JSON and PNG folders decode back to exactly the stored label maps."""
from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools.coco import COCO

from after_helpers import write_labels
from pipeline.after_cli import main as after_main
from pipeline.encode import compact, decode_png
from pipeline.evaluate import evaluate
from pipeline.export import png_relpath

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
