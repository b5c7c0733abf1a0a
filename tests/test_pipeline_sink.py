"""Encoding rows and the exactly-once Parquet sink (no Ray)."""
from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.encode import decode_png, encode_label
from pipeline.schema import OUTPUT_SCHEMA, SHARD_ID, SHARD_ROWS
from pipeline.sink import ShardSink
from pipeline_helpers import read_output


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
    from PIL import Image
    import io

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


def test_sink_commits_a_shard_only_when_all_rows_arrived_and_bounds_rows_per_file(tmp_path):
    fs = fsspec.filesystem("file")
    sink = ShardSink(fs, str(tmp_path), rows_per_file=2, metadata={"model": "m"})
    sink.add(_rows(3, ["a", "b", "c"], -1))  # total not known yet (tar/parquet reader)
    assert sink.committed == [] and not (tmp_path / "_done").exists()
    sink.add(pa.concat_tables([_rows(3, ["b"], 5), _rows(4, ["x"], 1, error="not an image: junk")]))
    assert sink.committed == [4] and sink.duplicates == 1
    sink.add(_rows(3, ["d", "e"], 5))
    assert sorted(sink.committed) == [3, 4] and not sink.open
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == [
        "labels-000003-000.parquet", "labels-000003-001.parquet", "labels-000003-002.parquet",
        "labels-000004-000.parquet"]
    assert list((tmp_path / "_inprogress").iterdir()) == []
    marker = json.loads((tmp_path / "_done" / "000003.json").read_text())
    assert marker["rows"] == 5 and len(marker["files"]) == 3
    assert json.loads((tmp_path / "_done" / "000004.json").read_text())["errors"] == {"not an image": 1}
    table = read_output(str(tmp_path))
    assert table.schema.remove_metadata() == OUTPUT_SCHEMA
    assert sorted(table.column("image_id").to_pylist()) == ["a", "b", "c", "d", "e", "x"]
    assert max(pq.ParquetFile(p).metadata.num_rows for p in tmp_path.glob("*.parquet")) <= 2
    assert pq.ParquetFile(tmp_path / "labels-000004-000.parquet").metadata.row_group(0).column(0).compression == "ZSTD"
    assert json.loads(pq.read_schema(tmp_path / "labels-000004-000.parquet").metadata[b"diffseg"]) == {"model": "m"}
    assert sink.stage_seconds["_t_model"] == pytest.approx(3.5)
