"""Encoding rows and the exactly-once Parquet sink (no Ray)."""
from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import read_output

from pipeline.data.encode import decode_png, encode_label
from pipeline.data.retry import UNAVAILABLE, RetryPolicy
from pipeline.data.schema import OUTPUT_SCHEMA, SHARD_ID, SHARD_ROWS
from pipeline.job.commit import Committer
from pipeline.job.sink import RECORD_SCHEMA, OutputLocation, write_rows


def test_png_is_8_bit_up_to_256_segments_then_16_bit():
    labels = np.zeros((10, 12), np.int64)
    labels[2:5, 3:9] = 7  # gaps in ids are compacted
    png, n, segs = encode_label(labels, rle=False)
    assert n == 2 and decode_png(png).max() == 1
    assert segs == [
        {"id": 0, "area": 120 - 18, "bbox": [0, 0, 12, 10], "rle": None},
        {"id": 1, "area": 18, "bbox": [3, 2, 6, 3], "rle": None},
    ]
    many = np.arange(20 * 30).reshape(20, 30) % 300
    png, n, _ = encode_label(many, rle=False)
    import io

    from PIL import Image

    assert n == 300 and Image.open(io.BytesIO(png)).mode.startswith("I")
    assert (decode_png(png) == many).all()


def test_rle_is_coco_and_decodes_to_the_segment():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=(17, 23))
    _, _, segs = encode_label(labels, rle=True)
    for seg in segs:
        rle = {"size": seg["rle"]["size"], "counts": seg["rle"]["counts"].encode()}
        assert (mask_utils.decode(rle) == (labels == seg["id"])).all()
        assert mask_utils.area(rle) == seg["area"]


def _rows(shard_id, ids, total, error=None):
    n = len(ids)
    return pa.table({
        "image_id": ids, "source": ["s"] * n, "width": pa.array([2] * n, pa.int32()),
        "height": pa.array([2] * n, pa.int32()), "label_map": pa.array([b"png"] * n, pa.binary()),
        "num_segments": pa.array([1] * n, pa.int32()),
        "segments": pa.array([[]] * n, OUTPUT_SCHEMA.field("segments").type),
        "error": pa.array([error] * n, pa.string()),
        SHARD_ID: pa.array([shard_id] * n, pa.int64()), SHARD_ROWS: pa.array([total] * n, pa.int64()),
        "_t_model": pa.array([0.5] * n, pa.float64()),
    })


def test_workers_write_parts_and_the_driver_commits_each_shard_once(ray_session, tmp_path):
    """write_rows (the worker stage, called here directly) -> part records -> Committer (driver)."""
    fs = fsspec.filesystem("file")
    where = OutputLocation(str(tmp_path))
    committer = Committer(fs, str(tmp_path), where, rows_per_file=2, metadata={"model": "m"},
                          policy=RetryPolicy(deadline_s=1))
    for shard_id in (3, 4, 5):
        committer.expect(shard_id)

    def write(table):
        records = write_rows(table, output=where, metadata=committer.metadata, policy=committer.policy)
        assert "label_map" not in records.column_names and records.schema == RECORD_SCHEMA
        return records

    first = write(_rows(3, ["a", "b", "c"], -1))  # total not known yet (tar/parquet reader)
    committer.add(first)
    committer.add(first)  # a retried task: the same rows again, same spill file
    assert committer.committed == [] and not (tmp_path / "_done").exists()
    committer.add(write(pa.concat_tables([_rows(3, ["d"], 5), _rows(4, ["x"], 1, error="not an image: junk")])))
    committer.add(write(_rows(3, ["e"], 5)))
    committer.finish()  # shard 5 sent no row: an empty input, committed empty
    assert sorted(committer.committed) == [3, 4, 5] and committer.duplicates == 3
    assert not committer.incomplete() and not committer.failed and committer.rows == 6
    # shard 3 came in three spill parts: merged into files of at most 2 rows
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == [
        "labels-000003-000.parquet", "labels-000003-001.parquet", "labels-000003-002.parquet",
        "labels-000004-000.parquet"]
    assert not (tmp_path / "_inprogress").exists()  # spill parts, their folders and the folder are gone
    marker = json.loads((tmp_path / "_done" / "000003.json").read_text())
    assert marker["rows"] == 5 and len(marker["files"]) == 3
    assert json.loads((tmp_path / "_done" / "000004.json").read_text())["errors"] == {"not an image": 1}
    assert json.loads((tmp_path / "_done" / "000005.json").read_text())["files"] == []
    table = read_output(str(tmp_path))
    assert table.schema.remove_metadata() == OUTPUT_SCHEMA
    assert sorted(table.column("image_id").to_pylist()) == ["a", "b", "c", "d", "e", "x"]
    assert max(pq.ParquetFile(p).metadata.num_rows for p in tmp_path.glob("*.parquet")) <= 2
    for name in ("labels-000004-000.parquet", "labels-000003-001.parquet"):
        assert pq.ParquetFile(tmp_path / name).metadata.row_group(0).column(0).compression == "ZSTD"
        assert json.loads(pq.read_schema(tmp_path / name).metadata[b"diffseg"]) == {"model": "m"}
    assert committer.stage_seconds["_t_model"] == pytest.approx(0.5 * 9)  # 6 rows + 3 duplicates: work done


