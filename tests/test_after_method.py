"""diffseg eval, the gallery and the label run's summary say which grouping made the labels, read
from the manifest's parameters (absent: the paper's KL merge)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from after_helpers import write_labels, write_png

from pipeline.after.cli import main as after_main
from pipeline.after.gallery import build_gallery
from pipeline.cli import format_summary

NCUT = {"kl_threshold": 1.1, "grouping": "ncut", "ncut_threshold": "auto", "ncut_affinity": "attention",
        "boundaries": "pamr", "pamr_iterations": 10}
NCUT_TEXT = "grouping ncut (threshold auto, attention affinity), boundaries pamr"


@pytest.fixture
def labelled(tmp_path) -> dict[str, Path]:
    write_png(tmp_path / "gt" / "a" / "img.png", np.array([[0, 0, 1], [1, 1, 1]], dtype=np.uint8))
    write_png(tmp_path / "images" / "a" / "img.jpg", np.full((2, 3, 3), 90, dtype=np.uint8))
    labels = write_labels(tmp_path / "labels", [[("a/img.jpg", np.array([[3, 3, 1], [1, 1, 1]]))]])
    return {"root": tmp_path, "labels": Path(labels), "manifest": Path(labels) / "_manifest.json"}


def _parameters(manifest: Path, parameters: dict | None) -> None:
    body = json.loads(manifest.read_text())
    if parameters is None:
        body.pop("parameters", None)
    else:
        body["parameters"] = parameters
    manifest.write_text(json.dumps(body))


def _eval(labelled, capsys, *extra: str) -> str:
    argv = ["eval", str(labelled["labels"]), str(labelled["root"] / "gt"), "--format", "masks", "--num-classes", "2",
            "--no-ray", *extra]
    assert after_main(argv) == 0
    return capsys.readouterr().out


def test_eval_says_which_grouping_made_the_labels(labelled, capsys):
    _parameters(labelled["manifest"], NCUT)
    r = json.loads(_eval(labelled, capsys, "--json"))
    assert r["grouping"] == "ncut" and r["ncut_threshold"] == "auto" and r["ncut_affinity"] == "attention"
    assert r["boundaries"] == "pamr"
    assert _eval(labelled, capsys).splitlines()[1] == f"labels made with {NCUT_TEXT}"
    _parameters(labelled["manifest"], {"kl_threshold": 1.1})  # an output made before the cut: the KL merge
    r = json.loads(_eval(labelled, capsys, "--json"))
    assert r["grouping"] == "kl-merge" and r["boundaries"] == "off" and "ncut_threshold" not in r
    assert _eval(labelled, capsys).splitlines()[1] == "labels made with grouping kl-merge, boundaries off"


def test_eval_of_labels_without_a_manifest_says_nothing_of_the_method(labelled, capsys):
    labelled["manifest"].unlink()
    r = json.loads(_eval(labelled, capsys, "--json"))
    assert "grouping" not in r and "labels made with" not in _eval(labelled, capsys)


def test_the_gallery_page_says_which_grouping_made_the_labels(labelled):
    images, out = str(labelled["root"] / "images"), labelled["root"] / "gallery"
    _parameters(labelled["manifest"], NCUT)
    build_gallery(str(labelled["labels"]), images, str(out / "ncut"), n=1)
    page = (out / "ncut" / "index.html").read_text()
    assert f'<h1>DiffSeg pseudo-labels</h1>\n<p class="method">Labels made with {NCUT_TEXT}.</p>' in page
    _parameters(labelled["manifest"], None)
    build_gallery(str(labelled["labels"]), images, str(out / "kl"), n=1)
    assert "Labels made with grouping kl-merge, boundaries off." in (out / "kl" / "index.html").read_text()


def test_the_run_summary_says_which_grouping_made_the_labels():
    summary = {
        "output": "labels", "model": "m", "random_weights": False, "images": 1, "labelled": 1, "errors": 0,
        "errors_by_kind": {}, "complete": True, "images_per_s": None, "steady_images_per_s": None,
        "shards": {"total": 1, "done": 1, "skipped_already_done": 0, "written_this_run": 1, "new_in_plan": 1},
        "this_run": {"images": 1, "labelled": 1, "errors_by_kind": {}, "duplicates_dropped": 0},
        "stage_seconds": {"pipeline": 6.0}, "method": {},
    }
    assert format_summary(summary).splitlines()[1] == "method: grouping kl-merge, boundaries off"
    summary["method"] = {k: NCUT[k] for k in ("grouping", "ncut_threshold", "ncut_affinity", "boundaries")}
    assert format_summary(summary).splitlines()[1] == f"method: {NCUT_TEXT}"
