"""The `diffseg label` command: happy path, and systemic failures that stop early with one sentence."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_helpers import make_photo_folder, read_output

from pipeline.cli import format_summary, main

REPO = Path(__file__).resolve().parents[1]

FAST_ARGS = ["--model", "tiny-random", "--image-size", "64", "--num-points", "4"]


def test_cli_labels_a_folder_and_prints_the_summary(ray_session, tmp_path, capsys):
    ids = make_photo_folder(tmp_path / "in")
    code = main(["label", str(tmp_path / "in"), str(tmp_path / "out"), *FAST_ARGS, "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labelled"] == 3 and summary["errors"] == 0 and summary["images_per_s"] > 0
    assert {"checks", "ray start", "list+plan", "pipeline", "model (worker s)", "encode (worker s)"} <= set(
        summary["stage_seconds"])
    assert sorted(read_output(str(tmp_path / "out")).column("image_id").to_pylist()) == ids


def test_no_input_matched_exits_non_zero_with_one_sentence(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert main(["label", str(tmp_path / "in"), str(tmp_path / "out"), *FAST_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffseg label: error: No input matched") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_unwritable_output_exits_before_any_model_work(tmp_path, capsys):
    make_photo_folder(tmp_path / "in")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert main(["label", str(tmp_path / "in"), str(blocker / "out"), *FAST_ARGS]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_model_that_cannot_load_exits_non_zero(ray_session, tmp_path, capsys):
    make_photo_folder(tmp_path / "in")
    code = main(["label", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tmp_path / "no-such-model")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffseg label: error: Cannot load model") and "\n" not in err
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_overwrite_with_a_model_that_cannot_load_keeps_the_earlier_labels(ray_session, tmp_path, capsys):
    make_photo_folder(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "_manifest.json").write_text("{}")
    (out / "labels-000000-000.parquet").write_bytes(b"earlier labels")
    code = main(["label", str(tmp_path / "in"), str(out), "--model", str(tmp_path / "missing"), "--overwrite"])
    assert code == 2 and "Cannot load model" in capsys.readouterr().err
    assert (out / "labels-000000-000.parquet").read_bytes() == b"earlier labels"


def test_anchor_grid_larger_than_the_attention_stops_before_labelling(ray_session, tmp_path, capsys):
    # tiny-random at 64 px gives 8 x 8 attention: the default 16 x 16 anchor grid cannot run.
    make_photo_folder(tmp_path / "in")
    code = main(["label", str(tmp_path / "in"), str(tmp_path / "out"), "--model", "tiny-random", "--image-size", "64"])
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("diffseg label: error: DiffSeg cannot run on this model: num_points=16 needs")
    assert "at least 16 x 16" in last and "gives 8 x 8" in last
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_diffseg_parameters_no_run_can_use_stop_before_the_model_loads(tmp_path, capsys):
    make_photo_folder(tmp_path / "in")
    code = main(["label", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tmp_path / "no-model"),
                 "--num-points", "1"])
    assert code == 2  # refused for num_points, not for the (missing) model: checked first
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "diffseg label: error: DiffSeg parameters: num_points must be an integer >= 2, got 1."


@pytest.mark.slow
def test_a_successful_run_prints_no_error_line_and_each_warning_once(tmp_path):
    """A real `diffseg label` process (its own local Ray), stdout and stderr as a user sees them."""
    make_photo_folder(tmp_path / "in")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "label", str(tmp_path / "in"), str(tmp_path / "out"), *FAST_ARGS],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    err = done.stderr
    assert not [line for line in err.splitlines() if re.search(r"\bERROR\b|^\[[^\]]* E \d+ \d+\]", line)]
    assert "has constructor arguments in the object store" not in err  # Ray's false alarm, filtered
    assert "Token authentication is enabled" not in err
    assert "used up to" not in err  # Ray Data's memory warning for read_decode
    assert "Loading weights" not in err and "Traceback" not in err
    assert err.count("RANDOM weights") == 1  # said once, by the driver; the model actors stay quiet
    assert "diffseg: labelling on CPU: the Ray cluster has no GPU" in err
    out = done.stdout
    assert out.startswith(f"labelled 3 of 3 images into {tmp_path / 'out'} (no errors)\n")
    assert "RANDOM weights: these labels only show the plumbing" in out
    assert "; 1 shard written" in out and "1 shards" not in out
    assert not re.search(r"(?<![\d.])0\.0\b", out.split("seconds:")[0])  # no "0.0 images/s" (but "10.0 s" is fine)


def test_after_a_stop_rays_stdout_chatter_is_dropped_and_stdout_comes_back():
    """Ray prints its raylet's and workers' stdout lines on sys.stdout ("(raylet) Task ... killed by
    ray.kill" while it tears down after Ctrl-C): after silence_ray() they go where the filter drops them."""
    code = r"""
import sys, time
from pipeline.job.stderr_filter import filtered_stderr, silence_ray
with filtered_stderr():
    print("before the stop")
    silence_ray()
    print("\x1b[33m(raylet)\x1b[0m Task MapWorker(MapBatches(LabelActor)).submit failed. The actor is dead")
    print("a line of ours", file=sys.stderr)
    time.sleep(0.3)
print("after the block")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "before the stop\nafter the block\n"
    assert "(raylet)" not in done.stderr and "a line of ours" in done.stderr


@pytest.mark.parametrize("terminal", [False, True])
def test_the_stderr_filter_drops_only_the_known_false_alarm(terminal):
    code = r"""
import os, sys, time
from pipeline.job.stderr_filter import filtered_stderr
with filtered_stderr():
    os.write(2, b"[2026-01-01 00:00:00,000 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker(X)' "
                b"and ID: 'ab' has constructor arguments in the object store and max_restarts > 0. See ...\n")
    os.write(2, b"a real error line\n")
    os.write(2, b"progress 50%\r")
    time.sleep(0.3)
    print("from python", file=sys.stderr)
print("after", file=sys.stderr)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if terminal:
        import pty

        reader, writer = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-c", code], stderr=writer, env=env)
        os.close(writer)
        proc.wait(timeout=60)
        chunks = []
        while True:
            try:
                chunk = os.read(reader, 4096)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(reader)
        err = b"".join(chunks).decode().replace("\r\n", "\n")
    else:
        err = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=60).stderr.decode()
    assert "constructor arguments" not in err
    assert "a real error line\n" in err and "progress 50%\r" in err
    assert err.index("from python") < err.index("after")


