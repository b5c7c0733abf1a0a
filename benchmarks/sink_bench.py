"""The commit path (workers write, the driver commits) against a bare Parquet write loop.

Rows are realistic label rows: 512 x 512 PNG label maps with 20 segments whose
boundaries are warped like upsampled attention proposals (distinct bytes per row),
plus their segments column, cut into model-sized blocks (``--batch-rows``) of
shards of ``--rows-per-file`` rows: what the encode stage hands the writer.
Measured in one run, on the same rows:

- bare: one process, ``pyarrow.parquet.write_table`` (zstd) of each shard's rows
  to one file: the floor of writing these bytes at all;
- commit path at 1, 2 and 4 writer processes: a Ray Data dataset of the blocks ->
  ``write_rows`` (spill parts, ``TaskPoolStrategy(size=W)``, batched like the
  pipeline's encode + write stage) -> part records -> ``Committer`` in this process
  (finalize tasks, markers): what ``diffseg label`` runs after the encode stage;
- driver path (before): the same blocks through a pass-through task stage (the
  encode stage both designs have) and pulled into this process with
  ``iter_batches`` and written here, as the driver did before workers wrote.

- worker side alone: ``write_rows`` + ``finalize_shard`` called in one process
  without Ray: a writer process's own cost per row (spill part, merge, zstd);
- Ray Data alone: the same dataset and task stage writing nothing (one tiny record
  per task): what orchestrating these tasks costs the driver whatever they do.

Reported: rows/s, MB/s (label-row bytes), the ratio to bare, and this process's
CPU seconds per 10,000 rows (``time.process_time``: every thread of the driver,
Ray Data's executor included; setup excluded), and of that the time spent in the
Committer itself (records, finalize submissions, markers).

  python benchmarks/sink_bench.py                   # 4,000 rows, shards of 500, blocks of 8
  python benchmarks/sink_bench.py --rows 20000 --writers 1 2 4 8
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def label_geometry(rng, size: int, segments: int):
    """A (size, size) map of ``segments`` regions with warped boundaries."""
    import numpy as np
    from scipy import ndimage

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    warp = ndimage.zoom(rng.normal(0, 1, (2, 24, 24)).astype(np.float32), (1, size / 24, size / 24), order=3)
    seeds = rng.uniform(0, size, (segments, 2)).astype(np.float32)
    py, px = yy + 30 * warp[0], xx + 30 * warp[1]
    best = np.zeros((size, size), np.int64)
    dist = np.full((size, size), np.inf, np.float32)
    for k, (sy, sx) in enumerate(seeds):
        d = (py - sy) ** 2 + (px - sx) ** 2
        closer = d < dist
        best[closer], dist[closer] = k, d[closer]
    return best


def make_blocks(rows: int, rows_per_shard: int, batch_rows: int, size: int, distinct: int, seed: int = 0):
    """Blocks of ``batch_rows`` output rows (+ shard bookkeeping), and their label-row bytes."""
    import numpy as np
    import pyarrow as pa

    from pipeline.data.encode import encode_label
    from pipeline.data.schema import OUTPUT_SCHEMA, SEGMENT, SHARD_ID, SHARD_ROWS

    rng = np.random.default_rng(seed)
    geometries = [label_geometry(rng, size, 20) for _ in range(max(1, distinct // 16))]
    encoded = []
    for i in range(distinct):  # distinct PNG bytes: a geometry with its segment ids permuted
        labels = rng.permutation(20)[geometries[i % len(geometries)]]
        encoded.append(encode_label(labels, rle=False))
    blocks, nbytes = [], 0
    for start in range(0, rows, batch_rows):
        idx = list(range(start, min(rows, start + batch_rows)))
        shard = [i // rows_per_shard for i in idx]
        total = [min(rows_per_shard, rows - s * rows_per_shard) for s in shard]
        png = [encoded[i % distinct] for i in idx]
        table = pa.table({
            "image_id": [f"img/{i:08d}.jpg" for i in idx], "source": [f"s3://b/img/{i:08d}.jpg" for i in idx],
            "width": pa.array([size] * len(idx), pa.int32()), "height": pa.array([size] * len(idx), pa.int32()),
            "label_map": pa.array([p[0] for p in png], pa.binary()),
            "num_segments": pa.array([p[1] for p in png], pa.int32()),
            "segments": pa.array([p[2] for p in png], pa.list_(SEGMENT)),
            "error": pa.array([None] * len(idx), pa.string()),
            SHARD_ID: pa.array(shard, pa.int64()), SHARD_ROWS: pa.array(total, pa.int64()),
            "_t_model": pa.array([0.01] * len(idx), pa.float64()),
        })
        nbytes += table.select(OUTPUT_SCHEMA.names).nbytes
        blocks.append(table)
    return blocks, nbytes


def bare(blocks, rows_per_shard: int, folder: Path) -> float:
    """Seconds for one process to write each shard's rows as one zstd Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.schema import OUTPUT_SCHEMA

    table = pa.concat_tables(blocks).select(OUTPUT_SCHEMA.names)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    for i, s in enumerate(range(0, table.num_rows, rows_per_shard)):
        pq.write_table(table.slice(s, rows_per_shard), folder / f"labels-{i:06d}-000.parquet", compression="zstd")
    return time.perf_counter() - start


