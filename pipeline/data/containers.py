"""Large tar and Parquet inputs, cut into shards of at most ``--rows-per-file`` rows.

A container whose rows exceed ``rows_per_file`` is planned as several shards, each a
range of its rows: kind ``"tar[0:1000]"``, ``"tar[1000:2000]"``, ... (see
``readers.ranged_kind``), all with the file's URI as their one path. A kill then loses at
most one shard's rows of it, as for a folder of image files. Rows are counted once, when
the file is first planned: a Parquet file's footer, a tar's headers (read seekably, its
members' bytes skipped). A file the saved plan already holds is never counted again, so
a rerun plans exactly what the first run planned (and a file planned whole by an older
version stays whole). Ids are those of a whole read (``<file>/<key>``, repeats
numbered in the file's order): a range is read from the file's start for its keys.
"""
from __future__ import annotations

import os
import tarfile
from typing import Any, Callable, Iterable, Iterator

import fsspec
import pyarrow.parquet as pq

from pipeline.data.parts import Part
from pipeline.data.resume import DamagedPlanError, PlannedPaths
from pipeline.data.retry import is_transient
from pipeline.data.readers import open_input, ranged_kind, tar_image_members
from pipeline.data.sources import SkippedInputs, iter_inputs, open_fs

TAR_BYTES_PER_MEMBER = 512  # a member takes one header block at least: a smaller tar cannot need splitting


def plan_inputs(
    url: str, storage_options: dict[str, Any] | None, rows_per_file: int, out_fs: fsspec.AbstractFileSystem,
    out_root: str, skipped: SkippedInputs | None = None, part: Part = Part.whole(), input_root: str = "",
) -> Iterator[tuple[str, str]]:
    """The input listing as the shard plan takes it: ``iter_inputs`` (only ``part``'s own files),
    with every container not yet in the output's saved plan and holding more than
    ``rows_per_file`` rows given as one ``(ranged kind, uri)`` per range. Each call lists afresh
    (``skipped`` too)."""
    if skipped is not None:
        skipped.reset()
    inputs = iter_inputs(url, storage_options, skipped)
    if part.partitioned:
        inputs = ((kind, uri) for kind, uri in inputs if part.owns_input(uri, input_root))
    yield from split_containers(inputs, rows_per_file, storage_options, SavedPlan(out_fs, out_root, part.plan_name))


def split_containers(
    inputs: Iterable[tuple[str, str]], rows_per_file: int, storage_options: dict[str, Any] | None,
    planned: Callable[[str], bool] = lambda uri: False,
) -> Iterator[tuple[str, str]]:
    """``(kind, uri)`` as they come, but a tar or Parquet file with more than ``rows_per_file``
    rows (and not ``planned`` already) as ``(kind[start:stop], uri)`` for each range, in order."""
    for kind, uri in inputs:
        if kind == "image" or planned(uri):
            yield kind, uri
            continue
        rows = container_rows(kind, uri, storage_options, rows_per_file)
        if rows is None or rows <= rows_per_file:
            yield kind, uri
            continue
        for start in range(0, rows, rows_per_file):
            yield ranged_kind(kind, start, min(start + rows_per_file, rows)), uri


def container_rows(kind: str, uri: str, storage_options: dict[str, Any] | None, at_least: int = 0) -> int | None:
    """The rows a tar (image members) or Parquet file holds; None when it cannot be counted (a
    compressed or damaged file: it stays one shard and its read says what is wrong), or when it
    is too small in bytes to hold more than ``at_least`` rows (a tar: not worth a scan)."""
    fs, _ = open_fs(uri, storage_options)
    try:
        with open_input(fs, uri) as f:
            if kind == "parquet":
                return int(pq.ParquetFile(f).metadata.num_rows)
            if kind != "tar" or _size(f) <= at_least * TAR_BYTES_PER_MEMBER + 1024:
                return None
            with tarfile.open(fileobj=f, mode="r:") as tar:
                return sum(1 for _ in tar_image_members(tar))
    except Exception as exc:  # noqa: BLE001 - the read of the whole file reports it, in a row
        if is_transient(exc):
            raise
        return None


def _size(f: Any) -> int:
    size = getattr(f, "size", None)
    if isinstance(size, int):
        return size
    return os.fstat(f.fileno()).st_size


class SavedPlan:
    """Whether the output's saved plan holds a URI (read on the first question only: a listing
    without containers never reads it)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, plan_name: str):
        self.fs, self.path = fs, f"{root}/{plan_name}"
        self.planned: PlannedPaths | None = None
        self.loaded = False

    def __call__(self, uri: str) -> bool:
        if not self.loaded:
            self.loaded = True
            try:
                if self.fs.exists(self.path):
                    self.planned = PlannedPaths.of_plan(self.fs, self.path)
            except DamagedPlanError:  # rebuilt from the listing: nothing in it counts as planned
                self.planned = None
        if self.planned is None or not len(self.planned.digests):
            return False
        return not any(True for _ in self.planned.not_in([("", uri)]))
