"""``--part i/N``: N jobs label one input into one output, each image exactly once.

Real runs: part 1 of 2 frozen with a shard staged before its marker (DIFFSEG_TEST_PAUSE_AT)
while part 2 runs to its end in the same output; what every reader sees then; part 1
killed and both parts rerun at once as two ``diffseg label`` processes; then a rerun of
each. Plus the split itself, the scoped cleanup on planted states, the refusals, the
merged manifest and the job specs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from output_views import ARGS, REPO, assert_views, kill, start_paused, views
from pipeline import LabelError, label
from pipeline.data.manifest import merge_part_manifests, write_merged_manifest, write_manifest
from pipeline.data.parts import Part, part_of_file
from pipeline.data.resume import clean_uncommitted, iter_plan, read_markers, shards_from_inputs, update_plan
from pipeline.data.schema import MANIFEST, OUTPUT_SCHEMA, STAGED_DIR, TMP_DIR, staged_path
from pipeline.job import lease
from pipeline_helpers import FAST, make_photo_folder

OPTS = {**FAST, "rows_per_file": 2}


# ---------------------------------------------------------------- the split (no Ray)


def test_part_parses_i_of_n_and_refuses_anything_else():
    assert Part.parse("2/4") == Part(2, 4) and Part.parse(" 1 / 3 ") == Part(1, 3)
    assert Part.parse(None) == Part.whole() and not Part.whole().partitioned
    assert Part(3, 4).tag == "part-0003-of-0004" and str(Part(3, 4)) == "3/4"
    for bad in ("0/4", "5/4", "1/0", "2", "a/b", "1/4/2", "-1/4", "1/10000"):
        with pytest.raises(ValueError, match="--part"):
            Part.parse(bad)


def test_every_input_belongs_to_exactly_one_part_and_shard_ids_never_meet():
    root = "s3://bucket/images"
    uris = [f"{root}/{d}/img-{k:05d}.jpg" for d in ("a", "b", "c") for k in range(3000)]
    for count in (2, 3, 7):
        parts = [Part(i, count) for i in range(1, count + 1)]
        owners = [[p for p in parts if p.owns_input(u, root)] for u in uris]
        assert all(len(o) == 1 for o in owners)
        sizes = [sum(1 for o in owners if o[0] == p) for p in parts]
        assert min(sizes) > 0.8 * len(uris) / count  # balanced, not by the listing's order
        ids = [
            {s.shard_id for s in shards_from_inputs((("image", u) for u, o in zip(uris, owners) if o[0] == p), 10,
                                                    p.first_shard_id(), count)}
            for p in parts
        ]
        assert sum(len(i) for i in ids) == len(set().union(*ids))
        assert all(p.owns_shard(sid) for p, i in zip(parts, ids) for sid in i)
    # the owner depends on the path under the input root only: the same folder under another name
    assert Part(1, 2).owns_input(f"{root}/a/img-00001.jpg", root) == Part(1, 2).owns_input(
        "/mnt/images/a/img-00001.jpg", "/mnt/images")


def test_a_parts_plan_grows_with_its_own_stride(tmp_path):
    fs = fsspec.filesystem("file")
    part = Part(2, 3)
    first = update_plan(fs, str(tmp_path), [("image", f"/in/{k}.jpg") for k in range(5)], 2, part)
    assert first.index.shard_ids.tolist() == [1, 4, 7]
    grown = update_plan(fs, str(tmp_path), [("image", f"/in/{k}.jpg") for k in range(9)], 2, part)
    assert grown.new == 2 and grown.index.shard_ids.tolist() == [1, 4, 7, 10, 13]
    assert (tmp_path / part.plan_name).exists() and not (tmp_path / "_plan.jsonl.gz").exists()
    assert [s.shard_id for s in iter_plan(fs, str(tmp_path), part.plan_name)] == [1, 4, 7, 10, 13]
    assert part_of_file(part.plan_name) == part and part_of_file("_plan.jsonl.gz") is None


# ---------------------------------------------------------------- planted states (no Ray)


def _rows(ids: list[str]) -> pa.Table:
    return pa.Table.from_pylist([{"image_id": i, "source": f"/in/{i}", "width": 1, "height": 1, "label_map": None,
                                  "num_segments": 0, "segments": [], "error": None} for i in ids],
                                schema=OUTPUT_SCHEMA)


def _plant_in_flight(out: Path, shard: int) -> list[Path]:
    """What a live run of the shard's part has on disk mid-commit: spill parts, staged files
    before the marker, a marker being written."""
    files = [out / TMP_DIR / f"{shard:06d}" / "part-0.parquet", out / staged_path(shard, f"labels-{shard:06d}-000.parquet"),
             out / "_done" / f".{shard:06d}.json.abcd1234.tmp"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".parquet":
            pq.write_table(_rows([f"img-{shard}.png"]), f)
        else:
            f.write_text("{")
    return files


def test_a_parts_cleanup_leaves_another_parts_files_alone(tmp_path):
    fs = fsspec.filesystem("file")
    out = tmp_path / "out"
    mine = Part(1, 2)  # part 2 of 2 writes shards 1, 3, 5, ... meanwhile
    theirs_live = _plant_in_flight(out, 3) + [out / "labels-000005-000.parquet"]  # 5: written, marker coming
    pq.write_table(_rows(["x"]), theirs_live[-1])
    mine_left = _plant_in_flight(out, 2) + [out / "labels-000004-000.parquet"]  # a kill's leftovers
    pq.write_table(_rows(["y"]), mine_left[-1])
    markers, torn = read_markers(fs, str(out))
    removed = clean_uncommitted(fs, str(out), markers, torn, part=mine)
    assert all(f.exists() for f in theirs_live), removed
    assert not any(f.exists() for f in mine_left)
    assert sorted(Path(r).name for r in removed) == sorted(f.name for f in mine_left)
    assert (out / STAGED_DIR / "000003").exists() and not (out / STAGED_DIR / "000002").exists()
    # a whole run (one writer) still clears everything
    clean_uncommitted(fs, str(out), markers, torn)
    assert not (out / STAGED_DIR).exists() and not (out / TMP_DIR).exists()


def test_each_part_has_its_own_lease(tmp_path):
    fs = fsspec.filesystem("file")
    one = lease.acquire(fs, str(tmp_path), "part 1/2 of out", name=Part(1, 2).lease_name)
    try:
        two = lease.acquire(fs, str(tmp_path), "part 2/2 of out", name=Part(2, 2).lease_name)
        two.release()
        one_body = json.loads((tmp_path / Part(1, 2).lease_name).read_text())
        one_body.update(pid=os.getppid(), pid_start=lease._process_start(os.getppid()))  # another live run's
        (tmp_path / Part(1, 2).lease_name).write_text(json.dumps(one_body))
        with pytest.raises(lease.LeaseHeldError, match="part 1/2 of out is being written by another"):
            lease.acquire(fs, str(tmp_path), "part 1/2 of out", name=Part(1, 2).lease_name)
    finally:
        one.release()


def test_the_merged_manifest_is_complete_only_when_every_part_is(tmp_path):
    fs = fsspec.filesystem("file")
    base = {"input": "/in", "model": {"model": "m"}, "parameters": {"timestep": 300}, "version": "1"}
    shards = {"total": 3, "done": 3, "skipped_already_done": 0, "written_this_run": 3, "new_in_plan": 3}
    counts = {"images": 5, "labelled": 4, "errors": 1, "errors_by_kind": {"read error": 1}, "shards": shards}
    write_manifest(fs, str(tmp_path), {**base, "status": "complete", "counts": counts, "part": "1/3",
                                       "runs": [{"started_at": 2.0}]}, name=Part(1, 3).manifest_name)
    merged = write_merged_manifest(fs, str(tmp_path), 3)
    assert merged["status"] == "incomplete" and merged["parts"] == {"count": 3, "status": {"1/3": "complete"}}
    write_manifest(fs, str(tmp_path), {**base, "status": "running", "counts": {}, "runs": [{"started_at": 1.0}]},
                   name=Part(3, 3).manifest_name)
    write_manifest(fs, str(tmp_path), {**base, "status": "complete", "counts": counts, "runs": []},
                   name=Part(2, 3).manifest_name)
    merged = write_merged_manifest(fs, str(tmp_path), 3)
    assert merged["status"] == "running"
    assert json.loads((tmp_path / MANIFEST).read_text()) == json.loads(json.dumps(merged))
    assert merged["counts"]["images"] == 10 and merged["counts"]["errors_by_kind"] == {"read error": 2}
    assert merged["counts"]["shards"]["done"] == 6 and merged["parameters"] == base["parameters"]
    assert "part" not in merged  # each part's own manifest names its part; the merge names them all
    assert [r["part"] for r in merged["runs"]] == ["3/3", "1/3"]  # by start time
    done = merge_part_manifests({"1/2": {**base, "status": "complete"}, "2/2": {**base, "status": "complete"}}, 2)
    assert done["status"] == "complete"
    assert merge_part_manifests({"1/2": {**base, "status": "interrupted"}}, 2)["status"] == "interrupted"


# ---------------------------------------------------------------- refusals (before Ray)


def test_outputs_of_one_layout_refuse_runs_of_another(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    make_photo_folder(src)
    fs = fsspec.filesystem("file")
    out.mkdir()
    update_plan(fs, str(out), [("image", f"{src}/a.png")], 2)  # a whole run's plan
    with pytest.raises(LabelError, match="labelled by one job, not in parts; rerun it without --part"):
        label(str(src), str(out), part="1/2", **OPTS)
    other = tmp_path / "parts"
    other.mkdir()
    update_plan(fs, str(other), [("image", f"{src}/a.png")], 2, Part(2, 3))
    with pytest.raises(LabelError, match=r"labelled in 3 parts, not 2: run each part with --part i/3"):
        label(str(src), str(other), part="1/2", **OPTS)
    with pytest.raises(LabelError, match=r"labelled in 3 parts: run each part with --part i/3 .* or pass "
                                         r"--overwrite to start over as one job"):
        label(str(src), str(other), **OPTS)
    held = lease.acquire(fs, str(other), "x", name=Part(2, 3).lease_name)
    held.body.update(pid=os.getppid(), pid_start=lease._process_start(os.getppid()))  # alive, not this process
    lease._overwrite(fs, held.path, held.body, None)
    try:
        with pytest.raises(LabelError, match=r"being labelled in 3 parts \(part 2/3 runs now\)"):
            label(str(src), str(other), overwrite=True, **OPTS)
    finally:
        held.release()
    with pytest.raises(LabelError, match="--overwrite cannot be used with --part"):
        label(str(src), str(other), part="1/3", overwrite=True, **OPTS)
    with pytest.raises(LabelError, match="--part takes i/N"):
        label(str(src), str(other), part="first", **OPTS)
    assert not list(other.glob("_lease*")) and not list(out.glob("_lease*"))  # refusals leave no lease


# ---------------------------------------------------------------- real runs


def _ids_by_reader(out: Path, cache: Path) -> dict[str, list[str]]:
    return views(str(out), fsspec.filesystem("file"), str(out), cache)


def _committed(src: Path, out: Path, count: int) -> list[str]:
    """Image ids of every committed shard of every part (from the parts' plans)."""
    fs = fsspec.filesystem("file")
    markers, _ = read_markers(fs, str(out))
    return sorted(p.split(f"{src}/", 1)[1] for i in range(1, count + 1)
                  for s in iter_plan(fs, str(out), Part(i, count).plan_name) if s.shard_id in markers for p in s.paths)


def _label_process(src: Path, out: Path, part: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "label", str(src), str(out), *ARGS, "--part", part,
                             "--json"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
                            start_new_session=True)


@pytest.mark.slow
def test_two_parts_at_once_on_one_output_then_a_rerun_of_each(ray_session, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    ids = sorted(make_photo_folder(src, copies=4))  # 12 images
    mine = [i for i in ids if Part(1, 2).owns_input(f"{src}/{i}", str(src))]
    assert 2 < len(mine) < 10  # both parts have several shards of 2

    # part 1 frozen with its second shard staged before its marker; part 2 runs meanwhile, to its end
    proc, paused = start_paused(str(src), str(out), "before-marker:2", tmp_path / "pause", extra=["--part", "1/2"])
    try:
        frozen = paused["shard_id"]
        assert Part(1, 2).owns_shard(frozen)
        staged = list((out / STAGED_DIR / f"{frozen:06d}").iterdir())
        assert staged
        second = label(str(src), str(out), part="2/2", **OPTS)
        assert second["complete"] and second["part"] == "2/2" and second["images"] == len(ids) - len(mine)
        assert second["parts"]["status"] == {"1/2": "running", "2/2": "complete"}
        assert all(f.exists() for f in staged)  # part 2 never touched part 1's uncommitted files
        assert (out / Part(1, 2).lease_name).exists()
        assert json.loads((out / MANIFEST).read_text())["status"] == "running"
        committed = _committed(src, out, 2)
        assert set(ids) - set(mine) <= set(committed) and len(committed) < len(ids)
        assert_views(_ids_by_reader(out, tmp_path / "hf1"), ours=committed, plain=committed)
    finally:
        kill(proc)  # part 1 dies mid-commit, as a lost driver

    # both parts rerun at once, as two jobs would: part 1 finishes, part 2 has nothing left
    procs = {p: _label_process(src, out, p, tmp_path / f"rerun-{p[0]}.log") for p in ("1/2", "2/2")}
    summaries = {}
    for p, proc in procs.items():
        stdout, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, (tmp_path / f"rerun-{p[0]}.log").read_text()[-3000:]
        summaries[p] = json.loads(stdout)
    assert summaries["1/2"]["complete"] and summaries["1/2"]["images"] == len(mine)
    assert summaries["2/2"]["this_run"]["images"] == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["images"] == len(ids)
    assert manifest["parts"]["status"] == {"1/2": "complete", "2/2": "complete"}
    assert not (out / STAGED_DIR).exists() and not (out / TMP_DIR).exists()
    assert not list(out.glob("_lease*"))
    assert_views(_ids_by_reader(out, tmp_path / "hf2"), ours=ids, plain=ids)

    # a rerun of each part finds its work done
    for p in ("1/2", "2/2"):
        again = label(str(src), str(out), part=p, **OPTS)
        assert again["complete"] and again["this_run"]["images"] == 0
    assert_views(_ids_by_reader(out, tmp_path / "hf3"), ours=ids, plain=ids)
    assert sorted(pq.read_table(out, columns=["image_id"]).column(0).to_pylist()) == ids


@pytest.mark.slow
def test_retry_errors_in_a_part_redoes_only_its_own_rows(ray_session, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    make_photo_folder(src)
    broken = [f"zz-broken-{k}.png" for k in range(6)]
    for name in broken:
        (src / name).write_bytes(b"not an image")
    ids = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.*"))
    owner = {i: 1 if Part(1, 2).owns_input(f"{src}/{i}", str(src)) else 2 for i in ids}
    assert {owner[b] for b in broken} == {1, 2}  # broken images in both parts
    for p in ("1/2", "2/2"):
        label(str(src), str(out), part=p, **OPTS)
    for name in broken:  # the inputs are fixed: a retry now labels them
        (src / name).write_bytes((src / next(i for i in ids if i.endswith(".png") and i not in broken)).read_bytes())
    fixed = label(str(src), str(out), part="1/2", retry_errors=["not an image"], **OPTS)
    mine = [b for b in broken if owner[b] == 1]
    assert fixed["this_run"]["error_rows_retried"] == len(mine) and fixed["errors"] == 0
    table = pq.read_table(out, columns=["image_id", "error"]).to_pylist()
    assert sorted(r["image_id"] for r in table) == ids  # every image once, after the swap too
    still = sorted(r["image_id"] for r in table if r["error"])
    assert still == sorted(b for b in broken if owner[b] == 2)  # part 2's rows are part 2's to redo
