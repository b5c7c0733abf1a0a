"""The labeling pipeline vs a bare single-process loop, and its memory as the input grows.

1. Throughput. The same folder of N images (real photographs from skimage.data,
   resized to a few sizes, as JPEG) labelled two ways at equal resources (the
   whole machine: ``--cpus`` cores):
   - bare: one process, ``Labeler`` over the already decoded images, in batches,
     torch using every core. Reading, decoding, PNG encoding and writing are NOT
     timed: it is the compute-only ceiling.
   - pipeline: ``pipeline.label`` on a fresh local Ray with ``--cpus`` CPUs: read,
     decode, model actor, merge, encode, Parquet write, commit markers.
   Reported: end-to-end images/s (model load and actor start included on both
   sides), and the steady state: the bare loop alone vs the pipeline's marginal
   rate, (N - N/4) / (wall(N) - wall(N/4)), which cancels its fixed start-up
   (model check in the driver, actor start); and the pipeline/bare ratios.
2. Streaming. Peak memory (sum of the proportional set size of the driver and
   every Ray process it started, sampled every 0.25 s) labelling 1,000 and
   10,000 small images with the tiny model: equal peaks mean no accumulation.

Each measurement runs in its own subprocess (a fresh Ray each time).

  python benchmarks/pipeline_bench.py                       # tiny-random, 200 images, memory 1k vs 10k
  python benchmarks/pipeline_bench.py --full-size --images 8 --skip-memory
      # SD 1.4's full UNet/VAE architecture with RANDOM weights, 512 px, on CPU
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- inputs


def make_images(folder: Path, n: int, max_side: int) -> None:
    """n JPEGs cycling through skimage's photographs at a few sizes up to max_side."""
    import io

    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field()]
    sizes = [(max_side, max_side * 3 // 4), (max_side * 3 // 4, max_side), (max_side, max_side)]
    variants = []
    for p in photos:
        for w, h in sizes:
            img = Image.fromarray(p).resize((max(w, 1), max(h, 1)))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            variants.append(buf.getvalue())
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = folder / f"d{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        (sub / f"{i:06d}.jpg").write_bytes(variants[i % len(variants)])


def build_full_size_folder(path: Path) -> Path:
    """A diffusers folder with SD 1.4's UNet and VAE architecture and RANDOM weights.

    UNet from benchmarks/extract_bench.py's builder; full VAE (the loader expects one);
    a 1-layer CLIP text encoder of width 768 (only the empty prompt is encoded) with the
    tiny model's tokenizer and scheduler.
    """
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from benchmarks.extract_bench import build_sd14_architecture
    from diffseg_core.tiny_model import resolve_model

    if (path / "model_index.json").is_file():
        return path
    tiny = Path(resolve_model("tiny-random"))
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("tokenizer", "scheduler", "model_index.json"):
        src = tiny / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp / name)
    loaded = build_sd14_architecture()
    loaded.unet.save_pretrained(tmp / "unet", safe_serialization=True)
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=4, norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215,
    ).save_pretrained(tmp / "vae", safe_serialization=True)
    tok_vocab = json.loads((tiny / "text_encoder" / "config.json").read_text())["vocab_size"]
    CLIPTextModel(CLIPTextConfig(vocab_size=tok_vocab, hidden_size=768, intermediate_size=768, num_hidden_layers=1,
                                 num_attention_heads=12, max_position_embeddings=77)).save_pretrained(
        tmp / "text_encoder", safe_serialization=True)
    tmp.rename(path)
    return path


