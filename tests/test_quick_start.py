"""Every command of the README's quick start, run as written (offline, on this machine's Ray).

Each command gets a case by what it is; a new kind of command in the quick start fails
``test_every_quick_start_command_is_run`` until it gets one. The runs start from a stale
``ray_current_cluster`` file (what a crashed ``ray start`` leaves) and with RAY_ADDRESS set to a
job server, as a user who followed the cluster section would have it: the local Ray must
still be what they get.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from test_docs import quick_start_commands, split_commands

REPO = Path(__file__).resolve().parents[1]
OUT_PREFIX = "~/diffseg-out"


def _kind(argv: list[str]) -> str:
    if argv[:2] == ["pip", "install"]:
        return "install"  # what made this environment; CI runs the same line (test_docs checks .ci/run)
    if argv[:1] == ["export"]:
        return "export"
    if argv[:1] == ["pytest"]:
        return "tests"  # this run
    if argv[:2] == ["diffseg", "label"]:
        return "label-demo" if "--model" in argv and argv[argv.index("--model") + 1] == "tiny-demo" else "label-hub"
    return "unknown"


COMMANDS = [argv for line in quick_start_commands() for argv in split_commands(line)]


def test_every_quick_start_command_is_run():
    unknown = [argv for argv in COMMANDS if _kind(argv) == "unknown"]
    assert not unknown, f"quick start commands with no test case here: {unknown}"
    assert {_kind(argv) for argv in COMMANDS} == {"install", "export", "tests", "label-demo", "label-hub"}


def _run(argv: list[str], tmp_path: Path, ray_dir: str, timeout: int) -> subprocess.CompletedProcess:
    args = [a.replace(OUT_PREFIX, str(tmp_path)) for a in argv[1:]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for a in (c for c in COMMANDS if _kind(c) == "export"):
        key, _, value = a[1].partition("=")
        env[key] = value
    env.update(PYTHONPATH=str(REPO), RAY_TMPDIR=ray_dir, RAY_ADDRESS="http://127.0.0.1:8265")
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _commands(kind: str) -> list[list[str]]:
    found = [argv for argv in COMMANDS if _kind(argv) == kind]
    assert found, kind
    return found


@pytest.mark.parametrize("argv", _commands("label-hub"), ids=" ".join)
def test_the_default_model_offline_is_one_sentence(argv, tmp_path, stale_ray_dir):
    ray_dir, _ = stale_ray_dir
    done = _run(argv, tmp_path, ray_dir, timeout=120)  # a bound on a hang, not a timing claim
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("diffseg label: error: "), done.stderr[-3000:]
    assert "CompVis/stable-diffusion-v1-4" in lines[0] and "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("argv", _commands("label-demo"), ids=" ".join)
def test_the_demo_model_labels_the_photos_with_a_local_ray(argv, tmp_path, stale_ray_dir):
    ray_dir, _ = stale_ray_dir
    done = _run(argv, tmp_path, ray_dir, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Connecting to existing Ray cluster" not in done.stderr
    assert "ERROR" not in done.stderr and "Traceback" not in done.stderr
    assert "is a job-server address (for `diffseg submit`)" in done.stderr
    out = Path(argv[3].replace(OUT_PREFIX, str(tmp_path)))
    photos = sorted((REPO / argv[2]).glob("*.jpg"))
    table = pq.read_table(sorted(out.glob("*.parquet")), columns=["image_id", "error"])
    assert sorted(table.column("image_id").to_pylist()) == sorted(p.name for p in photos)
    assert table.column("error").null_count == len(photos)
