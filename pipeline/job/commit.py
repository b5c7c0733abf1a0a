"""The driver side of the sink: part records in, shards committed, each exactly once.

The driver never sees a label row. It reads the writers' part records
(pipeline/job/sink.py, RECORD_SCHEMA: about 100 bytes + 8 per row) and keeps, per open
shard, the set of row hashes seen and the spill parts that hold them. A part whose
rows were all seen already (a retried task) is dropped; when every row of a shard
is in, one ``finalize_shard`` Ray task makes the shard's files under ``_staged/<shard>/``
(where no reader looks), and the driver writes the shard's marker ``_done/<shard>.json``
(atomically; it names the files and the generation), which is the commit, then moves
the files to the output root (resume.publish). A rerun skips shards with a marker,
finishes a move a kill cut short and deletes every other file (resume.clean_uncommitted).

``--retry-errors`` (generation g+1 of a committed shard): stage g+1, write marker g+1,
delete g's root files, move g+1 in. A plain reader of the root sees g, then neither
(a short window), then g+1, never both; our readers follow the marker (the staged copy
while the move has not happened).

Tests freeze the driver at a named moment with ``DIFFSEG_TEST_PAUSE_AT=<moment>[:<n>]``
(the n-th time it gets there, default 1; moments: ``before-marker``, ``after-marker``,
``after-old-removed``): it writes ``DIFFSEG_TEST_PAUSE_FILE`` and sleeps. Unset, it costs nothing.

Interface (what ``label()`` uses)::

    committer = Committer(fs, root, OutputLocation(url, storage_options), rows_per_file, metadata, policy)
    committer.expect(shard_id)                      # every shard of this run (before or while records flow)
    for records in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        committer.add(records)                      # may raise CommitError (full / read-only output)
    committer.finish()                              # waits for the last commits; empty shards get markers
    committer.committed, .failed, .incomplete(), .rows, .errors, .stage_seconds, ...
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from pipeline.data.retry import (
    RetryPolicy,
    call_with_retries,
    describe,
    is_transient,
    storage_refusal,
)
from pipeline.data.resume import publish
from pipeline.data.schema import DONE_DIR, STAGED_DIR, TIMING_COLUMNS, TMP_DIR, marker_name
from pipeline.data.storage import remove, write_json
from pipeline.job.provenance import ProvenanceCheck, ProvenanceError
from pipeline.job.sink import OutputLocation, finalize_shard

logger = logging.getLogger(__name__)
MAX_FINALIZE_IN_FLIGHT = 16


_PAUSES: dict[str, int] = {}


def pause_point(moment: str, shard_id: int) -> None:
    """Test hook (see the module doc): freeze the driver here when DIFFSEG_TEST_PAUSE_AT names ``moment``."""
    want = os.environ.get("DIFFSEG_TEST_PAUSE_AT")
    if not want:
        return
    name, _, nth = want.partition(":")
    if name != moment:
        return
    _PAUSES[moment] = _PAUSES.get(moment, 0) + 1
    if _PAUSES[moment] != int(nth or 1):
        return
    with open(os.environ["DIFFSEG_TEST_PAUSE_FILE"], "w") as f:
        json.dump({"moment": moment, "shard_id": shard_id}, f)
    while True:
        time.sleep(3600)


class CommitError(RuntimeError):
    """The output refuses writes (full, read-only, forbidden): the run must stop. One sentence."""


@dataclass
class _OpenShard:
    total: int = -1
    seen: set[int] = field(default_factory=set)
    parts: dict[str, int] = field(default_factory=dict)  # spill file -> rows
    garbage: set[str] = field(default_factory=set)  # duplicate spill files under another name
    errors: Counter = field(default_factory=Counter)
    node_rows: Counter = field(default_factory=Counter)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # what its workers ran with (provenance)
    failure: str | None = None
    submitted: bool = False


@dataclass
class _Expected:
    replace: dict[str, Any] | None = None  # --retry-errors: {"marker": committed marker, "drop": [image ids]}


def write_marker(
    fs: fsspec.AbstractFileSystem, root: str, shard_id: int, marker: dict[str, Any], policy: RetryPolicy | None = None
) -> None:
    """Write a shard's completion marker (the commit point of the shard), atomically."""
    write_json(fs, f"{root.rstrip('/')}/{DONE_DIR}/{marker_name(shard_id)}", marker, policy=policy)


