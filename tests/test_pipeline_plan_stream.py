"""The listing and the shard plan stream: nothing per image is held, the plan is written as it is made."""
from __future__ import annotations

import gzip
import json

import fsspec
import pytest

from benchmarks.synthetic_fs import SyntheticFileSystem
from pipeline.data.resume import (
    DamagedPlanError,
    iter_plan,
    read_shard,
    shards_from_inputs,
    update_plan,
)
from pipeline.data.sources import first_input, iter_inputs

SYNTHETIC = {"folders": 10, "per_folder": 50}


def test_the_listing_is_lazy_and_ordered():
    SyntheticFileSystem.ls_calls = 0
    assert first_input("synthetic://images", SYNTHETIC) == ("image", "synthetic://images/d0000/img0000000.jpg")
    assert SyntheticFileSystem.ls_calls <= 2  # the root and one folder, not the ten
    listed = [uri for _, uri in iter_inputs("synthetic://images", SYNTHETIC)]
    assert len(listed) == 500 and listed == sorted(listed)


def test_the_plan_is_written_as_it_is_made_and_extended_on_a_rerun(tmp_path):
    fs = fsspec.filesystem("file")
    root = str(tmp_path)
    first = update_plan(fs, root, iter_inputs("synthetic://images", {"folders": 3, "per_folder": 5}), 4)
    assert (first.shards, first.new) == (4, 4)  # 15 images, 4 per shard
    shards = list(iter_plan(fs, root))
    assert [len(s.paths) for s in shards] == [4, 4, 4, 3] and [s.shard_id for s in shards] == [0, 1, 2, 3]
    again = update_plan(fs, root, iter_inputs("synthetic://images", {"folders": 3, "per_folder": 5}), 4)
    assert (again.shards, again.new) == (4, 0)
    grown = update_plan(fs, root, iter_inputs("synthetic://images", {"folders": 4, "per_folder": 5}), 4)
    assert (grown.shards, grown.new) == (6, 2)  # the 5 new images: ids 4 and 5, after the saved ones
    after = list(iter_plan(fs, root))
    assert after[:4] == shards and [s.shard_id for s in after[4:]] == [4, 5]
    assert [p.rsplit("/", 1)[1] for s in after[4:] for p in s.paths] == [f"img{i:07d}.jpg" for i in range(15, 20)]
    assert not list(tmp_path.glob("*.tmp"))


def test_tar_and_parquet_inputs_are_shards_of_their_own():
    inputs = [("image", "a.jpg"), ("tar", "b.tar"), ("image", "c.jpg"), ("parquet", "d.parquet"), ("image", "e.jpg")]
    shards = list(shards_from_inputs(iter(inputs), 2))
    assert [(s.shard_id, s.kind, s.paths) for s in shards] == [
        (0, "tar", ("b.tar",)), (1, "images", ("a.jpg", "c.jpg")), (2, "parquet", ("d.parquet",)),
        (3, "images", ("e.jpg",))]


def test_a_damaged_plan_is_refused_not_rebuilt(tmp_path):
    fs = fsspec.filesystem("file")
    update_plan(fs, str(tmp_path), iter_inputs("synthetic://images", SYNTHETIC), 100)
    plan = tmp_path / "_plan.jsonl.gz"
    plan.write_bytes(plan.read_bytes()[:-20])
    with pytest.raises(DamagedPlanError, match="is damaged.*--overwrite"):
        update_plan(fs, str(tmp_path), iter_inputs("synthetic://images", SYNTHETIC), 100)
    plan.write_bytes(gzip.compress(b"not json\n"))
    with pytest.raises(DamagedPlanError):
        list(iter_plan(fs, str(tmp_path)))


def test_each_shard_is_read_alone_by_its_place_in_the_plan(tmp_path):
    fs = fsspec.filesystem("file")
    summary = update_plan(fs, str(tmp_path), iter_inputs("synthetic://images", SYNTHETIC), 64)
    shards = list(iter_plan(fs, str(tmp_path)))
    index = summary.index
    assert index.shard_ids.tolist() == [s.shard_id for s in shards]
    plan = str(tmp_path / "_plan.jsonl.gz")
    assert [read_shard(fs, plan, int(o), int(n)) for o, n in zip(index.offsets, index.lengths)] == shards
    assert index.without({0, 2}).shard_ids.tolist() == [s.shard_id for s in shards if s.shard_id not in (0, 2)]


def test_a_plan_written_by_an_earlier_version_is_kept_and_converted(tmp_path):
    fs = fsspec.filesystem("file")
    old = [{"shard_id": 0, "kind": "images", "paths": ["synthetic://images/d0000/img0000001.jpg"]},
           {"shard_id": 1, "kind": "tar", "paths": ["synthetic://images/x.tar"]}]
    (tmp_path / "_plan.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(d) + "\n" for d in old).encode()))
    summary = update_plan(fs, str(tmp_path), iter_inputs("synthetic://images", {"folders": 1, "per_folder": 3}), 10)
    shards = list(iter_plan(fs, str(tmp_path)))
    assert [s.to_json() for s in shards[:2]] == old  # the saved shards keep their ids and contents
    assert shards[2].shard_id == 2 and len(shards[2].paths) == 2  # img0000000 and img0000002 are new
    assert (summary.shards, summary.new) == (3, 1)
    plan = str(tmp_path / "_plan.jsonl.gz")
    assert read_shard(fs, plan, int(summary.index.offsets[1]), int(summary.index.lengths[1])).kind == "tar"
