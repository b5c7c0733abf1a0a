"""Real runs frozen at a named moment of a commit, and what every reader sees of their output:
the helpers of tests/test_output_visibility.py, tests/test_parts.py and tests/test_pipeline_resume.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import yaml

from pipeline.data.label_files import committed_label_files, iter_label_batches
from pipeline.job.dataset_card import CARD

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--model", "tiny-random", "--image-size", "64", "--num-points", "4", "--rows-per-file", "2",
        "--batch-size", "4"]


def start_paused(src: str, out: str, moment: str, pause: Path, extra: list[str] = (),
                  options: dict | None = None) -> tuple[subprocess.Popen, dict]:
    """A real ``diffseg label`` that freezes its driver at ``moment`` (DIFFSEG_TEST_PAUSE_AT)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "DIFFSEG_TEST_PAUSE_AT": moment,
           "DIFFSEG_TEST_PAUSE_FILE": str(pause)}
    command = [sys.executable, "-m", "pipeline", "label", src, out, *ARGS, *extra]
    if options:  # moto's credentials through the environment, as on a real node
        env.update(AWS_ACCESS_KEY_ID=options["key"], AWS_SECRET_ACCESS_KEY=options["secret"])
        command += ["--storage-options", json.dumps({"client_kwargs": options["client_kwargs"]})]
    log = open(pause.with_suffix(".log"), "w")
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not pause.exists():
        time.sleep(0.05)
    if not pause.exists():
        kill(proc)
        raise AssertionError(f"the run never reached {moment}: {pause.with_suffix('.log').read_text()[-2000:]}")
    time.sleep(0.2)  # the pause file is written just before the driver sleeps
    return proc, json.loads(pause.read_text())


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGSTOP)  # frozen first, as a node that stops answering
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def views(uri: str, fs, root: str, cache: Path, options: dict | None = None) -> dict[str, list[str]]:
    """The image ids each reader returns for the output at ``uri``."""
    from datasets import load_dataset

    fs.invalidate_cache()
    if options:  # datasets finds no card in an s3:// folder: the card's own glob, as a user gives it
        card = yaml.safe_load(fs.cat_file(f"{root}/{CARD}"))
        glob = card["configs"][0]["data_files"][0]["path"]
        import datasets.config
        from unittest.mock import patch

        with patch.object(datasets.config, "HF_HUB_OFFLINE", False):  # it refuses s3:// offline; moto is local
            ds = load_dataset("parquet", data_files={"train": f"{uri}/{glob}"}, cache_dir=str(cache),
                              storage_options=json.loads(json.dumps(options)))  # it adds keys to it
    else:
        ds = load_dataset(uri, cache_dir=str(cache))
    files = committed_label_files(uri, options)
    return {
        "pandas": pd.read_parquet(uri, columns=["image_id"], storage_options=options)["image_id"].tolist(),
        "pyarrow": pads.dataset(root, format="parquet", filesystem=fs).to_table(columns=["image_id"])
        .column(0).to_pylist(),
        "datasets": ds["train"]["image_id"],
        "ours": [r["image_id"] for b in iter_label_batches(files, ["image_id"], options) for r in b],
    }


def assert_views(views: dict[str, list[str]], ours: list[str], plain: list[str]) -> None:
    for reader, ids in views.items():
        assert len(ids) == len(set(ids)), f"{reader} sees duplicates"
        assert sorted(ids) == sorted(ours if reader == "ours" else plain), reader