def commit_path(
    ray, blocks, rows_per_shard: int, writers: int, folder: Path, check: bool = True
) -> tuple[float, float, float, int]:
    """(seconds, driver CPU seconds, of which in the Committer, shards committed) with ``writers`` processes.

    The writer stage batches like ``diffseg label``'s: min(rows per file, 64) rows a task."""
    import fsspec
    from ray.data import TaskPoolStrategy

    from pipeline.data.retry import RetryPolicy
    from pipeline.job.commit import Committer
    from pipeline.job.dataflow import ENCODE_BATCH_ROWS, drive
    from pipeline.job.sink import OutputLocation, write_rows

    folder.mkdir(parents=True)
    committer = Committer(fsspec.filesystem("file"), str(folder), OutputLocation(str(folder)), rows_per_shard,
                          {"bench": True}, RetryPolicy(deadline_s=10))
    shards = sorted({int(s) for b in blocks for s in b.column("_shard_id").to_pylist()})
    for shard_id in shards:
        committer.expect(shard_id)
    ds = ray.data.from_arrow(blocks).map_batches(
        write_rows, batch_size=min(rows_per_shard, ENCODE_BATCH_ROWS), batch_format="pyarrow", num_cpus=1,
        compute=TaskPoolStrategy(size=writers),
        fn_kwargs={"output": committer.output, "metadata": committer.metadata, "policy": committer.policy},
    )
    cpu, start = time.process_time(), time.perf_counter()
    drive(ds, committer)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if check:
        assert not committer.failed and not committer.incomplete(), (committer.failed, committer.incomplete())
    return seconds, cpu, committer.driver_seconds, len(committer.committed)


def _encode_stage(batch):
    """Stands for the encode stage that both designs run before the rows are written."""
    return batch


def worker_alone(blocks, rows_per_shard: int, folder: Path) -> float:
    """Seconds for the worker side alone in one process, no Ray: write_rows on batches as the
    pipeline cuts them, then finalize_shard per shard (the writers' own CPU per row)."""
    import pyarrow as pa

    from pipeline.data.retry import RetryPolicy
    from pipeline.job.dataflow import ENCODE_BATCH_ROWS
    from pipeline.job.sink import OutputLocation, finalize_shard, write_rows

    batch = min(rows_per_shard, ENCODE_BATCH_ROWS)
    table = pa.concat_tables(blocks)
    where, policy = OutputLocation(str(folder)), RetryPolicy(deadline_s=10)
    start = time.perf_counter()
    parts: dict[int, list[str]] = {}
    for s in range(0, table.num_rows, batch):
        for record in write_rows(table.slice(s, batch), output=where, metadata=b"{}", policy=policy).to_pylist():
            parts.setdefault(record["shard_id"], []).append(record["file"])
    for shard_id, files in parts.items():
        assert "failure" not in finalize_shard(where, shard_id, files, rows_per_shard, b"{}", policy)
    return time.perf_counter() - start


def _rows_seen(batch):
    """A writer that writes nothing: one tiny record per batch (Ray Data's own cost, alone)."""
    import pyarrow as pa

    return pa.table({"rows": [batch.num_rows]})


def orchestration_only(ray, blocks, rows_per_shard: int) -> tuple[float, float]:
    """(seconds, driver CPU seconds) of the same dataset with a stage that writes nothing."""
    from ray.data import TaskPoolStrategy

    from pipeline.job.dataflow import ENCODE_BATCH_ROWS

    ds = ray.data.from_arrow(blocks).map_batches(
        _rows_seen, batch_size=min(rows_per_shard, ENCODE_BATCH_ROWS), batch_format="pyarrow", num_cpus=1,
        compute=TaskPoolStrategy(size=1),
    )
    cpu, start = time.process_time(), time.perf_counter()
    rows = sum(int(b.column("rows")[0].as_py()) for b in ds.iter_batches(batch_size=1, batch_format="pyarrow"))
    assert rows == sum(b.num_rows for b in blocks)
    return time.perf_counter() - start, time.process_time() - cpu


