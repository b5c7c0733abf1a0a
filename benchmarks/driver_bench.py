"""The driver's cost per image: its CPU past start-up and its peak memory, by images and batch size.

One ``diffseg label`` run per row, each in a fresh process with its own local Ray, on tiny
images through ``tiny-random`` at 64 px (the model's work is cheap, so the driver's share
shows): the driver process's CPU time (every thread: Ray Data's executor and Ray's core
threads in it too) over the whole stream, as the run's summary reports it
(``driver.cpu_s_pipeline``). Start-up (the actors loading the model, the first tasks) is
excluded by taking the slope between two sizes: (CPU at 10k - CPU at 1k) / 9k images. Peak
RSS is the driver process's (``ru_maxrss``). The projection: images/s one driver core can
orchestrate (10,000 / CPU s per 10k) and the GPUs that feeds at 200 images/s each.

A reference in the same run: Ray Data alone, the same number of rows in blocks of 32 (as the
decode tasks make them) through a task map, an actor map of the same batch size and a task map
of 64 rows, all doing nothing, in a fresh process too: Ray Data's own cost for a plan of that
shape (it is not a floor: Ray Data's cost depends on the blocks and the wall time too).

With ``--parts N`` each row is one part (``--part 1/N``) of the same folder: its driver's CPU per
10,000 of its own images, and per 10,000 images of the whole output (N such drivers share it),
hence the GPUs the N parts feed together.

    python benchmarks/driver_bench.py                         # 1,000 and 10,000 images, batch 8 and 32
    python benchmarks/driver_bench.py --images 1000 10000 50000
    python benchmarks/driver_bench.py --parts 2 --batch 32 --no-baseline
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU_RATE = 200  # images/s per GPU we aim for


def write_images(folder: Path, n: int) -> None:
    """n distinct 24 x 24 PNGs (distinct bytes; decoding them costs next to nothing)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.png")))
    rng = np.random.default_rng(0)
    for i in range(have, n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
        (folder / f"img{i:06d}.png").write_bytes(buf.getvalue())


def run_label(images: Path, out: Path, batch: int, actors: int, image_size: int = 64, parts: int = 1) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "pipeline", "label", str(images), str(out), "--model", "tiny-random",
           "--image-size", str(image_size), "--num-points", "4", "--batch-size", str(batch), "--actors", str(actors),
           "--rows-per-file", "1000", "--json", "--ray-address", "local"]
    if parts > 1:
        cmd += ["--part", f"1/{parts}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"label failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    summary["wall_s"] = time.perf_counter() - start
    return summary


RAY_DATA_ALONE = r'''
import json, resource, sys, time
import numpy as np, ray
n, batch = int(sys.argv[1]), int(sys.argv[2])
ray.init(address="local", include_dashboard=False, log_to_driver=False)
ctx = ray.data.DataContext.get_current()
ctx.enable_progress_bars = False
class Nothing:
    def __call__(self, b):
        return b
ds = ray.data.range(n, override_num_blocks=max(1, n // 32)).map_batches(
    lambda b: b, batch_size=32).map_batches(Nothing, batch_size=batch, compute=ray.data.ActorPoolStrategy(size=1))
ds = ds.map_batches(lambda b: {"n": np.array([len(b["id"])])}, batch_size=64)
start = time.process_time(); rows = 0
for b in ds.iter_batches(batch_size=None):
    rows += int(b["n"].sum())
print(json.dumps({"cpu": time.process_time() - start, "rows": rows,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def ray_data_alone(n: int, batch: int) -> dict:
    done = subprocess.run([sys.executable, "-c", RAY_DATA_ALONE, str(n), str(batch)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"Ray Data alone failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=64,
                        help="model input size: larger is slower per image (more wall time, the same tasks)")
    parser.add_argument("--work", default=None, help="folder for the images and outputs (default: a temp dir)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the Ray Data alone rows")
    parser.add_argument("--parts", type=int, default=1,
                        help="measure part 1 of N (--part 1/N): one of N drivers sharing the output")
    args = parser.parse_args()
    sizes = sorted(set(args.images))
    work = Path(args.work or tempfile.mkdtemp(prefix="driver-bench-"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}; work: {work}")
    runs: dict[tuple[str, int, int], dict] = {}
    label_name = "diffseg label" if args.parts == 1 else f"diffseg label --part 1/{args.parts}"
    print("| path | batch | images | driver CPU s over the stream | images/s (steady) | driver peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        write_images(work / f"images-{n}", n)
    for batch in args.batch:
        for n in sizes:
            if not args.no_baseline:
                alone = ray_data_alone(n, batch)
                runs["alone", batch, n] = {"cpu": alone["cpu"], "rss": alone["rss"]}
                print(f"| Ray Data alone (nothing done) | {batch} | {n:,} | {alone['cpu']:.2f} | - | "
                      f"{alone['rss']:.0f} |", flush=True)
            out = work / f"out-{n}-{batch}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            s = run_label(work / f"images-{n}", out, batch, args.actors, args.image_size, args.parts)
            d = s["driver"]
            own = s["this_run"]["images"]
            runs["label", batch, n] = {"cpu": d["cpu_s_pipeline"], "rss": d["peak_rss_mb"], "own": own}
            shown = f"{n:,}" if args.parts == 1 else f"{n:,} (part 1/{args.parts}: {own:,})"
            print(f"| {label_name} | {batch} | {shown} | {d['cpu_s_pipeline']:.2f} | "
                  f"{s.get('steady_images_per_s') or 0:,.0f} | {d['peak_rss_mb']:.0f} |", flush=True)
            runs["label", batch, n]["wall"] = s["stage_seconds"].get("pipeline", 0.0)
    if len(sizes) > 1:
        print()
        print("Past start-up: the driver's CPU per 10,000 more images (the slope between the runs above), "
              f"one driver core's images/s and the GPUs it feeds at {GPU_RATE} images/s each:")
        whole = f" | driver CPU s / 10k images of the output | GPUs, {args.parts} parts" if args.parts > 1 else ""
        print(f"| path | batch | images | driver CPU s / 10k images | one core: images/s | GPUs{whole} |")
        print("|---|---|---|---|---|---|" + ("---|---|" if whole else ""))
        for (path, batch, n), run in sorted(runs.items()):
            if n == sizes[0]:
                continue
            prev = runs[path, batch, sizes[sizes.index(n) - 1]]
            images = run.get("own", n) - prev.get("own", sizes[sizes.index(n) - 1])  # the driver's own images
            slope = 10_000 * (run["cpu"] - prev["cpu"]) / images
            rate = 10_000 / slope if slope > 0 else float("inf")
            name = label_name if path == "label" else "Ray Data alone"
            line = (f"| {name} | {batch} | {sizes[sizes.index(n) - 1]:,} -> {n:,} | {slope:.2f} | {rate:,.0f} | "
                    f"{rate / GPU_RATE:.0f} |")
            if whole and path == "label":
                per_output = 10_000 * (run["cpu"] - prev["cpu"]) / (n - sizes[sizes.index(n) - 1])
                line += f" {per_output:.2f} | {args.parts * rate / GPU_RATE:.0f} |"
            elif whole:
                line += " - | - |"
            print(line)
    print(f"load average after: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