# ----------------------------------------------------------------------------- memory sampling


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory:
    """Samples the PSS sum of this process and all its descendants (Ray included)."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak_kib, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, sum(_pss_kib(p) for p in _descendants(os.getpid())))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- children


def child_bare(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from diffseg_core.segmentor import DiffSeg

    torch.set_num_threads(args.threads)
    files = sorted(Path(args.folder).rglob("*.jpg"))
    images = [np.asarray(ImageOps.exif_transpose(Image.open(f)).convert("RGB")) for f in files]
    t0 = time.perf_counter()
    labeler = DiffSeg.from_pretrained(args.model, device="cpu", dtype="fp32", image_size=args.image_size,
                                      num_points=args.num_points)
    t1 = time.perf_counter()
    for start in range(0, len(images), args.batch_size):
        labeler(images[start : start + args.batch_size])
    t2 = time.perf_counter()
    n = len(images)
    return {"images": n, "load_s": t1 - t0, "loop_s": t2 - t1,
            "end_to_end_images_per_s": n / (t2 - t0), "steady_images_per_s": n / (t2 - t1)}


def child_pipeline(args: argparse.Namespace) -> dict:
    import ray

    from pipeline import label

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        summary = label(args.folder, args.out, model=args.model, image_size=args.image_size,
                        num_points=args.num_points, batch_size=args.batch_size, rows_per_file=args.rows_per_file,
                        threads_per_actor=args.threads)
        wall = time.perf_counter() - t0
    ray.shutdown()
    return {"images": summary["images"], "wall_s": wall, "end_to_end_images_per_s": summary["images"] / wall,
            "steady_images_per_s": summary["steady_images_per_s"], "stage_seconds": summary["stage_seconds"],
            "peak_pss_mib": mem.peak_kib / 1024}


def run_child(kind: str, **kw) -> dict:
    argv = [sys.executable, __file__, "--child", kind]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-points", type=int, default=4)
    parser.add_argument("--max-side", type=int, default=160, help="input photographs' longest side")
    parser.add_argument("--rows-per-file", type=int, default=50, help="small shards: steady rate is measurable")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads, the same for the bare loop and each model actor "
                             "(default 1 for tiny-random: tiny ops on 2+ threads only add sync overhead; "
                             "all CPUs with --full-size)")
    parser.add_argument("--full-size", action="store_true", help="SD 1.4 architecture, random weights, 512 px")
    parser.add_argument("--memory-sizes", default="1000,10000")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = child_bare(args) if args.child == "bare" else child_pipeline(args)
        print(json.dumps(result))
        return 0

    work = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    threads = args.threads or (args.cpus if args.full_size else 1)
    common = dict(cpus=args.cpus, batch_size=args.batch_size, num_points=args.num_points,
                  rows_per_file=args.rows_per_file, threads=threads)
    model, image_size = args.model, args.image_size
    if args.full_size:
        model = str(build_full_size_folder(Path(tempfile.gettempdir()) / "diffseg-sd14-random"))
        image_size, common["num_points"] = 512, 16
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start (shared with others)")
    print(f"model: {'SD 1.4 architecture, random weights' if args.full_size else model}, image size {image_size}, "
          f"batch {args.batch_size}, {args.cpus} CPUs, {threads} torch thread(s)")
    try:
        if not args.skip_throughput:
            small_n = max(1, args.images // 4)
            folder, small = work / "throughput", work / "throughput-small"
            make_images(folder, args.images, args.max_side)
            make_images(small, small_n, args.max_side)
            bare = run_child("bare", folder=folder, model=model, image_size=image_size, **common)
            pipe = run_child("pipeline", folder=folder, out=work / "out-throughput", model=model,
                             image_size=image_size, **common)
            pipe_small = run_child("pipeline", folder=small, out=work / "out-throughput-small", model=model,
                                   image_size=image_size, **common)
            marginal = (args.images - small_n) / max(pipe["wall_s"] - pipe_small["wall_s"], 1e-9)
            print(f"\nthroughput, {args.images} images ({args.max_side} px photographs):")
            print(f"  bare loop : end-to-end {bare['end_to_end_images_per_s']:.4g} img/s "
                  f"(load {bare['load_s']:.1f} s), loop alone {bare['steady_images_per_s']:.4g} img/s")
            print(f"  pipeline  : end-to-end {pipe['end_to_end_images_per_s']:.4g} img/s "
                  f"(wall {pipe['wall_s']:.1f} s; {small_n} images: {pipe_small['wall_s']:.1f} s), "
                  f"marginal {marginal:.4g} img/s")
            print(f"  ratio pipeline/bare: end-to-end "
                  f"{pipe['end_to_end_images_per_s'] / bare['end_to_end_images_per_s']:.2f}, "
                  f"marginal vs loop alone {marginal / bare['steady_images_per_s']:.2f}")
            print(f"  pipeline stage seconds: {json.dumps(pipe['stage_seconds'])}")
        if not args.skip_memory:
            print("\nstreaming (tiny-random, 64 px model input, 32 px inputs):")
            for n in [int(v) for v in args.memory_sizes.split(",")]:
                folder = work / f"mem-{n}"
                make_images(folder, n, 32)
                res = run_child("pipeline", folder=folder, out=work / f"out-mem-{n}", model=args.model,
                                image_size=64, **{**common, "num_points": 4, "rows_per_file": 1000})
                print(f"  {n:6d} images: peak PSS {res['peak_pss_mib']:.0f} MiB (driver + Ray), "
                      f"wall {res['wall_s']:.1f} s")
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
