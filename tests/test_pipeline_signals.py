"""Ctrl-C and SIGTERM to a real `diffseg label`: a clean stop, an "interrupted" manifest, one sentence, 130 / 143."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import label
from pipeline.data.schema import TMP_DIR
from pipeline_helpers import make_photo_folder, read_output

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--model", "tiny-random", "--image-size", "64", "--num-points", "4", "--rows-per-file", "1",
        "--batch-size", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, when", [(signal.SIGINT, 130, "a shard is committed"),
                                                (signal.SIGTERM, 143, "the run has started")])
def test_a_signal_stops_the_run_cleanly_and_the_rerun_finishes_it(ray_session, tmp_path, signum, code, when):
    src, out = tmp_path / "in", tmp_path / "out"
    ids = make_photo_folder(src, copies=6)  # 18 images, one shard each
    command = [sys.executable, "-m", "pipeline", "label", str(src), str(out), *ARGS]
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if when == "the run has started" and (out / TMP_DIR).exists() and any((out / TMP_DIR).rglob("*.arrow")):
                break  # a writer has spilled rows: the plan is known, the pipeline runs
            if (out / "_done").exists() and any((out / "_done").glob("*.json")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signum)  # to the driver alone, as `kill` or Kubernetes send it
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr and stdout == ""
    assert "(raylet)" not in stderr and " pid=" not in stderr, stderr[-2000:]  # nothing of Ray's teardown
    last = stderr.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert last.startswith(f"diffseg label: stopped by {name}; ") and " of 18 shards are committed and kept; " in last
    assert last.endswith(f"resume with the same command: diffseg label {src} {out} {' '.join(ARGS)}")
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["runs"][-1]["status"] == "interrupted"
    committed = len(list((out / "_done").glob("*.json")))
    assert f" {committed} of 18 shards" in last
    if signum == signal.SIGINT:  # the rerun (the sentence's command) finishes the job, every image once
        resumed = label(str(src), str(out), model="tiny-random", image_size=64, num_points=4, rows_per_file=1,
                        batch_size=1)
        assert resumed["complete"] and resumed["shards"]["skipped_already_done"] == committed
        got = read_output(str(out)).column("image_id").to_pylist()
        assert sorted(got) == ids and len(got) == len(set(got))
        assert json.loads((out / "_manifest.json").read_text())["status"] == "complete"
