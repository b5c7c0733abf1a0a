"""Exactly-once output: reruns skip committed shards, crashes and kills leave no duplicates or gaps."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import LabelError, label
from pipeline_helpers import FAST, make_photo_folder, read_output

REPO = Path(__file__).resolve().parents[1]


def _ids(out: Path) -> list[str]:
    return read_output(str(out)).column("image_id").to_pylist()


def test_rerun_labels_only_what_is_missing(ray_session, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    ids = make_photo_folder(src, copies=2)  # 6 images -> 3 shards of 2
    first = label(str(src), str(out), rows_per_file=2, **FAST)
    assert first["complete"] and first["images"] == 6 and first["labelled"] == 6
    assert sorted(_ids(out)) == ids

    again = label(str(src), str(out), rows_per_file=2, **FAST)
    assert again["shards"]["written_this_run"] == 0 and again["this_run"]["images"] == 0
    assert again["shards"]["skipped_already_done"] == 3 and again["images"] == 6

    # A crash after shard 1's file was renamed but before its marker; a half-written temp part;
    # and a new image added since the first run.
    (out / "_done" / "000001.json").unlink()
    (out / "_inprogress").mkdir(exist_ok=True)
    (out / "_inprogress" / "labels-000002-000.parquet").write_bytes(b"half a file")
    (src / "late.png").write_bytes((src / "set0" / "coffee-0.png").read_bytes())
    resumed = label(str(src), str(out), rows_per_file=2, **FAST)
    assert resumed["shards"]["written_this_run"] == 2  # shard 1 again + the new shard 3
    assert resumed["this_run"]["images"] == 3 and resumed["images"] == 7 and resumed["complete"]
    assert sorted(_ids(out)) == sorted(ids + ["late.png"])  # exactly once
    assert not (out / "_inprogress").exists()  # spill parts and the folder are gone
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and len(manifest["runs"]) == 3
    assert manifest["counts"]["images"] == 7
    assert manifest["model"]["model"] == "tiny-random" and manifest["model"]["weights_sha256"]
    assert manifest["parameters"]["num_points"] == 4 and manifest["version"]


def test_different_parameters_are_refused_unless_overwrite(labelled_photos):
    src, out = labelled_photos.src, labelled_photos.out
    with pytest.raises(LabelError, match=r"different settings \(kl_threshold 1.1 -> 0.5\).*--overwrite"):
        label(str(src), str(out), **{**FAST, "kl_threshold": 0.5})
    (out / "keep-me.txt").write_text("not ours")
    redone = label(str(src), str(out), overwrite=True, **{**FAST, "kl_threshold": 0.5})
    assert redone["images"] == 3 and redone["shards"]["written_this_run"] == 1
    assert (out / "keep-me.txt").exists()  # --overwrite deletes only what the tool wrote
    assert json.loads((out / "_manifest.json").read_text())["parameters"]["kl_threshold"] == 0.5


@pytest.mark.slow  # a killed run, as the other kill tests: a fresh process and its own Ray
def test_killed_run_then_rerun_gives_every_image_exactly_once(ray_session, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    ids = make_photo_folder(src, copies=6)  # 18 images, one per shard
    args = ["--model", "tiny-random", "--image-size", "64", "--num-points", "4", "--rows-per-file", "1",
            "--batch-size", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "label", str(src), str(out), *args],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            done = list((out / "_done").glob("*.json")) if (out / "_done").exists() else []
            if len(done) >= 3:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    killed_at = len(list((out / "_done").glob("*.json")))
    assert killed_at >= 3, "the run never committed a shard"
    print(f"killed with {killed_at} of 18 shards committed")
    summary = label(str(src), str(out), rows_per_file=1, batch_size=1, model="tiny-random", image_size=64,
                    num_points=4)
    assert summary["complete"] and summary["images"] == 18
    assert summary["shards"]["skipped_already_done"] == killed_at
    got = _ids(out)
    assert len(got) == len(set(got)) and sorted(got) == ids


def _markers(out: Path) -> int:
    return len(list((out / "_done").glob("*.json"))) if (out / "_done").exists() else 0


@pytest.mark.slow
def test_kills_at_random_moments_lose_only_the_shards_in_flight(ray_session, tmp_path):
    """Each run commits shard by shard (no lumps of a fixed batch), so a kill loses at most the
    shards in flight, and each rerun redoes exactly the shards without a marker.

    The moment is drawn in commits, not seconds: on a fast machine a whole run commits within
    a second of its first marker, so a kill after a random sleep came after the end (and the
    next run had nothing to do). Each run freezes its driver at its k-th commit (random k, just
    before or just after the marker), its workers go on for a random while, then it is killed.
    """
    import random

    from output_views import kill, start_paused

    src, out = tmp_path / "in", tmp_path / "out"
    ids = make_photo_folder(src, copies=10)  # 30 images, 15 shards of 2
    rng = random.Random(16)
    history = []
    for run in range(2):
        before = _markers(out)
        left_after = 1 if run else 6  # leave shards for the next run and for the final rerun
        moment = rng.choice(["before-marker", "after-marker"])
        kth = rng.randint(2 if moment == "before-marker" else 1, 15 - before - left_after)
        proc, _ = start_paused(str(src), str(out), f"{moment}:{kth}", tmp_path / f"paused-{run}.json",
                               extra=["--batch-size", "2", "--actors", "1"])
        try:
            time.sleep(rng.uniform(0.0, 1.0))  # the workers go on meanwhile: spill parts of shards in flight
        finally:
            kill(proc)
        history.append((before, _markers(out)))
        # exactly the commits this run made before the kill, none lost and none half-counted
        assert history[-1][1] == before + kth - (moment == "before-marker"), (moment, kth, history)
    print("committed shards before/after each killed run:", history)
    committed = history[-1][1]
    summary = label(str(src), str(out), rows_per_file=2, batch_size=2, model="tiny-random", image_size=64,
                    num_points=4)
    assert summary["complete"] and summary["shards"]["skipped_already_done"] == committed
    assert summary["this_run"]["images"] == 30 - 2 * committed  # redone: exactly the uncommitted shards
    got = _ids(out)
    assert len(got) == len(set(got)) and sorted(got) == ids
