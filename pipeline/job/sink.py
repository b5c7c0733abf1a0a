"""The worker side of the Parquet sink: label rows become files on the node that made them.

``write_rows`` is the last stage of the Ray Data plan. Each batch it gets (rows of
any shards, in any order) is split by shard and written as one *spill part* per
shard under ``_inprogress/<shard>/``: an uncompressed Arrow IPC file (writing and
reading it back cost next to nothing; zstd is paid once, in the final file), named
by a digest of its image ids, so a retried task rewrites the same file instead of
adding a second one. What leaves the worker is one small *part record* per spill
part (RECORD_SCHEMA: shard id, file, row count, 8-byte hashes of the image ids,
error counts, stage seconds); the label bytes never travel to the driver.

``finalize_shard`` runs as a Ray task once the driver has seen every row of a
shard: it streams the spill parts into the shard's files
``labels-<shard>-<part>.parquet`` (zstd, the run's key-value metadata, at most
``rows_per_file`` rows each), *staged* under ``_staged/<shard>/`` where no reader
looks, and returns their names. The driver then writes the shard's marker, the
commit, and moves the files to the output root (pipeline/job/commit.py).

Storage faults never raise out of here (a raise would fail the whole Ray Data
job): transient ones are retried (pipeline/data/retry.py), and a fault that persists
comes back in the record as ``failure`` (``fatal`` for a full or read-only disk).
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.retry import (
    UNAVAILABLE,
    RetryPolicy,
    call_with_retries,
    describe,
    is_transient,
    storage_refusal,
)
from pipeline.data.schema import (
    METADATA_KEY,
    SHARD_ID,
    SHARD_ROWS,
    TIMING_COLUMNS,
    as_output,
    part_name,
    spill_dir,
    staged_path,
)
from pipeline.data.storage import remove, write_bytes
from pipeline.job.provenance import COLUMNS as PROVENANCE, STAGES, fold

COMPRESSION = "zstd"

# One record per spill part: all the driver ever receives from the writers.
RECORD_SCHEMA = pa.schema([
    ("shard_id", pa.int64()),
    ("shard_rows", pa.int64()),  # rows in the shard; -1 while the reader does not know yet
    ("file", pa.string()),  # spill part, relative to the output root; null when nothing was written
    ("rows", pa.int64()),  # rows in the batch for this shard (written or not)
    ("row_hashes", pa.binary()),  # 8 bytes per row: blake2b of the image id (duplicates, retries)
    ("errors", pa.string()),  # JSON {error kind: rows}
    ("bytes", pa.int64()),
    ("failure", pa.string()),  # why these rows were not written (storage), else null
    ("fatal", pa.bool_()),  # the failure is a full / read-only / forbidden output: stop the run
    ("node_id", pa.string()),
    ("provenance", pa.string()),  # what the rows' workers ran with (pipeline/job/provenance.py), JSON
    *[(col, pa.float64()) for col in TIMING_COLUMNS],
    ("_t_write", pa.float64()),
])


def error_kind(error: str) -> str:
    """The kind of an error string ``"<kind>: <detail>"``."""
    return error.split(":", 1)[0].strip() or "error"


@dataclass(frozen=True)
class OutputLocation:
    """Where the output lives, as workers reach it: URL + fsspec options."""

    url: str
    storage_options: dict[str, Any] | None = None

    def open(self):
        """(filesystem, root path without protocol)."""
        return _open(self.url, json.dumps(self.storage_options or {}, sort_keys=True))


@lru_cache(maxsize=8)
def _open(url: str, options: str):
    from pipeline.data.sources import open_fs

    fs, root = open_fs(url, json.loads(options) or None)
    return fs, root.rstrip("/") or root


def row_hashes(image_ids: list[str]) -> bytes:
    """8 bytes per id (blake2b): compact identities the driver de-duplicates rows by."""
    return b"".join(hashlib.blake2b(i.encode(), digest_size=8).digest() for i in image_ids)


def parquet_bytes(table: pa.Table, metadata: bytes) -> bytes:
    """A whole Parquet file in memory (written in one PUT, so it is atomic on object stores too)."""
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: metadata}), buf, compression=COMPRESSION)
    return buf.getvalue()


def ipc_bytes(table: pa.Table) -> bytes:
    """A spill part: the rows as one uncompressed Arrow IPC file, in memory (one PUT)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside Ray (benchmarks, tests)
        return None


