"""The driver's memory over one long run: what ``diffseg label`` ships against Ray Data's and
glibc's defaults, variant by variant in the same command.

Each variant is one ``label()`` in a fresh process with its own local Ray, on distinct tiny PNGs
through ``tiny-random`` at 64 px; a thread samples the driver's RSS, its count of Python
objects (``gc.get_objects()``) and of Python memory blocks (``sys.getallocatedblocks()``, which
also counts ints, floats and strings) every 10 s. Per variant: the figures after the warm-up
(the first sample past a third of the run) and at the end, and the growth per 10,000 images.

* ``unbounded``: Ray Data as shipped (one BlockStats per block, kept), no release of freed memory;
* ``bounded``: the block stats bounded (pipeline/job/block_stats.py), no release;
* ``released``: what ``diffseg label`` runs: bounded, and the driver loop hands freed memory
  back every 10 s (pipeline/job/free_memory.py);
* ``trimmed``: bounded, with the allocators trimmed right before each sample: growth that goes
  away here is memory freed and kept by an allocator, not memory held.

    python benchmarks/driver_memory_bench.py                 # 50,000 images, batch 32
    python benchmarks/driver_memory_bench.py --images 20000 --batch 8
    python benchmarks/driver_memory_bench.py --variants unbounded,bounded,released,trimmed
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

CHILD = r'''
import gc, json, os, sys, threading, time
from pipeline import label
import pipeline.job.run as job_run
import pipeline.job.free_memory as free_memory
if sys.argv[4] == "unbounded":
    job_run.bound_block_stats = lambda: None  # Ray Data as shipped: one BlockStats per block, kept to the end
if sys.argv[4] != "released":
    free_memory.RELEASE_EVERY_S = float("inf")  # the driver loop never hands freed memory back
samples, stop = [], threading.Event()
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def trim():
    if sys.argv[4] == "trimmed":
        free_memory.release_freed_memory()
def sample():
    t0 = time.time()
    while not stop.wait(10):
        trim()
        samples.append((time.time() - t0, rss_mb(), len(gc.get_objects()), sys.getallocatedblocks()))
threading.Thread(target=sample, daemon=True).start()
s = label(sys.argv[1], sys.argv[2], model="tiny-random", image_size=64, num_points=4, batch_size=int(sys.argv[3]),
          actors=1, rows_per_file=1000, overwrite=True, ray_address="local")
stop.set()
print(json.dumps({"images": s["this_run"]["images"], "seconds": s["stage_seconds"]["pipeline"], "samples": samples,
                  "peak_rss_mb": s["driver"]["peak_rss_mb"]}))
'''


VARIANTS = ("unbounded", "bounded", "released", "trimmed")


def run(images: Path, out: Path, batch: int, variant: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", CHILD, str(images), str(out), str(batch), variant],
                          capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from driver_bench import write_images

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variants", default="bounded,released",
                        help=f"comma-separated, from {', '.join(VARIANTS)} (see the module docstring)")
    parser.add_argument("--work", default=None, help="folder for the images and outputs (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="driver-memory-"))
    images = work / f"images-{args.images}"
    write_images(images, args.images)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}; {args.images:,} images, batch {args.batch}")
    print("| variant | RSS after warm-up -> end, MB | RSS growth / 10k images | Python objects after "
          "warm-up -> end | objects / 10k images | Python memory blocks / 10k images | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    growth = {}
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}: use {', '.join(VARIANTS)}")
    for variant in variants:
        r = run(images, work / f"out-{variant}", args.batch, variant)
        samples = r["samples"]
        rate = r["images"] / r["seconds"]
        warm = next(s for s in samples if s[0] >= r["seconds"] / 3)
        end = samples[-1]
        span = (end[0] - warm[0]) * rate / 10_000  # images between the two samples, in 10,000s
        growth[variant] = ((end[1] - warm[1]) / span, (end[2] - warm[2]) / span, (end[3] - warm[3]) / span)
        print(f"| {variant} | {warm[1]:.1f} -> {end[1]:.1f} | {growth[variant][0]:.2f} MB | {warm[2]:,} -> "
              f"{end[2]:,} | {growth[variant][1]:,.0f} | {growth[variant][2]:,.0f} | {r['peak_rss_mb']:.0f} |",
              flush=True)
    if "unbounded" in growth and "bounded" in growth and growth["unbounded"][1] > 0:
        print(f"bounded / unbounded Python objects per 10k images: {growth['bounded'][1] / growth['unbounded'][1]:.2f}")
    for other in ("released", "trimmed"):
        if other in growth and "bounded" in growth and growth["bounded"][0] > 0:
            print(f"{other} / bounded RSS growth per 10k images: {growth[other][0] / growth['bounded'][0]:.2f}")
    print(f"load average after: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
