"""What any reader sees of an output is committed: real runs frozen at the dangerous moments of a
commit (a shard staged before its marker; after its marker, before the move; a new generation's
marker before the old generation's files are gone), on local disk and moto S3, read with pandas,
pyarrow.dataset, ``datasets.load_dataset`` and our reader; then a clean stop or a SIGKILL, and a
rerun that gives every image exactly once. Plus the states such kills leave, planted by hand."""
from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import label
from pipeline.data.label_files import NoLabelsError, committed_label_files, iter_label_batches
from pipeline.data.resume import clean_uncommitted, iter_plan, read_markers
from pipeline.data.schema import OUTPUT_SCHEMA, STAGED_DIR, TMP_DIR, part_name, staged_path
from pipeline.job import lease
from output_views import assert_views as _assert_views
from output_views import kill as _kill
from output_views import start_paused as _start_paused
from output_views import views as _views
from pipeline_helpers import FAST, make_photo_folder
from s3_server import moto_s3

OPTS = {**FAST, "rows_per_file": 2}


def _committed_ids(fs, root: str) -> dict[int, list[str]]:
    """{shard: its image ids} of the shards with a marker (ids from the plan: paths under .../in/)."""
    markers, _ = read_markers(fs, root)
    return {s.shard_id: sorted(p.split("/in/", 1)[1] for p in s.paths)
            for s in iter_plan(fs, root) if s.shard_id in markers}


