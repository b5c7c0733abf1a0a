"""Odd inputs (issue 23): a FIFO in the input, an output inside the input, a tar or Parquet file
larger than --rows-per-file (planned as shards of row ranges, so a kill loses one shard of it)."""
from __future__ import annotations

import io
import os
import tarfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import LabelError, label
from pipeline.cli import format_summary, main
from pipeline.data.containers import split_containers
from pipeline.data.readers import bounded, read_source
from pipeline.data.sources import SkippedInputs, iter_inputs, output_in_input
from pipeline_helpers import FAST, random_png, read_output

TINY = {**FAST, "batch_size": 5}


_png = random_png


def _tar(path: Path, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, name in enumerate(names):
            data = _png(i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _ids(kind: str, items: list[tuple[str, str]], root: str) -> list[str]:
    return [r.image_id for k, uri in items if k.split("[")[0] == kind for r in read_source(k, [uri], root, None)]


# ------------------------------------------------------------------------------ no Ray


def test_large_containers_are_split_into_row_ranges_with_the_ids_of_a_whole_read(tmp_path):
    # 25 members, names repeating (s000 ... s019, then s000 again: s000#2): numbering spans ranges.
    _tar(tmp_path / "big.tar", [f"s{i % 20:03d}.png" for i in range(25)])
    _tar(tmp_path / "small.tar", ["a.png", "b.png"])
    keys = [f"k{i % 7}" if i % 5 else None for i in range(23)]  # repeats, and nulls (the row number)
    pq.write_table(pa.table({"key": keys, "image": [_png(i) for i in range(23)]}), tmp_path / "big.parquet",
                   row_group_size=4)
    root = tmp_path.as_uri()
    items = list(split_containers(iter_inputs(str(tmp_path)), 10, None))
    assert [k for k, _ in items] == ["parquet[0:10]", "parquet[10:20]", "parquet[20:23]",
                                     "tar[0:10]", "tar[10:20]", "tar[20:25]", "tar"]
    for kind, uri in {("tar", (tmp_path / "big.tar").as_uri()), ("parquet", (tmp_path / "big.parquet").as_uri())}:
        whole = [r.image_id for r in read_source(kind, [uri], root, None)]
        assert _ids(kind, [i for i in items if i[1] == uri], root) == whole  # same ids, same order, once
        assert len(set(whole)) == len(whole)
    assert "big.tar/s000#2" in _ids("tar", items, root)
    # A file the saved plan already holds is never split (nor read) again: a rerun plans what the first did.
    again = list(split_containers(iter_inputs(str(tmp_path)), 10, None, planned=lambda uri: True))
    assert [k for k, _ in again] == ["parquet", "tar", "tar"]


def test_a_large_tar_on_s3_is_split_and_read_by_ranges(tmp_path):
    from s3_server import moto_s3

    _tar(tmp_path / "big.tar", [f"img{i:02d}.png" for i in range(25)])
    with moto_s3("inputs") as (fs, options):
        fs.put(str(tmp_path / "big.tar"), "inputs/in/big.tar")
        items = list(split_containers(iter_inputs("s3://inputs/in", options), 10, options))
        assert [k for k, _ in items] == ["tar[0:10]", "tar[10:20]", "tar[20:25]"]
        ranged = [r.image_id for k, uri in items for r in read_source(k, [uri], "s3://inputs/in", options)]
        whole = [r.image_id for r in read_source("tar", [items[0][1]], "s3://inputs/in", options)]
    assert ranged == whole and len(whole) == 25


def test_a_fifo_is_never_opened_for_a_blocking_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    os.mkfifo(tmp_path / "pipe.tar")
    (tmp_path / "ok.png").write_bytes(_png(0))
    skipped = SkippedInputs()
    assert [uri.rsplit("/", 1)[1] for _, uri in iter_inputs(str(tmp_path), skipped=skipped)] == ["ok.png"]
    assert skipped.sentence() == "skipped 2 non-regular files (FIFO): pipe.png, pipe.tar"
    # Named on its own, or put in place after the listing: refused on open, without blocking.
    assert list(iter_inputs(str(tmp_path / "pipe.png"))) == []
    root = tmp_path.as_uri()
    (row,) = read_source("images", [(tmp_path / "pipe.png").as_uri()], root, None)
    assert row.data is None and row.error.startswith("read error: NotRegularFileError: not a regular file (FIFO)")
    with pytest.raises(OSError, match=r"not a regular file \(FIFO\)"):
        list(read_source("tar", [(tmp_path / "pipe.tar").as_uri()], root, None))


def test_a_read_that_blocks_past_the_bound_fails_as_a_transient_fault():
    from pipeline.data.retry import is_transient

    never = threading.Event()
    with pytest.raises(TimeoutError, match="blocked for more than 0.2 s") as caught:
        bounded(never.wait, seconds=0.2, what="a hung mount")
    assert is_transient(caught.value)  # retried until the storage deadline, then "storage unavailable"


def test_an_output_in_the_input_is_refused_before_ray_starts(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(_png(0))
    with pytest.raises(LabelError, match=r"is the input folder: the next run would read its Parquet files"):
        label(str(src), str(src), **TINY)
    with pytest.raises(LabelError, match=r"is inside the input .*choose an output outside the input"):
        label(str(src), str(src / "labels" / "v1"), **TINY)
    assert main(["label", f"{src}/", str(src / "labels"), "--model", "tiny-random"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is inside the input" in err[0]
    assert sorted(p.name for p in src.iterdir()) == ["a.png"]  # nothing was written
    # What the listing never reads is fine: a _ or . folder inside, a folder beside, a single input file.
    for fine in (src / "_labels", src / ".labels", tmp_path / "out", tmp_path / "in-labels"):
        assert output_in_input(str(src), str(fine)) is None
    assert output_in_input(str(src / "a.png"), str(src / "labels")) is None
    assert output_in_input(f"{src}/*.png", str(src / "labels")) is None  # *.png never matches labels/*.parquet
    assert output_in_input(f"{src}/**", str(src / "labels")) is not None
    # Object store URLs are compared the same way (no request is made).
    assert "is inside the input" in output_in_input("s3://bucket/in", "s3://bucket/in/labels")
    assert "is the input folder" in output_in_input("s3://bucket/in/", "s3://bucket/in")
    assert output_in_input("s3://bucket/in", "s3://bucket/in-labels") is None


# ------------------------------------------------------------------------- real runs


def test_a_large_tar_commits_shard_by_shard_and_resumes_beside_a_fifo(ray_session, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _tar(src / "big.tar", [f"img{i:02d}.png" for i in range(25)])
    (src / "a").mkdir()
    os.mkfifo(src / "a" / "b.png")  # a decode task that opened it would block the run forever
    whole = [r.image_id for r in read_source("tar", [(src / "big.tar").as_uri()], src.as_uri(), None)]

    first = label(str(src), str(out), rows_per_file=10, **TINY)
    assert first["complete"] and first["shards"]["total"] == 3 and first["images"] == 25
    assert sorted(p.name for p in (out / "_done").glob("*.json")) == ["000000.json", "000001.json", "000002.json"]
    assert first["skipped_inputs"]["count"] == 1
    assert "skipped 1 non-regular file (FIFO): a/b.png" in format_summary(first).splitlines()
    assert sorted(read_output(str(out)).column("image_id").to_pylist()) == sorted(whole)

    # A run that stopped after two of the three shards: the rerun redoes the missing one only.
    (out / "_done" / "000001.json").unlink()
    resumed = label(str(src), str(out), rows_per_file=10, **TINY)
    assert resumed["complete"] and resumed["shards"]["total"] == 3 and resumed["shards"]["new_in_plan"] == 0
    assert resumed["shards"]["written_this_run"] == 1 and resumed["this_run"]["images"] == 10
    ids = read_output(str(out)).column("image_id").to_pylist()
    assert sorted(ids) == sorted(whole) and len(ids) == 25  # exactly once
