"""Shards longer than one decode chunk (issue 31, item 7).

read_decode sends a shard in chunks and holds the last one back: it carries the shard's row
count (``_shard_rows``; -1 on the others), which for tar and Parquet shards is only known at
the end. Here: read_decode itself on tar, Parquet and image-folder shards of more rows than a
chunk; the committer fed a 3-chunk shard's real chunks in every order (the count-carrying
chunk first, in the middle and last); and one label() run on a local Ray (tiny-random, a
RANDOM model) with tar and Parquet shards longer than a chunk.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pipeline_helpers import encoded, read_output, write_parquet_shard, write_tar_shard

from pipeline.data.schema import SHARD_ID, SHARD_ROWS
from pipeline.job.tasks import read_decode

CHUNK = 4
ROWS = 10  # 3 chunks of 4, 4, 2: the count is 10, never the last chunk's 2


def _photo(i: int) -> bytes:
    rng = np.random.default_rng(i)
    return encoded(rng.integers(0, 256, (12 + i % 3, 16, 3), dtype=np.uint8), "PNG")


def _shard(tmp_path: Path, kind: str, rows: int = ROWS) -> tuple[dict[str, np.ndarray], str]:
    """One work shard (as the plan hands it to read_decode) of ``rows`` images, and its root."""
    root = tmp_path / kind
    if kind == "tar":
        write_tar_shard(root / "a.tar", {f"k{i:02d}": _photo(i) for i in range(rows)})
        paths = [str(root / "a.tar")]
    elif kind == "parquet":
        write_parquet_shard(root / "a.parquet", [_photo(i) for i in range(rows)], struct_column=False)
        paths = [str(root / "a.parquet")]
    else:
        root.mkdir(parents=True)
        for i in range(rows):
            (root / f"p{i:02d}.png").write_bytes(_photo(i))
        paths = [str(root / f"p{i:02d}.png") for i in range(rows)]
    batch = {"shard_id": np.array([5]), "kind": np.array([kind]), "paths": np.array([paths], dtype=object)}
    return batch, str(root)


def _chunks(tmp_path: Path, kind: str, rows: int = ROWS) -> list[dict[str, np.ndarray]]:
    batch, root = _shard(tmp_path, kind, rows)
    return list(read_decode(batch, root=root, image_size=16, chunk=CHUNK))


@pytest.mark.parametrize("kind", ["tar", "parquet", "images"])
def test_the_last_chunk_carries_the_shard_total_not_its_own_length(tmp_path, kind):
    chunks = _chunks(tmp_path, kind)
    assert [len(c["image_id"]) for c in chunks] == [4, 4, 2]
    assert [set(c[SHARD_ROWS].tolist()) for c in chunks] == [{-1}, {-1}, {ROWS}]
    assert all(set(c[SHARD_ID].tolist()) == {5} for c in chunks)
    ids = [i for c in chunks for i in c["image_id"]]
    assert len(ids) == len(set(ids)) == ROWS
    assert all(e is None for c in chunks for e in c["error"])


@pytest.mark.parametrize("rows", [CHUNK, CHUNK + 1, 2 * CHUNK])
def test_a_shard_at_a_chunk_edge_counts_all_its_rows(tmp_path, rows):
    chunks = _chunks(tmp_path, "tar", rows)
    assert sum(len(c["image_id"]) for c in chunks) == rows
    assert [int(c[SHARD_ROWS].max()) for c in chunks] == [-1] * (len(chunks) - 1) + [rows]


def test_the_default_chunk_is_decode_chunk(tmp_path):
    from pipeline.job import tasks

    batch, root = _shard(tmp_path, "parquet", 3 * tasks.DECODE_CHUNK + 1)
    chunks = list(read_decode(batch, root=root, image_size=8))
    assert [int(c[SHARD_ROWS].max()) for c in chunks] == [-1, -1, -1, 3 * tasks.DECODE_CHUNK + 1]


def _records(chunks: list[dict[str, np.ndarray]]) -> list[pa.Table]:
    """Each chunk as the part record the sink would send for it (one record per chunk)."""
    from pipeline.job.sink import RECORD_SCHEMA, row_hashes

    out = []
    for k, c in enumerate(chunks):
        ids = [str(i) for i in c["image_id"]]
        rec = {"shard_id": int(c[SHARD_ID][0]), "shard_rows": int(c[SHARD_ROWS].max()),
               "file": f"_inprogress/5/{k}.arrow", "rows": len(ids), "row_hashes": row_hashes(ids), "errors": "{}",
               "bytes": 1, "failure": None, "fatal": False, "node_id": "n1", "provenance": None}
        out.append(pa.Table.from_pylist([rec], schema=RECORD_SCHEMA))
    return out


def _recording_committer(tmp_path: Path):
    """The real Committer, but its finalize submission recorded instead of run as a Ray task."""
    import fsspec

    from pipeline.job.commit import Committer
    from pipeline.job.sink import OutputLocation

    class Recording(Committer):
        def _submit(self, shard_id, shard):
            self.submitted.append((shard_id, sorted(shard.parts), len(shard.seen)))
            shard.submitted = True

    committer = Recording(fsspec.filesystem("file"), str(tmp_path / "out"), OutputLocation(str(tmp_path / "out")),
                          1000, {})
    committer.submitted = []
    return committer


@pytest.mark.parametrize("kind", ["tar", "parquet"])
@pytest.mark.parametrize("order", list(itertools.permutations(range(3))), ids=lambda o: "".join(map(str, o)))
def test_the_committer_takes_a_shard_once_whatever_order_its_chunks_arrive(tmp_path, kind, order):
    """read_decode's real chunks of one shard (chunk 2 carries the count) reach the committer in
    every order: it submits the shard exactly once, after the last of them, with all its rows."""
    records = _records(_chunks(tmp_path, kind))
    assert [r.column("shard_rows")[0].as_py() for r in records] == [-1, -1, ROWS]
    committer = _recording_committer(tmp_path)
    for step, k in enumerate(order):
        committer.add(records[k])
        want = [(5, [f"_inprogress/5/{j}.arrow" for j in range(3)], ROWS)] if step == 2 else []
        assert committer.submitted == want, (order, step)
    committer.add(records[order[0]])  # a retried task's copy of a chunk: no second commit, no row twice
    assert len(committer.submitted) == 1 and committer.open[5].total == ROWS and len(committer.open[5].seen) == ROWS


def test_a_label_run_commits_every_row_of_long_tar_and_parquet_shards_once(ray_session, tmp_path, monkeypatch):
    """label() on a local Ray (tiny-random: a RANDOM model) with DECODE_CHUNK = 4: a tar shard of 10
    rows and a Parquet shard of 9, each longer than two chunks; every row committed exactly once."""
    from pipeline import label
    from pipeline.job import tasks

    import ray.data

    monkeypatch.setattr(tasks, "DECODE_CHUNK", CHUNK)  # the plan reads it when it is built
    asked: list[int] = []
    map_batches = ray.data.Dataset.map_batches

    def watched(self, fn, *args, **kwargs):  # the real map_batches; notes the chunk read_decode is given
        if fn is tasks.read_decode:
            asked.append(kwargs["fn_kwargs"]["chunk"])
        return map_batches(self, fn, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", watched)
    src = tmp_path / "in"
    write_tar_shard(src / "a.tar", {f"k{i:02d}": _photo(i) for i in range(ROWS)})
    write_parquet_shard(src / "b.parquet", [_photo(20 + i) for i in range(ROWS - 1)], struct_column=False)
    summary = label(str(src), str(tmp_path / "out"), model="tiny-random", image_size=32, num_points=4,
                    batch_size=4)
    assert asked == [CHUNK]
    assert summary["complete"] and summary["labelled"] == 2 * ROWS - 1, summary
    rows = read_output(str(tmp_path / "out")).to_pylist()
    ids = [r["image_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 2 * ROWS - 1, sorted(ids)
    assert sum(i.startswith("a.tar/") for i in ids) == ROWS and sum(i.startswith("b.parquet/") for i in ids) == ROWS - 1
    assert all(r["error"] is None and r["label_map"] for r in rows)
    markers = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "_done").glob("*.json"))]
    assert sorted(m["rows"] for m in markers) == [ROWS - 1, ROWS], markers