def test_the_summary_reads_as_sentences_and_leaves_out_what_was_not_measured():
    summary = {
        "output": "labels", "model": "m", "random_weights": False, "images": 1, "labelled": 1, "errors": 0,
        "errors_by_kind": {}, "complete": True, "images_per_s": None, "steady_images_per_s": None,
        "shards": {"total": 1, "done": 1, "skipped_already_done": 0, "written_this_run": 1, "new_in_plan": 1},
        "this_run": {"images": 1, "labelled": 1, "errors_by_kind": {}, "duplicates_dropped": 0},
        "stage_seconds": {"checks": 0.31, "ray start": 4.2, "list+plan": 0.01, "pipeline": 6.0,
                          "model (worker s)": 2.5},
    }
    text = format_summary(summary)
    assert text.splitlines()[:2] == ["labelled 1 of 1 image into labels (no errors)",
                                     "this run: 1 image in 6.0 s; 1 shard written"]
    assert "images/s" not in text and "0.0 " not in text and "None" not in text
    assert text.splitlines()[-1] == "seconds: checks 0.3, ray start 4.2, list+plan 0.0, pipeline 6.0; in workers: model 2.50"
    summary.update(images=7, labelled=5, errors=2, errors_by_kind={"not an image": 2}, images_per_s=0.5,
                   steady_images_per_s=0.9, complete=False)
    summary["this_run"]["images"] = 7
    summary["shards"].update(written_this_run=2, skipped_already_done=3)
    text = format_summary(summary)
    assert text.splitlines()[0] == "labelled 5 of 7 images into labels (2 errors) - INCOMPLETE, rerun the same command to finish"
    assert text.splitlines()[1] == "this run: 7 images in 6.0 s, 0.5 images/s (0.9 once running); 2 shards written, 3 already done"
