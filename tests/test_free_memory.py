"""The driver hands freed memory back: a real glibc heap with holes shrinks, and the loop does it
at most once per interval."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.job.free_memory import MemoryReleaser, _malloc_trim, release_freed_memory

REPO = Path(__file__).resolve().parents[1]

HOLES = r"""
import ctypes, json, sys
from pipeline.job.free_memory import release_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
blocks = []
for i in range(200_000):  # 200 MB in 1 kB blocks (below mmap's threshold: inside the heap)
    p = libc.malloc(1000)
    ctypes.memset(p, 1, 1000)  # touched: resident
    blocks.append(p)
for i, p in enumerate(blocks):
    if i % 100:  # free 99 of 100: the heap keeps its size (the kept blocks pin it), its pages are free
        libc.free(p)
before = rss_mb()
ran = release_freed_memory()
print(json.dumps({"before": before, "after": rss_mb(), "ran": ran}))
"""


@pytest.mark.skipif(_malloc_trim() is None or not Path("/proc/self/statm").exists(),
                    reason="glibc's malloc_trim and /proc are Linux-only")
def test_release_returns_the_free_pages_of_a_heap_with_holes():
    import json

    env = dict(os.environ, PYTHONPATH=str(REPO), MALLOC_ARENA_MAX="1")
    done = subprocess.run([sys.executable, "-c", HOLES], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["ran"] is True
    # ~198 MB were freed but kept by the allocator; the trim gives most of it back
    assert got["before"] - got["after"] > 100, got


def test_release_runs_where_there_is_no_malloc_trim(monkeypatch):
    _malloc_trim.cache_clear()
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: object())  # a C library without malloc_trim
    try:
        assert release_freed_memory() is False  # Arrow's pool is still asked; nothing fails
    finally:
        _malloc_trim.cache_clear()


def test_the_releaser_runs_at_most_once_per_interval():
    now = [0.0]
    releaser = MemoryReleaser(every_s=10.0, clock=lambda: now[0])
    for t in (0.0, 3.0, 9.9):
        now[0] = t
        releaser.tick()
    assert releaser.releases == 0
    now[0] = 10.0
    releaser.tick()
    now[0] = 15.0
    releaser.tick()
    now[0] = 20.5
    releaser.tick()
    assert releaser.releases == 2


def test_a_label_run_releases_from_the_driver_loop(ray_session, tmp_path, monkeypatch):
    """What the driver did, counted by its loop: with no interval, once per batch of part records."""
    import pipeline.job.free_memory as free_memory
    from pipeline import label
    from pipeline_helpers import FAST, make_photo_folder

    monkeypatch.setattr(free_memory, "RELEASE_EVERY_S", 0.0)
    src = tmp_path / "in"
    make_photo_folder(src, copies=2)
    summary = label(str(src), str(tmp_path / "out"), rows_per_file=2, **FAST)
    assert summary["complete"] and summary["driver"]["memory_releases"] >= 1, summary["driver"]