def driver_path(ray, blocks, rows_per_shard: int, folder: Path) -> tuple[float, float]:
    """(seconds, driver CPU seconds) when every row comes to this process and is written here."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data import TaskPoolStrategy

    from pipeline.data.schema import OUTPUT_SCHEMA
    from pipeline.job.dataflow import ENCODE_BATCH_ROWS

    folder.mkdir(parents=True)
    ds = ray.data.from_arrow(blocks).map_batches(
        _encode_stage, batch_size=min(rows_per_shard, ENCODE_BATCH_ROWS), batch_format="pyarrow", num_cpus=1,
        compute=TaskPoolStrategy(size=1),
    )
    pending: dict[int, list] = {}
    cpu, start = time.process_time(), time.perf_counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for shard_id in set(batch.column("_shard_id").to_pylist()):
            rows = batch.filter(pa.compute.equal(batch.column("_shard_id"), shard_id))
            pending.setdefault(shard_id, []).append(rows)
            if sum(t.num_rows for t in pending[shard_id]) == rows.column("_shard_rows")[0].as_py():
                table = pa.concat_tables(pending.pop(shard_id)).select(OUTPUT_SCHEMA.names)
                pq.write_table(table, folder / f"labels-{shard_id:06d}-000.parquet", compression="zstd")
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--rows-per-file", type=int, default=500)
    parser.add_argument("--batch-rows", type=int, default=8, help="rows per block reaching the writer")
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--distinct", type=int, default=512, help="distinct label maps (cycled)")
    parser.add_argument("--folder", default=None, help="where to write (default: a temp dir on local disk)")
    args = parser.parse_args()

    import ray

    t = time.perf_counter()
    blocks, nbytes = make_blocks(args.rows, args.rows_per_file, args.batch_rows, args.size, args.distinct)
    mb = nbytes / 1e6
    print(f"{args.rows} rows, {nbytes / args.rows / 1e3:.1f} KB a row ({mb:.0f} MB), shards of "
          f"{args.rows_per_file}, blocks of {args.batch_rows} rows; made in {time.perf_counter() - t:.0f} s; "
          f"{os.cpu_count()} CPUs")
    root = Path(tempfile.mkdtemp(prefix="sink-bench-", dir=args.folder))
    results = []
    try:
        seconds = bare(blocks, args.rows_per_file, root / "bare")
        base = args.rows / seconds
        results.append({"path": "bare write_table loop (1 process)", "rows_per_s": base, "mb_per_s": mb / seconds,
                        "ratio": 1.0, "driver_cpu_s_per_10k": None})
        worker_alone(blocks[:8], args.rows_per_file, root / "warm-worker")
        seconds = worker_alone(blocks, args.rows_per_file, root / "worker")
        results.append({"path": "worker side alone (1 process, no Ray)", "rows_per_s": args.rows / seconds,
                        "mb_per_s": mb / seconds, "ratio": args.rows / seconds / base, "driver_cpu_s_per_10k": None})
        ray.init(num_cpus=max(args.writers), include_dashboard=False, log_to_driver=False,
                 object_store_memory=max(2 * nbytes, 500 * 2**20))
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        orchestration_only(ray, blocks[:2], args.rows_per_file)
        seconds, cpu = orchestration_only(ray, blocks, args.rows_per_file)
        results.append({"path": "Ray Data alone (the same tasks, no write)", "rows_per_s": args.rows / seconds,
                        "mb_per_s": mb / seconds, "ratio": args.rows / seconds / base,
                        "driver_cpu_s_per_10k": cpu / args.rows * 1e4})
        driver_path(ray, blocks[:2], args.rows_per_file, root / "warm-driver")
        seconds, cpu = driver_path(ray, blocks, args.rows_per_file, root / "driver")
        results.append({"path": "driver receives rows, writes (before)", "rows_per_s": args.rows / seconds,
                        "mb_per_s": mb / seconds, "ratio": args.rows / seconds / base,
                        "driver_cpu_s_per_10k": cpu / args.rows * 1e4})
        for w in args.writers:
            # warm-up: worker processes started and imports done, as in a long run
            commit_path(ray, blocks[: 2 * w], args.rows_per_file, w, root / f"warm-{w}", check=False)
            seconds, cpu, committer_s, shards = commit_path(ray, blocks, args.rows_per_file, w,
                                                            root / f"commit-{w}")
            results.append({"path": f"commit path, {w} writer process(es)", "rows_per_s": args.rows / seconds,
                            "mb_per_s": mb / seconds, "ratio": args.rows / seconds / base,
                            "driver_cpu_s_per_10k": cpu / args.rows * 1e4,
                            "committer_s_per_10k": committer_s / args.rows * 1e4, "shards": shards})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'path':42s} {'rows/s':>8s} {'MB/s':>7s} {'vs bare':>8s} {'driver CPU s / 10k rows':>24s}"
          f" {'of which Committer':>19s}")
    for r in results:
        cpu = "-" if r["driver_cpu_s_per_10k"] is None else f"{r['driver_cpu_s_per_10k']:.2f}"
        own = f"{r['committer_s_per_10k']:.2f}" if "committer_s_per_10k" in r else "-"
        print(f"{r['path']:42s} {r['rows_per_s']:8.0f} {r['mb_per_s']:7.1f} {r['ratio']:8.2f} {cpu:>24s} {own:>19s}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
