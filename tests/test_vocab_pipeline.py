"""`diffseg label --vocabulary`: bad input stops before any work, the end-to-end output with
tiny-random (RANDOM weights: its class names mean nothing, the plumbing is what is tested),
resuming, and job specs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.encode import decode_png
from pipeline_helpers import FAST, make_photo_folder, read_output

# pycocotools 2.0.x on numpy 2: a DeprecationWarning per decode, nothing wrong with the masks
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FAST_ARGS = ["--model", "tiny-random", "--image-size", "64", "--num-points", "4"]
VOCAB = ["person", "dog", "grass field", "sky"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--vocabulary", ""], "the vocabulary is empty"),
        (["--vocabulary", "dog,cat,Dog"], "'dog' and 'Dog', the same class"),
        (["--vocabulary", "dog," + "x" * 80], "more than one prompt of this model holds (75)"),
        (["--vocabulary", "coco-stuff"], "unknown vocabulary preset 'coco-stuff'"),
        (["--vocabulary-file", "MISSING"], "does not exist"),
        (["--vocabulary", "dog,cat", "--vocabulary-file", "MISSING"], "not both"),
        (["--vocabulary", "dog,cat", "--class-threshold", "1.5"], "in [0, 1]"),
    ],
)
def test_bad_vocabulary_is_one_sentence_before_any_work(tmp_path, capsys, extra, message):
    make_photo_folder(tmp_path / "in")
    extra = [str(tmp_path / "missing.txt") if e == "MISSING" else e for e in extra]
    assert main(["label", str(tmp_path / "in"), str(tmp_path / "out"), *FAST_ARGS, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("diffseg label: error: ")
    assert not (tmp_path / "out").exists()  # nothing was listed, written or started


def _rows(out) -> list[dict]:
    return read_output(str(out)).to_pylist()


@pytest.fixture(scope="module")
def labelled(ray_session, tmp_path_factory):
    from pipeline import label

    root = tmp_path_factory.mktemp("vocab-run")
    ids = make_photo_folder(root / "in")
    (root / "classes.txt").write_text("# a vocabulary file\n" + "\n".join(VOCAB) + "\n")
    summary = label(str(root / "in"), str(root / "out"), vocabulary_file=str(root / "classes.txt"),
                    class_threshold=0.3, **FAST)
    return root, ids, summary


def test_every_segment_has_a_class_from_the_vocabulary_or_null(labelled):
    root, ids, summary = labelled
    assert summary["labelled"] == 3 and summary["errors"] == 0
    rows = _rows(root / "out")
    assert sorted(r["image_id"] for r in rows) == ids
    for row in rows:
        labels = decode_png(row["label_map"])
        classes = decode_png(row["class_map"])
        assert classes.shape == labels.shape == (row["height"], row["width"])
        assert len(row["segments"]) == row["num_segments"]
        for seg in row["segments"]:
            assert seg["class"] is None or seg["class"] in VOCAB
            assert 0.0 <= seg["class_score"] <= 1.0
            assert (seg["class"] is None) == (seg["class_score"] < 0.3)
            want = 255 if seg["class"] is None else VOCAB.index(seg["class"])
            assert (classes[labels == seg["id"]] == want).all()  # the class map is the segments' classes


def test_manifest_records_the_vocabulary_and_a_rerun_with_another_is_refused(labelled, capsys):
    from pipeline import label
    from pipeline.plan import LabelError

    root, _, _ = labelled
    manifest = json.loads((root / "out" / "_manifest.json").read_text())
    assert manifest["vocabulary"]["names"] == VOCAB and len(manifest["vocabulary"]["sha256"]) == 64
    assert manifest["parameters"]["vocabulary_sha256"] == manifest["vocabulary"]["sha256"]
    assert manifest["parameters"]["class_voting"] == "majority"
    # the same vocabulary given another way resumes: nothing left to do
    again = label(str(root / "in"), str(root / "out"), vocabulary=",".join(VOCAB), class_threshold=0.3, **FAST)
    assert again["this_run"]["images"] == 0 and again["complete"]
    with pytest.raises(LabelError, match=r"vocabulary_sha256 .* -> .*--overwrite"):
        label(str(root / "in"), str(root / "out"), vocabulary="person,dog", class_threshold=0.3, **FAST)
    with pytest.raises(LabelError, match=r"vocabulary_sha256 '[0-9a-f]+' -> off"):
        label(str(root / "in"), str(root / "out"), **FAST)


def test_coco_export_and_semantic_eval_of_a_real_run(labelled, tmp_path):
    from pycocotools.coco import COCO

    from pipeline.after_cli import main as after_main
    from pipeline.evaluate import evaluate

    root, _, _ = labelled
    out = tmp_path / "coco.json"
    assert after_main(["export", str(root / "out"), "--to", "coco", str(out)]) == 0
    coco = COCO(str(out))
    names = [c["name"] for c in coco.loadCats(coco.getCatIds())]
    assert names[:4] == VOCAB and set(names[4:]) <= {"unknown"}
    by_file = {r["image_id"]: r for r in _rows(root / "out")}
    for img in coco.loadImgs(coco.getImgIds()):
        row = by_file[img["file_name"]]
        classes = decode_png(row["class_map"])
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])):
            mask = coco.annToMask(ann).astype(bool)
            cat = coco.loadCats(ann["category_id"])[0]["name"]
            assert (classes[mask] == (255 if cat == "unknown" else VOCAB.index(cat))).all()
    # class maps exported as PNGs are a `masks` ground truth: scored against themselves, perfect
    pngs = tmp_path / "classes"
    assert after_main(["export", str(root / "out"), "--to", "png", str(pngs), "--maps", "class"]) == 0
    r = evaluate(str(root / "out"), str(pngs), "masks", use_ray=False, semantic=True)
    if r["labelled_pixels"]:  # every pixel unknown (255 = ignored) would leave nothing to score
        assert r["pixel_accuracy"] == 1.0


def test_job_spec_takes_the_vocabulary(tmp_path):
    from jobs.spec import SpecError, load_spec

    good = "input: /data/in\noutput: /data/out\nmodel: tiny-random\n"
    path = tmp_path / "spec.yaml"
    path.write_text(good + "method: {vocabulary: [person, dog], class_voting: mean, class_threshold: 0.4}\n")
    spec = load_spec(path)
    assert spec.options["vocabulary"] == ["person", "dog"]
    assert spec.options["class_voting"] == "mean" and spec.options["class_threshold"] == 0.4
    path.write_text(good + "method: {vocabulary: cityscapes, vocabulary_file: null}\n")
    assert load_spec(path).options["vocabulary"] == "cityscapes"
    for method, key, words in [
        ("{vocabulary: [dog, Dog]}", "method.vocabulary", "the same class"),
        ("{vocabulary: coco}", "method.vocabulary", "unknown vocabulary preset"),
        ("{vocabulary: []}", "method.vocabulary", "empty"),
        ("{class_voting: median}", "method.class_voting", "one of majority"),
        ("{class_threshold: 2}", "method.class_threshold", "between 0 and 1"),
    ]:
        path.write_text(good + f"method: {method}\n")
        with pytest.raises(SpecError) as err:
            load_spec(path)
        assert str(err.value).startswith(f"{path}: {key}: ") and words in str(err.value)


def test_cross_entropy_example_trains_on_the_class_maps(labelled, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_on_class_maps.py"
    spec = importlib.util.spec_from_file_location("train_on_class_maps", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    root, _, _ = labelled
    assert example.main([str(root / "out"), str(root / "in"), "--steps", "3", "--workers", "0", "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4 classes: person, dog, grass field, sky") and "step   3  loss" in out


def test_a_refused_vocabulary_starts_neither_torch_nor_ray(tmp_path):
    import subprocess
    import sys

    make_photo_folder(tmp_path / "in")
    code = ("import sys; from pipeline.cli import main; "
            "rc = main(['label', sys.argv[1], sys.argv[2], '--model', 'tiny-random', '--vocabulary', 'dog,' + 'x' * 80]); "
            "print(rc, 'torch' in sys.modules, 'ray' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False", "False"], proc.stderr
    assert "more than one prompt" in proc.stderr and not (tmp_path / "out").exists()
