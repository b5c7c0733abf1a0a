"""What a labelling command shows on stderr: our progress (a bar on a terminal, a line every N s off
one), Ray's own progress and INFO lines only with --verbose, and a short log for a small run."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.console import EVERY_ENV, plain_every_s
from pipeline.job.progress import ProgressReporter

REPO = Path(__file__).resolve().parents[1]
RAY_PROGRESS = re.compile(r"Running Dataset|Total Progress|logging_progress|Execution plan of Dataset|"
                          r"Started a local Ray instance|execution finished")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _reporter(counts: list, stream: io.StringIO, clock: _Clock, **kwargs) -> ProgressReporter:
    return ProgressReporter(lambda: counts[0], stream=stream, every_s=3600, clock=clock, **kwargs)


def test_on_a_terminal_one_bar_is_redrawn_in_place_with_done_total_rate_and_eta():
    counts, stream, clock = [(0, None, False)], _Terminal(), _Clock()
    with _reporter(counts, stream, clock) as reporter:
        reporter.refresh()
        clock.now += 10
        counts[0] = (2, 8, False)  # the first rows: the total an estimate
        reporter.refresh()
        clock.now += 4
        counts[0] = (4, 8, True)
        reporter.refresh()
        drawn = stream.getvalue()
        assert "\n" not in drawn  # every redraw returns to the line's start, none adds a line
        frames = drawn.split("\r")[1:]
        assert len(frames) == 3
        assert frames[0].startswith("diffseg: 0/? images |") and "ETA ?" in frames[0]
        assert frames[1].startswith("diffseg: 2/~8 images |")
        assert frames[2].startswith("diffseg: 4/8 images |")
        assert " 0.5 images/s, ETA 00:08" in frames[2]  # (4 - 2) rows in 4 s since the first rows; 4 left
        assert len(frames[2]) >= len(frames[1])  # a shorter redraw is padded over the longer one
        reporter.refresh()  # nothing changed: nothing drawn
        assert stream.getvalue() == drawn
        reporter.finished()
    assert stream.getvalue().endswith("\n")  # the bar stays, what follows starts on a line of its own
    assert stream.getvalue().count("\n") == 1


def test_off_a_terminal_a_plain_line_comes_every_interval():
    counts, stream, clock = [(0, None, False)], io.StringIO(), _Clock()
    reporter = _reporter(counts, stream, clock)
    reporter.__enter__()
    reporter.refresh()
    clock.now += 30
    counts[0] = (120, 4000, False)
    reporter.refresh()
    clock.now += 60
    counts[0] = (240, 4000, True)
    reporter.refresh()
    reporter.__exit__(None, None, None)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "diffseg: progress at 00:00: 0 images so far (the total is known once a shard reports)",
        "diffseg: progress at 00:30: 120 of ~4000 images (3%), 4 images/s, ETA 16:10",
        "diffseg: progress at 01:30: 240 of 4000 images (6%), 2 images/s, ETA 31:20",
    ]
    assert "\r" not in stream.getvalue()


def test_the_plain_lines_come_by_themselves_while_the_driver_waits():
    """The thread writes them: a driver loop blocked on a slow batch still logs its progress."""
    stream = io.StringIO()
    with ProgressReporter(lambda: (3, 9, True), stream=stream, every_s=0.05):
        deadline = time.monotonic() + 60
        while stream.getvalue().count("\n") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert stream.getvalue().count("3 of 9 images (33%)") >= 2


def test_the_interval_comes_from_the_environment_or_is_30_s():
    assert plain_every_s({}) == 30.0
    assert plain_every_s({EVERY_ENV: "2.5"}) == 2.5
    for bad in ("0", "-1", "abc", "inf"):
        with pytest.raises(ValueError, match=f"{EVERY_ENV} must be a number of seconds > 0"):
            plain_every_s({EVERY_ENV: bad})


def _label(tmp_path: Path, *extra: str, every_s: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop(EVERY_ENV, None)
    if every_s is not None:
        env[EVERY_ENV] = every_s
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "label", str(REPO / "examples" / "images"), str(tmp_path / "out"),
         "--model", "tiny-demo", *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow
def test_a_four_image_run_prints_a_short_log_and_our_summary(tmp_path):
    """A real `diffseg label` process off a terminal, at the default 30 s interval (tiny-demo model)."""
    done = _label(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert len(lines) <= 15, done.stderr
    assert not RAY_PROGRESS.search(done.stderr), done.stderr
    assert not [line for line in lines if re.search(r"\bERROR\b", line)]
    assert "diffseg: labelling on CPU" in done.stderr
    assert done.stdout.startswith(f"labelled 4 of 4 images into {tmp_path / 'out'} (no errors)\n")


@pytest.mark.slow
def test_with_verbose_rays_progress_shows_and_our_lines_still_come(tmp_path):
    done = _label(tmp_path, "--verbose", every_s="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert RAY_PROGRESS.search(done.stderr), done.stderr
    assert re.search(r"^diffseg: progress at \d\d:\d\d: ", done.stderr, re.M), done.stderr
    assert done.stdout.startswith("labelled 4 of 4 images")


@pytest.mark.slow
def test_a_job_logs_a_progress_line_every_interval_and_no_ray_progress(tmp_path):
    """What `diffseg submit --wait` streams: the job entrypoint's output (no terminal)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"name": "progress", "input": str(REPO / "examples" / "images"),
                                "output": str(tmp_path / "out"), "model": {"name": "tiny-demo"}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), EVERY_ENV: "1"}
    done = subprocess.run([sys.executable, "-m", "jobs.run", str(spec)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^diffseg: progress at \d\d:\d\d: ", done.stderr, re.M), done.stderr
    assert not RAY_PROGRESS.search(done.stderr + done.stdout), done.stderr
    assert "labelled 4 of 4 images" in done.stdout


def _record(shard_id: int, shard_rows: int, ids: list[str]) -> dict:
    import hashlib

    import numpy as np

    from pipeline.data.schema import TIMING_COLUMNS

    hashes = np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids],
                      dtype="<u8")
    return {"shard_id": shard_id, "shard_rows": shard_rows, "file": f"_inprogress/{shard_id}/{ids[0]}.arrow",
            "rows": len(ids), "row_hashes": hashes.tobytes(), "errors": "{}", "bytes": 0, "failure": None,
            "fatal": False, "node_id": None, "provenance": None, **{c: 0.0 for c in TIMING_COLUMNS}, "_t_write": 0.0}