def test_a_task_rerun_after_its_shard_committed_changes_nothing_and_leaves_no_spill(ray_session, tmp_path):
    """A lost node's write task, rebuilt from lineage after its shard committed, writes its spill
    part again: with its record (counted a duplicate, not a second commit) or without one."""
    fs = fsspec.filesystem("file")
    where = OutputLocation(str(tmp_path))
    committer = Committer(fs, str(tmp_path), where, rows_per_file=4, metadata={}, policy=RetryPolicy(deadline_s=1))
    for shard_id in (0, 1):
        committer.expect(shard_id)

    def write(table):
        return write_rows(table, output=where, metadata=committer.metadata, policy=committer.policy)

    first = write(_rows(0, ["a", "b"], 2))
    committer.add(first)
    committer.add(write(_rows(1, ["c"], 1)))
    while committer._in_flight:
        committer._poll(block=True)
    assert sorted(committer.committed) == [0, 1] and not list((tmp_path / "_inprogress").glob("*/*"))
    marker = (tmp_path / "_done" / "000000.json").read_text()
    committer.add(write(_rows(0, ["a", "b"], 2)))  # re-run, and its record arrives again
    write(_rows(1, ["c"], 1))  # re-run, its record never comes
    assert len(list((tmp_path / "_inprogress").glob("*/*.arrow"))) == 2
    committer.finish()
    assert sorted(committer.committed) == [0, 1] and committer.duplicates == 2 and committer.rows == 3
    assert (tmp_path / "_done" / "000000.json").read_text() == marker  # committed once
    assert not (tmp_path / "_inprogress").exists()
    assert sorted(read_output(str(tmp_path)).column("image_id").to_pylist()) == ["a", "b", "c"]


def test_rows_that_storage_could_not_read_are_never_committed(ray_session, tmp_path):
    fs = fsspec.filesystem("file")
    where = OutputLocation(str(tmp_path))
    committer = Committer(fs, str(tmp_path), where, rows_per_file=4, metadata={}, policy=RetryPolicy(deadline_s=1))
    committer.expect(0)
    unreachable = f"{UNAVAILABLE}: EndpointConnectionError: Could not connect (retried for 1 s)"
    batch = pa.concat_tables([_rows(0, ["a"], 2), _rows(0, ["b"], 2, error=unreachable)])
    committer.add(write_rows(batch, output=where, metadata=b"{}", policy=committer.policy))
    committer.finish()
    assert committer.committed == [] and set(committer.failed) == {0} and UNAVAILABLE in committer.failed[0]
    assert not list(tmp_path.glob("*.parquet")) and not (tmp_path / "_done").exists()
