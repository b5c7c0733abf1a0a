"""Listing and reading inputs: folders, globs, single files, tar and Parquet shards (no Ray)."""
from __future__ import annotations

import pytest
from pipeline_helpers import (
    encoded,
    make_photo_folder,
    photos,
    write_parquet_shard,
    write_tar_shard,
)

from pipeline.data.readers import read_parquet, read_source, read_tar
from pipeline.data.sources import NoInputError, list_inputs, relative_id


def test_folder_is_listed_recursively_sorted_and_hidden_files_skipped(tmp_path):
    ids = make_photo_folder(tmp_path, copies=2)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "_tmp").mkdir()
    (tmp_path / "_tmp" / "a.jpg").write_bytes(b"x")
    (tmp_path / "UPPER.JPG").write_bytes(b"x")
    listing = list_inputs(str(tmp_path))
    rel = [relative_id(p, listing.root) for p in listing.images]
    assert rel == sorted(ids + ["UPPER.JPG"])
    assert all(p.startswith("file://") for p in listing.images)
    assert listing.parquets == listing.tars == []


def test_glob_and_single_file_and_file_url(tmp_path):
    make_photo_folder(tmp_path, copies=2)
    listing = list_inputs(str(tmp_path / "set*" / "*.png"))
    assert [relative_id(p, listing.root) for p in listing.images] == ["set0/coffee-0.png", "set1/coffee-1.png"]
    single = list_inputs(f"file://{tmp_path}/set0/coffee-0.png")
    assert [relative_id(p, single.root) for p in single.images] == ["coffee-0.png"]


def test_no_input_matched_raises(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(NoInputError, match="No input matched"):
        list_inputs(str(tmp_path))
    with pytest.raises(NoInputError):
        list_inputs(str(tmp_path / "missing"))


def test_tar_members_become_rows_keyed_by_shard_and_key(tmp_path):
    jpg = encoded(photos()["coffee"][:32, :32], "JPEG")
    write_tar_shard(tmp_path / "shards" / "00000.tar", {"a/0001": jpg, "a/0002": jpg})
    rows = list(read_tar(f"file://{tmp_path}/shards/00000.tar", f"file://{tmp_path}", None))
    assert [r.image_id for r in rows] == ["shards/00000.tar/a/0001", "shards/00000.tar/a/0002"]
    assert all(r.data == jpg and r.error is None for r in rows)


@pytest.mark.parametrize("struct_column", [False, True])
def test_parquet_rows_from_binary_or_struct_column(tmp_path, struct_column):
    jpg = encoded(photos()["coffee"][:32, :32], "JPEG")
    write_parquet_shard(tmp_path / "p.parquet", [jpg, jpg, jpg], struct_column=struct_column)
    rows = list(read_parquet(f"file://{tmp_path}/p.parquet", f"file://{tmp_path}", None))
    assert [r.image_id for r in rows] == ["p.parquet/0", "p.parquet/1", "p.parquet/2"]
    assert all(r.data == jpg for r in rows)


def test_missing_file_is_a_row_with_an_error_not_an_exception(tmp_path):
    make_photo_folder(tmp_path)
    listing = list_inputs(str(tmp_path))
    paths = listing.images + [f"file://{tmp_path}/gone.jpg"]
    rows = list(read_source("images", paths, listing.root, None))
    assert [r.error is None for r in rows] == [True, True, True, False]
    assert rows[-1].error.startswith("read error") and rows[-1].image_id == "gone.jpg"


def test_tar_and_parquet_shards_end_to_end(ray_session, tmp_path):
    from pipeline_helpers import FAST, read_output

    from pipeline import label

    jpgs = {name: encoded(arr[::4, ::4], "JPEG") for name, arr in photos().items()}
    write_tar_shard(tmp_path / "in" / "tars" / "00000.tar", {f"k{i}": b for i, b in enumerate(jpgs.values())})
    write_tar_shard(tmp_path / "in" / "tars" / "00001.tar", {"x": b"garbage bytes", "y": jpgs["coffee"]})
    write_parquet_shard(tmp_path / "in" / "pq" / "a.parquet", list(jpgs.values()), struct_column=False)
    (tmp_path / "in" / "pq" / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    summary = label(str(tmp_path / "in"), str(tmp_path / "out"), rows_per_file=2, **FAST)
    # A container of more than rows_per_file rows is planned as shards of row ranges: 00000.tar and
    # a.parquet (3 rows) give two each, 00001.tar (2 rows) and the broken file one each.
    assert summary["complete"] and summary["shards"]["total"] == 6
    rows = {r["image_id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    assert sorted(rows) == sorted(
        ["tars/00000.tar/k0", "tars/00000.tar/k1", "tars/00000.tar/k2", "tars/00001.tar/x", "tars/00001.tar/y",
         "pq/a.parquet/0", "pq/a.parquet/1", "pq/a.parquet/2", "pq/broken.parquet/#shard-error"])
    assert rows["tars/00001.tar/x"]["error"].startswith("not an image")
    assert rows["pq/broken.parquet/#shard-error"]["error"].startswith("shard error")
    assert summary["labelled"] == 7 and summary["errors_by_kind"] == {"not an image": 1, "shard error": 1}
    assert rows["pq/a.parquet/1"]["source"].endswith("/pq/a.parquet")
    assert rows["pq/a.parquet/1"]["width"] == photos()["coffee"][::4, ::4].shape[1]
    assert len(list((tmp_path / "out").glob("labels-*.parquet"))) == 6  # one file per shard of <= 2 rows