def test_the_committer_counts_rows_in_and_estimates_the_total_until_every_shard_is_sized(tmp_path):
    import fsspec
    import pyarrow as pa

    from pipeline.job.commit import Committer
    from pipeline.job.sink import RECORD_SCHEMA, OutputLocation

    committer = Committer(fsspec.filesystem("file"), str(tmp_path), OutputLocation(str(tmp_path)), 10, {})
    for shard_id in range(4):
        committer.expect(shard_id)
    assert committer.expected_rows() == (None, False) and committer.rows_in == 0
    committer.add(pa.Table.from_pylist([_record(0, 10, ["a", "b"])], schema=RECORD_SCHEMA))
    assert committer.rows_in == 2 and committer.expected_rows() == (40, False)  # 3 more shards of 10, as far as known
    committer.add(pa.Table.from_pylist([_record(1, -1, ["c"]), _record(0, 10, ["a"])], schema=RECORD_SCHEMA))
    assert committer.rows_in == 3  # a row seen again (a retried task) is not counted twice
    assert committer.expected_rows() == (40, False)  # shard 1 (a tar, say) is not sized before its last chunk
    committer.add(pa.Table.from_pylist([_record(1, 4, ["d"]), _record(2, 6, ["e"]), _record(3, 3, ["f"])],
                                       schema=RECORD_SCHEMA))
    assert committer.rows_in == 6 and committer.expected_rows() == (23, True)