@pytest.mark.slow
def test_frozen_after_a_marker_before_its_move_local(ray_session, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    ids = make_photo_folder(src, copies=2)  # 6 images, 3 shards of 2
    proc, paused = _start_paused(str(src), str(out), "after-marker:2", tmp_path / "pause")
    try:
        fs = fsspec.filesystem("file")
        committed = _committed_ids(fs, str(out))
        frozen = paused["shard_id"]
        assert frozen in committed and len(committed) == 2  # one shard moved in, one committed but staged
        assert list((out / STAGED_DIR / f"{frozen:06d}").iterdir())
        views = _views(str(out), fs, str(out), tmp_path / "hf1")
        every = [i for s in committed.values() for i in s]
        _assert_views(views, ours=every, plain=[i for sid, s in committed.items() if sid != frozen for i in s])
    finally:
        _kill(proc)
    summary = label(str(src), str(out), **OPTS)  # rolls the move forward, redoes the rest
    assert summary["complete"] and summary["shards"]["skipped_already_done"] == 2
    assert not (out / STAGED_DIR).exists() and not (out / TMP_DIR).exists()
    views = _views(str(out), fs, str(out), tmp_path / "hf2")
    _assert_views(views, ours=ids, plain=ids)


@pytest.mark.slow
def test_frozen_before_a_marker_on_s3_then_ctrl_c(ray_session, tmp_path):
    from pipeline_helpers import encoded, photos

    with moto_s3("vis") as (fs, options):
        ids = []
        for name, arr in photos().items():
            for k in range(2):
                fs.pipe(f"vis/in/{name}-{k}.png", encoded(arr[::8, ::8], "PNG"))
                ids.append(f"{name}-{k}.png")
        fs.invalidate_cache()
        proc, paused = _start_paused("s3://vis/in", "s3://vis/out", "before-marker:2", tmp_path / "pause",
                                     options=options)
        try:
            committed = _committed_ids(fs, "vis/out")
            assert len(committed) == 1 and paused["shard_id"] not in committed
            assert fs.find(f"vis/out/{STAGED_DIR}/{paused['shard_id']:06d}")  # staged, not committed
            every = [i for s in committed.values() for i in s]
            _assert_views(_views("s3://vis/out", fs, "vis/out", tmp_path / "hf1", options), ours=every, plain=every)
            proc.send_signal(signal.SIGINT)  # a clean stop: what it did not commit goes
            assert proc.wait(timeout=120) == 130, (tmp_path / "pause.log").read_text()[-2000:]
        finally:
            _kill(proc)
        fs.invalidate_cache()
        assert not fs.find(f"vis/out/{STAGED_DIR}") and not fs.find(f"vis/out/{TMP_DIR}")
        committed = _committed_ids(fs, "vis/out")
        every = [i for s in committed.values() for i in s]
        _assert_views(_views("s3://vis/out", fs, "vis/out", tmp_path / "hf2", options), ours=every, plain=every)
        summary = label("s3://vis/in", "s3://vis/out", storage_options=options, **OPTS)
        assert summary["complete"] and summary["shards"]["skipped_already_done"] == len(committed)
        _assert_views(_views("s3://vis/out", fs, "vis/out", tmp_path / "hf3", options), ours=ids, plain=ids)


@pytest.mark.slow
def test_frozen_in_a_new_generation_shows_one_generation(ray_session, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    ids = make_photo_folder(src) + ["zz-broken.png"]  # 4 images, 2 shards: the broken one in the last
    (src / "zz-broken.png").write_bytes(b"not an image")
    ids = sorted(ids)
    first = label(str(src), str(out), **OPTS)
    assert first["errors_by_kind"] == {"not an image": 1}
    markers, _ = read_markers(fsspec.filesystem("file"), str(out))
    shard = next(sid for sid, m in markers.items() if m["errors"])
    old_files = markers[shard]["files"]
    proc, paused = _start_paused(str(src), str(out), "after-marker", tmp_path / "pause",
                                 extra=["--retry-errors", "not an image"])
    try:
        assert paused["shard_id"] == shard
        fs = fsspec.filesystem("file")
        new = read_markers(fs, str(out))[0][shard]
        assert new["generation"] == 1 and set(new["files"]).isdisjoint(old_files)
        assert all((out / f).exists() for f in old_files)  # g is at the root still, g+1 staged
        _assert_views(_views(str(out), fs, str(out), tmp_path / "hf1"), ours=ids, plain=ids)
        assert all("-g1" in f for f in committed_label_files(str(out)) if f"-{shard:06d}-" in f)
    finally:
        _kill(proc)
    summary = label(str(src), str(out), **OPTS)
    assert summary["complete"] and summary["images"] == 4
    assert not any((out / f).exists() for f in old_files) and not (out / STAGED_DIR).exists()
    _assert_views(_views(str(out), fs, str(out), tmp_path / "hf2"), ours=ids, plain=ids)


# ---------------------------------------------------------------- planted states (no Ray)
def _rows(ids: list[str], error: str | None = None) -> pa.Table:
    return pa.Table.from_pylist([{"image_id": i, "source": f"/in/{i}", "width": 1, "height": 1, "label_map": None,
                                  "num_segments": 0, "segments": [], "error": error} for i in ids],
                                schema=OUTPUT_SCHEMA)


def _plant(out: Path, rel: str, table: pa.Table) -> None:
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / rel)


def _marker(out: Path, shard: int, files: list[str], generation: int = 0) -> None:
    (out / "_done").mkdir(exist_ok=True)
    (out / "_done" / f"{shard:06d}.json").write_text(json.dumps(
        {"shard_id": shard, "rows": 2, "errors": {}, "files": files, "generation": generation}))


def test_kill_between_a_new_marker_and_the_old_files_removal(tmp_path):
    """Generation 1 committed (its marker), generation 0 still at the root, generation 1 staged."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "_manifest.json").write_text("{}")
    g0, g1 = part_name(0, 0), part_name(0, 0, generation=1)
    _plant(out, g0, _rows(["a", "b"], error="read error: x"))
    _plant(out, staged_path(0, g1), _rows(["a", "b"]))
    _marker(out, 0, [g1], generation=1)
    _plant(out, staged_path(1, part_name(1, 0)), _rows(["c"]))  # staged, never committed
    (out / "_done" / ".000001.json.ab12cd34.tmp").write_text('{"shard_')  # a torn marker write
    files = committed_label_files(str(out))  # before the rerun: only generation 1, from its staged copy
    assert [f.rsplit("/", 1)[-1] for f in files] == [g1]
    assert sorted(r["image_id"] for b in iter_label_batches(files, ["image_id", "error"]) for r in b
                  if r["error"] is None) == ["a", "b"]
    fs = fsspec.filesystem("file")
    markers, torn = read_markers(fs, str(out))
    clean_uncommitted(fs, str(out), markers, torn)  # what the rerun does first
    assert sorted(p.name for p in out.iterdir()) == ["_done", "_manifest.json", g1]
    assert [p.name for p in (out / "_done").iterdir()] == ["000000.json"]
    assert pads.dataset(str(out), format="parquet").to_table().column("image_id").to_pylist() == ["a", "b"]


def test_our_reader_reads_nothing_before_the_first_marker(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_manifest.json").write_text("{}")  # an output of diffseg label, killed before any commit
    _plant(out, part_name(0, 0), _rows(["a"]))  # left at the root (e.g. by an older version)
    with pytest.raises(NoLabelsError):
        committed_label_files(str(out))
    plain = tmp_path / "plain"  # a folder of Parquet files that is no output of ours is read as it is
    _plant(plain, part_name(0, 0), _rows(["a"]))
    assert len(committed_label_files(str(plain))) == 1


def test_a_heartbeat_far_in_the_future_is_bounded(tmp_path):
    fs = fsspec.filesystem("file")
    path = tmp_path / "_lease.json"
    body = {"run_id": "f" * 32, "host": "elsewhere", "pid": 1, "started_at": 0}
    path.write_text(json.dumps({**body, "heartbeat_at": time.time() + 30}))  # small skew: may be alive
    with pytest.raises(lease.LeaseHeldError, match="s in the future by this host's clock"):
        lease.acquire(fs, str(tmp_path), "out", stale_after_s=60)
    path.write_text(json.dumps({**body, "heartbeat_at": time.time() + 3600}))  # past the bound: dead
    held = lease.acquire(fs, str(tmp_path), "out", stale_after_s=60)
    assert json.loads(path.read_text())["host"] == socket.gethostname()
    held.release()


def test_a_stop_after_every_shard_is_committed_says_complete():
    from pipeline.cli import interrupted_sentence
    from pipeline.job.interrupt import RunInterrupted

    exc = RunInterrupted(signal.SIGTERM)
    exc.committed, exc.total = 3, 3
    text = interrupted_sentence(exc, ["diffseg", "label", "in", "out"])
    assert "output is complete" in text and "resume" not in text
    exc.committed = 2
    assert "resume with the same command" in interrupted_sentence(exc, ["diffseg"])
