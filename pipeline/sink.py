"""The Parquet sink: rows in, committed shards out, each exactly once.

A shard's rows arrive in any order and any batching. Full parts (``rows_per_file``
rows) are written under ``_inprogress/`` as they fill; when every row of the shard
has arrived, the parts are renamed to their final names and then the shard's
marker ``_done/<shard>.json`` is written. The marker, written last, is the commit:
on a rerun, shards with a marker are skipped and any other file of theirs is
deleted (see resume.py), so a kill at any moment leaves nothing half-counted.
Rows are de-duplicated by image_id within a shard, so a retried Ray task cannot
add a row twice.
"""
from __future__ import annotations

import json
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.schema import (
    DONE_DIR,
    METADATA_KEY,
    OUTPUT_SCHEMA,
    SHARD_ID,
    SHARD_ROWS,
    TIMING_COLUMNS,
    TMP_DIR,
    marker_name,
    part_name,
)


def error_kind(error: str) -> str:
    """The kind of an error string ``"<kind>: <detail>"``."""
    return error.split(":", 1)[0].strip() or "error"


@dataclass
class _OpenShard:
    seen: set[str] = field(default_factory=set)
    pending: list[pa.Table] = field(default_factory=list)
    pending_rows: int = 0
    total: int = -1
    parts: list[str] = field(default_factory=list)  # temp paths written so far
    rows: int = 0
    errors: Counter = field(default_factory=Counter)


class ShardSink:
    """Buffers rows per shard, writes bounded Parquet parts, commits finished shards."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        rows_per_file: int,
        metadata: dict[str, Any],
        compression: str = "zstd",
    ):
        self.fs = fs
        self.root = root.rstrip("/")
        self.rows_per_file = rows_per_file
        self.schema = OUTPUT_SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
        self.compression = compression
        self.open: dict[int, _OpenShard] = {}
        self.committed: list[int] = []
        self.rows = 0
        self.errors: Counter = Counter()
        self.stage_seconds: Counter = Counter()
        self.write_seconds = 0.0
        self.duplicates = 0
        self._first_batch: tuple[float, int] | None = None  # (arrival time, rows)
        self._last_arrival = 0.0

    # ------------------------------------------------------------------ intake
    def add(self, batch: pa.Table) -> None:
        """Take a batch of rows (output columns plus shard bookkeeping and timings)."""
        if batch.num_rows == 0:
            return
        now = time.perf_counter()
        if self._first_batch is None:
            self._first_batch = (now, batch.num_rows)
        self._last_arrival = now
        for col in TIMING_COLUMNS:
            if col in batch.column_names:
                self.stage_seconds[col] += float(pc.sum(batch.column(col)).as_py() or 0.0)
        shard_ids = batch.column(SHARD_ID).to_numpy()
        for shard_id in sorted(set(shard_ids.tolist())):
            rows = batch.filter(pc.equal(batch.column(SHARD_ID), shard_id))
            self._add_to_shard(int(shard_id), rows)

    def _add_to_shard(self, shard_id: int, rows: pa.Table) -> None:
        shard = self.open.setdefault(shard_id, _OpenShard())
        total = int(pc.max(rows.column(SHARD_ROWS)).as_py())
        shard.total = max(shard.total, total)
        ids = rows.column("image_id").to_pylist()
        keep = [i for i, image_id in enumerate(ids) if image_id not in shard.seen]
        if len(keep) < len(ids):
            self.duplicates += len(ids) - len(keep)
            rows = rows.take(pa.array(keep, pa.int64()))
            ids = [ids[i] for i in keep]
        shard.seen.update(ids)
        if rows.num_rows:
            rows = rows.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
            for err in rows.column("error").to_pylist():
                if err is not None:
                    shard.errors[error_kind(err)] += 1
            shard.pending.append(rows)
            shard.pending_rows += rows.num_rows
            shard.rows += rows.num_rows
        while shard.pending_rows >= self.rows_per_file:
            self._write_part(shard_id, shard, self.rows_per_file)
        if shard.total >= 0 and len(shard.seen) >= shard.total:
            self._commit(shard_id, shard)

    # ------------------------------------------------------------------ output
    def _write_part(self, shard_id: int, shard: _OpenShard, nrows: int | None) -> None:
        table = pa.concat_tables(shard.pending)
        nrows = table.num_rows if nrows is None else nrows
        head, rest = table.slice(0, nrows), table.slice(nrows)
        path = f"{self.root}/{TMP_DIR}/{part_name(shard_id, len(shard.parts))}"
        start = time.perf_counter()
        self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with self.fs.open(path, "wb") as f:
            pq.write_table(head.replace_schema_metadata(self.schema.metadata), f, compression=self.compression)
        self.write_seconds += time.perf_counter() - start
        shard.parts.append(path)
        shard.pending = [rest] if rest.num_rows else []
        shard.pending_rows = rest.num_rows

    def _commit(self, shard_id: int, shard: _OpenShard) -> None:
        if shard.pending_rows or not shard.parts and shard.rows:
            self._write_part(shard_id, shard, None)
        start = time.perf_counter()
        final = []
        for tmp in shard.parts:
            dest = f"{self.root}/{posixpath.basename(tmp)}"
            self.fs.mv(tmp, dest)
            final.append(posixpath.basename(dest))
        marker = {
            "shard_id": shard_id,
            "rows": shard.rows,
            "errors": dict(shard.errors),
            "files": final,
            "committed_at": time.time(),
        }
        write_marker(self.fs, self.root, shard_id, marker)
        self.write_seconds += time.perf_counter() - start
        self.rows += shard.rows
        self.errors.update(shard.errors)
        self.committed.append(shard_id)
        del self.open[shard_id]

    def steady_rate(self) -> float:
        """Rows/s from the first batch's arrival to the last's: throughput without start-up."""
        if self._first_batch is None or self._last_arrival <= self._first_batch[0]:
            return 0.0
        return (self.rows - self._first_batch[1]) / (self._last_arrival - self._first_batch[0])

    def incomplete(self) -> dict[int, tuple[int, int]]:
        """Shards still open: {shard_id: (rows seen, rows expected or -1)}."""
        return {sid: (len(s.seen), s.total) for sid, s in self.open.items()}


def write_marker(fs: fsspec.AbstractFileSystem, root: str, shard_id: int, marker: dict[str, Any]) -> None:
    """Write a shard's completion marker (the commit point of the shard)."""
    path = f"{root.rstrip('/')}/{DONE_DIR}/{marker_name(shard_id)}"
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(marker, f)
