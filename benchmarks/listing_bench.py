"""Driver memory for listing and planning a million images: streamed (now) against held (before).

The input is a synthetic fsspec listing (benchmarks/synthetic_fs.py: 1,000 folders of
1,000 names, no storage behind them), so what grows is the lister's memory alone.
Each variant runs in a fresh process; the figure is its peak RSS (``VmHWM``) minus
its RSS once everything is imported, divided by the number of images.

Variants:
- before: the previous driver code, as it was (fs.find of everything, sorted lists of
  URIs, a list of Shard objects, the rerun's set of planned paths, the list of shard
  dicts handed to ``ray.data.from_items``), without Ray;
- plan: ``iter_inputs`` -> ``update_plan`` (a first run: the plan written as it is made);
- rerun: ``update_plan`` again over the same listing (16-byte digests of the saved plan);
- dataset: ``shard_dataset`` over the plan's index (24 bytes per shard): the Ray dataset of
  shards, whose read tasks (one per shard) read their paths from the plan file themselves.

    python benchmarks/listing_bench.py                 # 1,000,000 images
    python benchmarks/listing_bench.py --images 100000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """VmHWM: this process's own peak RSS (ru_maxrss would carry over the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def run_variant(variant: str, images: int, workdir: str) -> dict:
    import fsspec

    import benchmarks.synthetic_fs  # noqa: F401 - registers synthetic://
    from pipeline.data.resume import update_plan
    from pipeline.data.sources import iter_inputs

    folders = images // 1000
    opts = {"folders": folders, "per_folder": 1000}
    url = "synthetic://images"
    fs = fsspec.filesystem("file")
    if variant == "dataset":
        import ray

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, object_store_memory=2 * 2**30)
        import ray.data  # noqa: F401
    base = _rss_mb()
    start = time.perf_counter()
    if variant == "before":
        _before(url, opts, 1000)
    elif variant in ("plan", "rerun"):
        update_plan(fs, workdir, iter_inputs(url, opts), 1000)
    elif variant == "dataset":
        import ray

        from pipeline.data.resume import PlannedPaths
        from pipeline.job.dataflow import shard_dataset

        index = PlannedPaths.of_plan(fs, f"{workdir}/_plan.jsonl.gz").index  # what update_plan hands over
        base = _rss_mb()
        ds, todo = shard_dataset(ray, fs, workdir, index, None, set())
        assert len(todo) == folders
        after = _rss_mb()
        del ds
    seconds = time.perf_counter() - start
    peak = _peak_mb() if variant != "dataset" else max(after, _rss_mb())
    return {"variant": variant, "images": images, "seconds": round(seconds, 2), "base_mb": round(base, 1),
            "peak_mb": round(peak, 1), "bytes_per_image": round((peak - base) * 2**20 / images, 1)}


def _before(url: str, opts: dict, per_shard: int) -> None:
    """The driver's listing and planning as it was before streaming (pipeline/data/sources.py, resume.py, plan.py)."""
    from dataclasses import dataclass

    from pipeline.data.sources import input_kind, open_fs

    @dataclass(frozen=True)
    class Shard:
        shard_id: int
        kind: str
        paths: tuple

    fs, path = open_fs(url, opts)
    found = fs.find(path)
    images = []
    for p in sorted(found):
        if input_kind(p) == "image":
            images.append(fs.unstrip_protocol(p))
    del found
    shards = [Shard(i, "images", tuple(images[s:s + per_shard])) for i, s in enumerate(range(0, len(images), per_shard))]
    planned = {p for shard in shards for p in shard.paths}  # a rerun's "which files are new"
    fresh = [p for p in images if p not in planned]
    items = [{"shard_id": s.shard_id, "kind": s.kind, "paths": list(s.paths)} for s in shards]
    assert not fresh and len(items) == len(shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.images, args.workdir)))
        return
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for variant in ("before", "plan", "rerun", "dataset"):
            done = subprocess.run([sys.executable, __file__, "--variant", variant, "--images", str(args.images),
                                   "--workdir", workdir], capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
        plan_mb = os.path.getsize(os.path.join(workdir, "_plan.jsonl.gz")) / 2**20
    before = results[0]["bytes_per_image"]
    print(f"\n{args.images:,} images on {platform.machine()} ({os.cpu_count()} CPUs), plan file {plan_mb:.1f} MB")
    for r in results:
        ratio = f"{before / r['bytes_per_image']:.0f}x less than before" if r["bytes_per_image"] > 0 else ""
        print(f"  {r['variant']:7s} peak +{r['peak_mb'] - r['base_mb']:7.1f} MB = {r['bytes_per_image']:7.1f} "
              f"bytes/image in {r['seconds']:6.1f} s  {ratio}")


if __name__ == "__main__":
    main()
