"""A rerun with nothing to do: checked, listed and planned before Ray, closed without starting it.

The first run is the shared labelled photo folder (``labelled_photos``: one real run on the
shared local Ray, copied fresh for each test); the reruns whose Ray start is the point run
in a fresh process (no Ray yet, as for a user), where ``ray.init`` and the input's listing are counted
by pass-through wrappers around the real functions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import LabelError, label
from pipeline.cli import format_summary
from pipeline_helpers import FAST, make_photo_folder, read_output

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}

# label() once per options dict, in this fresh process; what happened, as one JSON line
_RERUN = r"""
import json, sys
import ray
import pipeline.job.work as work
from pipeline import LabelError, label

events = []
real_init, real_list = ray.init, work.plan_inputs

def init(*args, **kwargs):
    events.append("ray start")
    return real_init(*args, **kwargs)

def plan_inputs(*args, **kwargs):
    events.append("list")
    return real_list(*args, **kwargs)

ray.init, work.plan_inputs = init, plan_inputs
results = []
for options in json.loads(sys.argv[3]):
    try:
        results.append({"summary": label(sys.argv[1], sys.argv[2], **options)})
    except LabelError as exc:
        results.append({"refused": str(exc)})
    results[-1]["events"] = list(events)
    events.clear()
print("RESULT " + json.dumps(results))
"""


def _rerun(src: Path, out: Path, *options: dict) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", _RERUN, str(src), str(out), json.dumps(list(options))],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def _manifest(out: Path) -> dict:
    return json.loads((out / "_manifest.json").read_text())


def test_a_complete_output_is_closed_without_starting_ray(labelled_photos):
    src, out, first = labelled_photos.src, labelled_photos.out, labelled_photos.first
    assert first["complete"]

    (again,) = _rerun(src, out, FAST)
    assert again["events"] == ["list"]  # listed once; Ray never started
    summary = again["summary"]
    assert summary["nothing_to_do"] is True and summary["complete"]
    assert summary["images"] == 3 and summary["labelled"] == 3 and summary["this_run"]["images"] == 0
    assert summary["shards"] == {**first["shards"], "skipped_already_done": 1, "written_this_run": 0,
                                 "new_in_plan": 0}
    manifest = _manifest(out)
    assert manifest["status"] == "complete" and len(manifest["runs"]) == 2
    assert manifest["runs"][-1]["nothing_to_do"] is True and "nothing_to_do" not in manifest["runs"][0]
    assert manifest["runs"][-1]["options"]["use_gpu"] is False  # what the first run (on CPU) used
    assert manifest["counts"] == {k: summary[k] for k in ("images", "labelled", "errors", "errors_by_kind", "shards")}
    assert read_output(str(out)).num_rows == 3
    assert first["nothing_to_do"] is False  # a run that labelled says so too


def test_a_new_input_is_listed_once_before_ray_and_labelled(labelled_photos):
    src, out, ids = labelled_photos.src, labelled_photos.out, labelled_photos.ids
    (src / "late.png").write_bytes((src / "set0" / "coffee-0.png").read_bytes())

    (again,) = _rerun(src, out, FAST)
    assert again["events"] == ["list", "ray start"]  # planned before Ray, and that plan is the one used
    summary = again["summary"]
    assert summary["nothing_to_do"] is False and summary["complete"]
    assert summary["this_run"]["images"] == 1 and summary["images"] == 4
    assert sorted(read_output(str(out)).column("image_id").to_pylist()) == sorted(ids + ["late.png"])
    assert "nothing_to_do" not in _manifest(out)["runs"][-1]


def test_other_settings_are_still_refused_and_before_ray(labelled_photos, tmp_path):
    src, out, out16 = labelled_photos.src, labelled_photos.out, tmp_path / "out16"
    label(str(src), str(out16), dtype="bf16", **FAST)  # on CPU: a dtype --device auto would not choose
    with pytest.raises(LabelError) as refused:
        label(str(src), str(out), **{**FAST, "kl_threshold": 0.5})
    in_process = str(refused.value)

    (changed,) = _rerun(src, out, {**FAST, "kl_threshold": 0.5})
    (auto,) = _rerun(src, out16, FAST)  # the dtype is the cluster's choice: settled here without Ray
    assert changed == {"refused": in_process, "events": []}
    assert "different settings (kl_threshold 1.1 -> 0.5)" in in_process and "--overwrite" in in_process
    assert auto["events"] == []
    assert "different settings (dtype 'bf16' -> 'fp32'" in auto["refused"] and "--overwrite" in auto["refused"]
    assert _manifest(out)["status"] == "complete" and len(_manifest(out)["runs"]) == 1


def test_error_rows_are_pointed_at_and_redone_with_retry_errors(ray_session, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    make_photo_folder(src)
    (src / "zz-broken.png").write_bytes(b"not an image")
    first = label(str(src), str(out), **FAST)
    assert first["errors_by_kind"] == {"not an image": 1}

    again = label(str(src), str(out), **FAST)
    assert again["nothing_to_do"] is True and again["errors"] == 1
    assert format_summary(again).splitlines()[0] == (
        f"diffseg: nothing to do: all 4 images under {src} are already done in {out}, 1 of them as error rows "
        "(use --overwrite to label again, --retry-errors 'not an image' to retry the 1 error row)")
    other_kind = label(str(src), str(out), retry_errors=["read error"], **FAST)
    assert other_kind["nothing_to_do"] is True  # no row of that kind

    (src / "zz-broken.png").write_bytes((src / "set0" / "coffee-0.png").read_bytes())
    redone = label(str(src), str(out), retry_errors=["not an image"], **FAST)
    assert redone["nothing_to_do"] is False and redone["complete"]
    assert redone["this_run"]["error_rows_retried"] == 1 and redone["errors"] == 0 and redone["images"] == 4
    assert [r["status"] for r in _manifest(out)["runs"]] == ["complete"] * 4


def test_the_cli_says_nothing_to_do_in_one_line_and_exits_0(labelled_photos):
    src, out = labelled_photos.src, labelled_photos.out
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "label", str(src), str(out), "--model", "tiny-random", "--image-size",
         "64", "--num-points", "4", "--batch-size", "4"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [
        f"diffseg: nothing to do: all 3 images under {src} are already labelled in {out} "
        "(use --overwrite to label again)",
        "model 'tiny-random' has RANDOM weights: these labels only show the plumbing",
    ]
    assert "Ray" not in proc.stderr  # nothing of Ray's: it never started
