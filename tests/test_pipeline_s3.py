"""Reading from and writing to s3:// against a real S3 server on loopback (moto)."""
from __future__ import annotations

import json

import pytest
from pipeline_helpers import FAST, encoded, photos, read_output, write_parquet_shard
from s3_server import moto_s3

from pipeline import label


@pytest.fixture(scope="module")
def s3():
    with moto_s3("labels-bucket") as fs_and_options:
        yield fs_and_options


def test_s3_images_and_parquet_in_s3_labels_out(ray_session, s3, tmp_path):
    fs, options = s3
    ids = []
    for name, arr in photos().items():
        fs.pipe(f"labels-bucket/in/photos/{name}.jpg", encoded(arr[::4, ::4], "JPEG"))
        ids.append(f"photos/{name}.jpg")
    fs.pipe("labels-bucket/in/photos/broken.png", b"\x89PNG not really")
    write_parquet_shard(tmp_path / "rows.parquet", [encoded(photos()["coffee"][::8, ::8], "PNG")] * 3,
                        struct_column=True)
    fs.put(str(tmp_path / "rows.parquet"), "labels-bucket/in/rows.parquet")
    fs.invalidate_cache()

    summary = label("s3://labels-bucket/in", "s3://labels-bucket/out", storage_options=options, **FAST)
    assert summary["complete"] and summary["images"] == 7 and summary["labelled"] == 6
    assert summary["errors_by_kind"] == {"not an image": 1}
    fs.invalidate_cache()
    table = read_output("labels-bucket/out", filesystem=fs)
    got = sorted(table.column("image_id").to_pylist())
    assert got == sorted(ids + ["photos/broken.png", "rows.parquet/0", "rows.parquet/1", "rows.parquet/2"])
    assert all(s.startswith("s3://labels-bucket/in/") for s in table.column("source").to_pylist())
    manifest = json.loads(fs.cat("labels-bucket/out/_manifest.json"))
    assert manifest["status"] == "complete" and manifest["input"] == "s3://labels-bucket/in"
    assert not fs.exists("labels-bucket/out/_inprogress") or not fs.find("labels-bucket/out/_inprogress")

    again = label("s3://labels-bucket/in", "s3://labels-bucket/out", storage_options=options, **FAST)
    assert again["shards"]["written_this_run"] == 0 and again["images"] == 7


def test_s3_names_that_look_like_globs_are_read_literally(ray_session, s3):
    from pipeline.errors import LabelError

    fs, options = s3
    names = ["bracket[1].png", "star*.png", "q?.png", "plain.png"]
    for i, name in enumerate(names):  # distinct sizes: a row's size says which object it was read from
        fs.pipe(f"labels-bucket/odd[1]/{name}", encoded(photos()["coffee"][::8, ::8][: 20 + i], "PNG"))
    fs.invalidate_cache()
    summary = label("s3://labels-bucket/odd[1]", "s3://labels-bucket/odd-out", storage_options=options, **FAST)
    assert summary["complete"] and summary["labelled"] == 4 and summary["errors"] == 0
    fs.invalidate_cache()
    rows = read_output("labels-bucket/odd-out", filesystem=fs).to_pylist()
    assert sorted((r["image_id"], r["height"]) for r in rows) == sorted(
        (name, 20 + i) for i, name in enumerate(names))
    with pytest.raises(LabelError, match=r"holds '\*', '\?' or '\[' is read as a pattern"):
        label("s3://labels-bucket/odd[1]", "s3://labels-bucket/out[2]", storage_options=options, **FAST)