def write_rows(batch: pa.Table, *, output: OutputLocation, metadata: bytes, policy: RetryPolicy) -> pa.Table:
    """Ray Data stage: output rows (+ ``_shard_id``, ``_shard_rows``, timings) -> spill parts -> part records."""
    fs, root = output.open()
    records: list[dict[str, Any]] = []
    if batch.num_rows:
        shard_col = batch.column(SHARD_ID)
        shard_ids = sorted(set(shard_col.to_pylist()))
        for shard_id in shard_ids:
            rows = batch if len(shard_ids) == 1 else batch.filter(pc.equal(shard_col, shard_id))
            records.append(_write_shard_rows(fs, root, int(shard_id), rows, metadata, policy))
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


def _write_shard_rows(fs, root: str, shard_id: int, rows: pa.Table, metadata: bytes, policy: RetryPolicy) -> dict:
    start = time.perf_counter()
    ids = rows.column("image_id").to_pylist()
    hashes = row_hashes(ids)
    errors = Counter(error_kind(e) for e in rows.column("error").to_pylist() if e is not None)
    record: dict[str, Any] = {
        "shard_id": shard_id,
        "shard_rows": int(pc.max(rows.column(SHARD_ROWS)).as_py()),
        "file": None, "rows": rows.num_rows, "row_hashes": hashes, "errors": json.dumps(dict(errors)),
        "bytes": 0, "failure": None, "fatal": False, "node_id": _node_id(),
        "provenance": fold(v for stage in STAGES if PROVENANCE[stage] in rows.column_names
                           for v in pc.unique(rows.column(PROVENANCE[stage])).to_pylist()),
    }
    for col in TIMING_COLUMNS:
        record[col] = float(pc.sum(rows.column(col)).as_py() or 0.0) if col in rows.column_names else 0.0
    if errors.get(UNAVAILABLE):
        # Storage was unreachable for some rows even after retrying: this shard cannot be
        # committed in this run, so its other rows are not written either.
        first = next(e for e in rows.column("error").to_pylist() if e is not None and e.startswith(UNAVAILABLE))
        record["failure"] = first
    else:
        rel = f"{spill_dir(shard_id)}/{hashlib.blake2b(b''.join(sorted(_chunks(hashes))), digest_size=8).hexdigest()}.arrow"
        try:
            data = ipc_bytes(as_output(rows))
            call_with_retries(write_bytes, fs, f"{root}/{rel}", data, policy=policy)
            record["file"], record["bytes"] = rel, len(data)
        except Exception as exc:  # noqa: BLE001 - storage faults come back in the record
            record.update(_failure(exc, f"writing {rel}"))
    record["_t_write"] = time.perf_counter() - start
    return record


def _chunks(hashes: bytes) -> list[bytes]:
    return [hashes[i : i + 8] for i in range(0, len(hashes), 8)]


def _failure(exc: BaseException, doing: str) -> dict[str, Any]:
    refusal = storage_refusal(exc)
    if refusal:
        return {"failure": f"{refusal} ({doing}: {describe(exc)})", "fatal": True}
    if is_transient(exc):
        return {"failure": f"{UNAVAILABLE}: {describe(exc)} ({doing})", "fatal": False}
    raise exc  # a bug, not storage: let Ray Data report it


