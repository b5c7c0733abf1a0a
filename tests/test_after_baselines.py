"""diffseg eval --baselines: K-Means-C / K-Means-S from the tiny model's attention, next to DiffSeg."""
from __future__ import annotations

import json

import numpy as np
import pytest
from after_helpers import write_labels, write_png

from pipeline.after.cli import main as after_main
from pipeline.after.evaluate import evaluate, format_report
from pipeline.data.schema import MANIFEST

NUM_CLASSES = 4
METHODS = ("K-Means-C", "K-Means-S")


def _gt(h: int, w: int, classes: list[int], ignore_corner: bool) -> np.ndarray:
    """Vertical bands of ``classes``; optionally an ignored (255) top-left corner."""
    gt = np.zeros((h, w), dtype=np.uint8)
    for i, c in enumerate(classes):
        gt[:, i * w // len(classes):(i + 1) * w // len(classes)] = c
    if ignore_corner:
        gt[:3, :3] = 255
    return gt


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("baselines")
    rng = np.random.default_rng(0)
    # image id -> (image size, ground truth, ground-truth classes present)
    cases = {
        "a/img0.png": ((24, 32), _gt(24, 32, [0, 1, 2], True), 3),
        "a/img1.png": ((20, 20), _gt(20, 20, [3], False), 1),
        "b/img2.png": ((32, 24), _gt(64, 48, [0, 1, 2, 3], True), 4),  # GT at twice the label's size
    }
    rows = []
    for image_id, (size, gt, _) in cases.items():
        write_png(root / "input" / image_id, rng.integers(0, 256, size + (3,), dtype=np.uint8))
        write_png(root / "gt" / image_id, gt)
        rows.append((image_id, rng.integers(0, 3, size)))
    write_png(root / "input" / "c" / "nogt.png", np.zeros((8, 8, 3), dtype=np.uint8))
    rows += [("c/nogt.png", np.zeros((8, 8), dtype=np.int64)), ("c/broken.png", "decode error: broken")]
    labels = write_labels(root / "labels", [rows[:2], rows[2:]])
    return {"root": root, "labels": labels, "classes": {k: v[2] for k, v in cases.items()}}


def _check_baselines(r: dict, classes: dict[str, int]) -> None:
    b = r["baselines"]
    assert set(b["methods"]) == set(METHODS)
    for m in [r] + [b["methods"][name] for name in METHODS]:
        assert m["num_images"] == len(classes)
        assert 0.0 <= m["pixel_accuracy"] <= 1.0 and 0.0 <= m["miou"] <= 1.0
    assert r["labelled_pixels"] == b["methods"]["K-Means-C"]["labelled_pixels"] == b["methods"]["K-Means-S"][
        "labelled_pixels"]  # same ground truth, same crop/resize
    assert {p["image_id"] for p in b["per_image"]} == set(classes)
    for p in b["per_image"]:
        assert p["gt_classes"] == classes[p["image_id"]]
        assert p["k"] == {"K-Means-C": 6, "K-Means-S": classes[p["image_id"]]}
        assert 1 <= p["segments"]["K-Means-S"] <= classes[p["image_id"]]
        assert 1 <= p["segments"]["K-Means-C"] <= 6
    assert b["model"] == "tiny-random" and b["image_size"] == 64
    table = format_report(r)
    for name in ("DiffSeg",) + METHODS:
        assert any(line.startswith(name) and line.count("%") == 0 and "." in line for line in table.splitlines()), table


def test_cli_baselines_take_model_and_size_from_the_manifest(data, capsys):
    manifest = data["labels"] / MANIFEST
    saved = manifest.read_text()
    manifest.write_text(json.dumps({"model": {"model": "tiny-random", "revision": None},
                                    "parameters": {"image_size": 64, "timestep": 300}}))
    try:
        code = after_main(["eval", str(data["labels"]), str(data["root"] / "gt"), "--format", "masks",
                           "--num-classes", str(NUM_CLASSES), "--baselines", "--images", str(data["root"] / "input"),
                           "--json", "--no-ray"])
    finally:
        manifest.write_text(saved)
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert r["baselines"]["model_from"] == "manifest"
    _check_baselines(r, data["classes"])


def test_evaluate_baselines_with_given_model_and_image_list(data, tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text("img0\nimg2\n")
    r = evaluate(str(data["labels"]), str(data["root"] / "gt"), "masks", num_classes=NUM_CLASSES, use_ray=False,
                 image_list=str(listed), baselines=True, images=str(data["root"] / "input"), model="tiny-random",
                 image_size=64, baseline_batch_size=1)
    _check_baselines(r, {k: v for k, v in data["classes"].items() if k != "a/img1.png"})
    assert r["baselines"]["skipped"] == {"image_errors": 0, "gt_errors": 0}


def test_baselines_without_images_is_a_clear_error(data, capsys):
    with pytest.raises(ValueError, match="--baselines needs --images"):
        evaluate(str(data["labels"]), str(data["root"] / "gt"), "masks", num_classes=NUM_CLASSES, baselines=True)
    assert after_main(["eval", str(data["labels"]), str(data["root"] / "gt"), "--format", "masks",
                       "--num-classes", str(NUM_CLASSES), "--baselines"]) == 2
    err = capsys.readouterr().err
    assert "--baselines needs --images" in err and err.count("\n") == 1