class Committer:
    """Turns part records into committed shards. See the module doc for the protocol."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        output: OutputLocation,
        rows_per_file: int,
        metadata: dict[str, Any],
        policy: RetryPolicy | None = None,
        max_in_flight: int = MAX_FINALIZE_IN_FLIGHT,
        provenance: ProvenanceCheck | None = None,
    ):
        self.fs = fs
        self.root = root.rstrip("/")
        self.output = output
        self.rows_per_file = rows_per_file
        self.metadata = json.dumps(metadata, sort_keys=True).encode()
        self.policy = policy or RetryPolicy()
        self.max_in_flight = max_in_flight
        self.provenance = provenance  # None: records are not checked (benchmarks of the sink alone)
        self.expected: dict[int, _Expected] = {}
        self.open: dict[int, _OpenShard] = {}
        self.committed: list[int] = []
        self._committed_ids: set[int] = set()  # the same, for lookups per record
        self.failed: dict[int, str] = {}  # shard -> why it stays uncommitted (storage unreachable)
        self.rows = 0  # rows committed by this run
        self.replaced = 0  # committed error rows replaced (--retry-errors)
        self.errors: Counter = Counter()
        self.stage_seconds: Counter = Counter()
        self.write_seconds = 0.0  # workers: spill writes + finalize
        self.driver_seconds = 0.0  # CPU seconds of this process's thread in here (records, submissions, markers)
        self.duplicates = 0
        self.records = 0
        self._in_flight: dict[Any, int] = {}  # finalize ObjectRef -> shard id
        self._first: tuple[float, int] | None = None
        self.pipeline_cpu = 0.0  # set by the driver loop: this process's CPU (all threads) over the stream
        self.memory_releases = 0  # set by the driver loop: times it handed freed memory back (free_memory.py)
        self._last_arrival = 0.0
        self._arrived = 0
        self.rows_in = 0  # rows the writers reported so far, each once (a progress display's count)
        self._sized_rows = 0  # the rows of the shards whose size is known so far, and how many they are
        self._sized_shards = 0

    # ------------------------------------------------------------------ intake
    def expect(self, shard_id: int, replace: dict[str, Any] | None = None) -> None:
        """Announce a shard of this run (``replace``: {"marker": its marker, "drop": [image ids]} to
        rewrite a committed shard, replacing those rows with the ones this run makes)."""
        self.expected[shard_id] = _Expected(replace)

    def add(self, records: pa.Table) -> None:
        """Take a batch of part records; commits the shards they complete."""
        start = time.thread_time()
        try:
            if records.num_rows:
                now = time.perf_counter()
                rows = int(np.sum(records.column("rows").to_numpy()))
                if self._first is None:
                    self._first = (now, rows)
                self._last_arrival = now
                self._arrived += rows
                self.records += records.num_rows
                for record in records.to_pylist():
                    self._add_record(record)
            self._poll(block=False)
        finally:
            self.driver_seconds += time.thread_time() - start

    def _add_record(self, rec: dict[str, Any]) -> None:
        shard_id = int(rec["shard_id"])
        if shard_id in self._committed_ids:  # a task re-run after its shard committed (a lost node's lineage)
            if not rec["failure"]:
                self.duplicates += int(rec["rows"])
            return
        shard = self.open.setdefault(shard_id, _OpenShard())
        if self.provenance is not None:  # before anything of the record counts: a mismatch stops the run
            try:
                reports = self.provenance.check(rec.get("provenance"), shard_id)
            except ProvenanceError as exc:
                raise CommitError(str(exc)) from None
            for report in reports:
                shard.reports.setdefault(json.dumps(report, sort_keys=True), report)
        for col in (*TIMING_COLUMNS, "_t_write"):
            value = rec.get(col) or 0.0
            if col == "_t_write":
                self.write_seconds += value
            elif value:
                self.stage_seconds[col] += value
        if rec["failure"]:
            if rec["fatal"]:
                raise CommitError(self._refused(rec["failure"]))
            shard.failure = shard.failure or rec["failure"]
            return
        hashes = np.frombuffer(rec["row_hashes"], dtype="<u8").tolist()
        fresh = [h for h in hashes if h not in shard.seen]
        if len(fresh) < len(hashes) or len(set(fresh)) < len(fresh):
            if not fresh:  # a retried task wrote these rows again
                self.duplicates += len(hashes)
            else:  # cannot be assembled exactly once from these parts: this run leaves the shard
                shard.failure = shard.failure or "rows arrived twice in differently cut parts"
            if rec["file"] and rec["file"] not in shard.parts:
                shard.garbage.add(rec["file"])
            return
        shard.seen.update(fresh)
        self.rows_in += len(fresh)
        total = max(shard.total, int(rec["shard_rows"]))
        if total != shard.total:
            self._sized_rows += total - max(shard.total, 0)
            self._sized_shards += shard.total < 0
        shard.total = total
        shard.parts[rec["file"]] = int(rec["rows"])
        shard.errors.update(json.loads(rec["errors"] or "{}"))
        if rec.get("node_id"):
            shard.node_rows[rec["node_id"]] += len(hashes)
        if shard.total >= 0 and len(shard.seen) >= shard.total and not shard.failure and not shard.submitted:
            self._submit(shard_id, shard)

    # ------------------------------------------------------------------ commit
    def _submit(self, shard_id: int, shard: _OpenShard) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        while len(self._in_flight) >= self.max_in_flight:
            self._poll(block=True)
        expected = self.expected.get(shard_id) or _Expected()
        replace = None
        if expected.replace:
            marker = expected.replace["marker"]
            replace = {"files": list(marker.get("files", [])), "generation": int(marker.get("generation", 0)) + 1,
                       "drop": list(expected.replace.get("drop", []))}
        options: dict[str, Any] = {}
        if shard.node_rows:  # run where most of the rows were written (soft: anywhere if that node is gone)
            node = shard.node_rows.most_common(1)[0][0]
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
        ref = _finalize_task().options(**options).remote(
            self.output, shard_id, sorted(shard.parts), self.rows_per_file, self.metadata, self.policy, replace,
        )
        self._in_flight[ref] = shard_id
        shard.submitted = True

    def _poll(self, block: bool) -> None:
        if not self._in_flight:
            return
        import ray

        refs = list(self._in_flight)
        ready, _ = ray.wait(refs, num_returns=1 if block else len(refs), timeout=None if block else 0)
        for ref in ready:
            shard_id = self._in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError:
                raise  # a bug in finalize_shard: stop loudly
            except ray.exceptions.RayError as exc:  # its worker or node died past the retries
                self.failed[shard_id] = f"the commit task was lost: {describe(exc)}"
                continue
            self._committed(shard_id, result)

    def _committed(self, shard_id: int, result: dict[str, Any]) -> None:
        """A finalize task came back: write the marker (the commit) or record why not."""
        shard = self.open[shard_id]
        self.write_seconds += float(result.get("seconds", 0.0))
        if result.get("failure"):
            if result.get("fatal"):
                raise CommitError(self._refused(result["failure"]))
            self.failed[shard_id] = result["failure"]
            return
        expected = self.expected.get(shard_id) or _Expected()
        old = expected.replace["marker"] if expected.replace else None
        marker: dict[str, Any] = {
            "shard_id": shard_id,
            "rows": int(result["rows"]) if old else len(shard.seen),
            "errors": dict(result["errors"]) if old else dict(shard.errors),
            "files": list(result["files"]),
            "committed_at": time.time(),
        }
        if shard.reports:  # what the workers that made these rows reported they ran with
            marker["provenance"] = sorted(shard.reports.values(), key=lambda r: json.dumps(r, sort_keys=True))
        marker["generation"] = int(old.get("generation", 0)) + 1 if old else 0
        pause_point("before-marker", shard_id)
        try:
            write_marker(self.fs, self.root, shard_id, marker, self.policy)
        except Exception as exc:  # noqa: BLE001
            self._storage_failure(shard_id, exc, "writing its marker")
            return
        pause_point("after-marker", shard_id)
        published = True
        if old:  # the new marker is the commit; the old generation's files go before the new ones come in
            stale = [f"{self.root}/{f}" for f in old.get("files", []) if f not in marker["files"]]
            try:
                call_with_retries(remove, self.fs, stale, policy=self.policy)
            except Exception as exc:  # noqa: BLE001 - the next run removes them, then moves the new ones in
                logger.warning("could not delete replaced files of shard %d: %s", shard_id, describe(exc))
                published = False
            pause_point("after-old-removed", shard_id)
            self.replaced += len(shard.seen)
        if published:
            try:
                publish(self.fs, self.root, shard_id, marker["files"], self.policy)
            except Exception as exc:  # noqa: BLE001 - committed; our readers read the staged copy, a rerun moves it
                logger.warning("shard %d is committed but its files are still staged (%s); the next run moves "
                               "them to the output root", shard_id, describe(exc))
        self.rows += len(shard.seen)
        self.errors.update(shard.errors)
        self._mark_committed(shard_id)
        if shard.garbage:
            try:
                remove(self.fs, [f"{self.root}/{f}" for f in shard.garbage])
            except Exception:  # noqa: BLE001 - under _inprogress/: the next run removes it
                pass
        del self.open[shard_id]

    def _storage_failure(self, shard_id: int, exc: BaseException, doing: str) -> None:
        refusal = storage_refusal(exc)
        if refusal:
            raise CommitError(self._refused(f"{refusal} ({doing} for shard {shard_id}: {describe(exc)})"))
        if not is_transient(exc):
            raise exc
        self.failed[shard_id] = f"storage unavailable: {describe(exc)} ({doing})"

    def _refused(self, failure: str) -> str:
        return (f"Cannot write the output {self.output.url!r}: {failure}; free space or fix its permissions, "
                "then rerun the same command to resume.")

    def finish(self) -> None:
        """After the stream ended: wait for the last commits; shards that sent no row get an empty marker."""
        start = time.thread_time()
        try:
            while self._in_flight:
                self._poll(block=True)
            for shard_id, expected in self.expected.items():
                if shard_id in self.open or shard_id in self.failed or expected.replace:
                    continue
                if shard_id in self._committed_ids:
                    continue
                marker = {"shard_id": shard_id, "rows": 0, "errors": {}, "files": [], "committed_at": time.time()}
                try:
                    write_marker(self.fs, self.root, shard_id, marker, self.policy)
                except Exception as exc:  # noqa: BLE001
                    self._storage_failure(shard_id, exc, "writing its marker")
                    continue
                self._mark_committed(shard_id)
            for shard_id, shard in self.open.items():
                if shard.failure and shard_id not in self.failed:
                    self.failed[shard_id] = shard.failure
            self._remove_leftover_spill()
            if not self.open:
                for folder in (TMP_DIR, STAGED_DIR):
                    try:
                        self.fs.rmdir(f"{self.root}/{folder}")  # only when empty
                    except (OSError, NotImplementedError):
                        pass
        finally:
            self.driver_seconds += time.thread_time() - start

    def _mark_committed(self, shard_id: int) -> None:
        self.committed.append(shard_id)
        self._committed_ids.add(shard_id)

    def _remove_leftover_spill(self) -> None:
        """Delete spill folders of shards this run committed: a task Ray re-ran after its shard
        committed (a lost node's work rebuilt from lineage) writes its spill part again."""
        try:
            folders = self.fs.ls(f"{self.root}/{TMP_DIR}", detail=False)
        except FileNotFoundError:
            return
        except Exception as exc:  # noqa: BLE001 - under _inprogress/: the next run removes them
            logger.warning("could not list %s/%s: %s (the next run cleans it)", self.root, TMP_DIR, describe(exc))
            return
        for folder in folders:
            name = posixpath.basename(folder.rstrip("/"))
            if name.isdigit() and int(name) in self._committed_ids:
                try:
                    self.fs.rm(folder, recursive=True)
                except Exception as exc:  # noqa: BLE001
                    logger.warning("could not delete %s: %s (the next run does)", folder, describe(exc))

    # ------------------------------------------------------------------ reports
    def incomplete(self) -> dict[int, tuple[int, int]]:
        """Shards that did not get all their rows and did not fail: {shard_id: (rows seen, rows expected or -1)}."""
        return {sid: (len(s.seen), s.total) for sid, s in self.open.items() if sid not in self.failed}

    def expected_rows(self) -> tuple[int | None, bool]:
        """The rows this run expects, and whether that is exact, for a progress display.

        A shard's size is known once its first record is in (a tar or Parquet shard's with its
        last): until every shard's is, the others are taken to be of the known ones' mean size
        (image folders cut shards of ``rows_per_file`` but the last). None before any is known.
        Only counters are read: safe from another thread.
        """
        sized, rows, shards = self._sized_shards, self._sized_rows, len(self.expected)
        if not sized:
            return None, False
        if sized >= shards:
            return rows, True
        return round(rows + (shards - sized) * rows / sized), False

    def steady_rate(self) -> float:
        """Rows/s from the first record's arrival to the last's: throughput without start-up."""
        if self._first is None or self._last_arrival <= self._first[0]:
            return 0.0
        return (self._arrived - self._first[1]) / (self._last_arrival - self._first[0])


_FINALIZE = None


def _finalize_task():
    """``finalize_shard`` as a Ray task: no CPU reserved (a rename, or one shard's merge), retried if its worker dies."""
    global _FINALIZE
    if _FINALIZE is None:
        import ray

        _FINALIZE = ray.remote(num_cpus=0, max_retries=3)(finalize_shard)
    return _FINALIZE