def finalize_shard(
    output: OutputLocation,
    shard_id: int,
    parts: list[str],
    rows_per_file: int,
    metadata: bytes,
    policy: RetryPolicy,
    replace: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Turn a shard's spill parts into its staged files; returns {files, bytes[, rows, errors]} or a failure.

    ``replace`` (``--retry-errors``): {"files": the shard's committed files, "generation": g,
    "drop": image ids}: rows of those files whose image id is in ``drop`` or in the spill
    parts are replaced by the new rows,
    and everything is written as generation ``g`` (new names; after writing the new marker the
    driver deletes the old files, then moves the new ones in).
    """
    start = time.perf_counter()
    fs, root = output.open()
    try:
        result = _merge(fs, root, shard_id, parts, rows_per_file, metadata, policy, replace)
        _remove_spill(fs, root, shard_id, policy)
        result.update(shard_id=shard_id, seconds=time.perf_counter() - start)
        return result
    except Exception as exc:  # noqa: BLE001
        result = _failure(exc, f"committing shard {shard_id}")
        result.update(shard_id=shard_id, seconds=time.perf_counter() - start)
        return result


def _read_table(fs, path: str, policy: RetryPolicy) -> pa.Table:
    """A spill part (Arrow IPC) or a committed file (Parquet), read whole."""
    data = call_with_retries(fs.cat_file, path, policy=policy)
    if path.endswith(".arrow"):
        return pa.ipc.open_file(pa.BufferReader(data)).read_all()
    return pq.read_table(pa.BufferReader(data))


def _merge(
    fs, root: str, shard_id: int, parts: list[str], rows_per_file: int, metadata: bytes, policy: RetryPolicy,
    replace: dict[str, Any] | None,
) -> dict[str, Any]:
    """Stream the parts (old files first when replacing) into files of at most ``rows_per_file`` rows."""
    generation = int(replace["generation"]) if replace else 0
    new_ids: set[str] = set(replace.get("drop", [])) if replace else set()
    sources: list[tuple[str, bool]] = [(f"{root}/{p}", False) for p in sorted(parts)]
    if replace:
        for path, _ in sources:
            new_ids.update(_read_table(fs, path, policy).column("image_id").to_pylist())
        sources = [(f"{root}/{name}", True) for name in replace["files"]] + sources
    files: list[str] = []
    total_bytes = 0
    rows = 0
    errors: Counter = Counter()
    pending: list[pa.Table] = []
    pending_rows = 0

    def flush(n: int) -> None:
        nonlocal pending, pending_rows, total_bytes
        table = pa.concat_tables(pending)
        head, rest = table.slice(0, n), table.slice(n)
        name = part_name(shard_id, len(files), generation)
        data = parquet_bytes(head, metadata)
        call_with_retries(write_bytes, fs, f"{root}/{staged_path(shard_id, name)}", data, policy=policy)
        files.append(name)
        total_bytes += len(data)
        pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    for path, is_old in sources:
        table = as_output(_read_table(fs, path, policy))
        if is_old and new_ids:
            keep = pc.invert(pc.is_in(table.column("image_id"), value_set=pa.array(sorted(new_ids), pa.string())))
            table = table.filter(keep)
        rows += table.num_rows
        errors.update(error_kind(e) for e in table.column("error").to_pylist() if e is not None)
        pending.append(table)
        pending_rows += table.num_rows
        while pending_rows >= rows_per_file:
            flush(rows_per_file)
    if pending_rows or not files:
        flush(pending_rows)
    return {"files": files, "bytes": total_bytes, "rows": rows, "errors": dict(errors)}


def _remove_spill(fs, root: str, shard_id: int, policy: RetryPolicy) -> None:
    folder = f"{root}/{spill_dir(shard_id)}"
    try:
        leftovers = call_with_retries(fs.ls, folder, detail=False, policy=policy)
    except FileNotFoundError:
        return
    call_with_retries(remove, fs, list(leftovers), policy=policy)
    try:
        fs.rmdir(folder)
    except (OSError, NotImplementedError):
        pass

