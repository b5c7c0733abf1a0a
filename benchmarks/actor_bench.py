"""The model actor's batch loop on one GPU, without Ray: images/s and GPU utilisation,
against a naive diffusers loop in the same run.

GPU (one command, full-size SD 1.x architecture, RANDOM weights, 512 px; see BENCHMARKS.md):
    python benchmarks/actor_bench.py --device cuda
CPU smoke test (tiny-random, 64 px, seconds):
    python benchmarks/actor_bench.py --small

"ours" is `pipeline.job.actors.LabelActor.__call__` on decoded rows, exactly what Ray calls:
uint8 pixels -> pinned copy -> float on the GPU -> VAE (bf16 by default) -> UNet with
the attention capture -> aggregation, merge, NMS at each image's own size -> one copy
back -> zstd-packed label maps. By default two calls run at once from two threads, as
Ray runs them (``pipeline.job.actors.CONCURRENT_CALLS``); ``--calls 1`` for one at a time.

"naive" is the straightforward diffusers loop: float conversion on the host and a
synchronous copy, the VAE in float32 (what ``force_upcast`` makes diffusers do), the
whole UNet with diffusers' ``AttnProcessor`` keeping every self-attention probability,
then DiffSeg image by image with each label map copied back on its own.

RANDOM weights: a random VAE maps images to nearly constant latents, which would make
the attention uniform and the merge trivial; the VAE's scaling factor is therefore
calibrated so the latents of real photographs have unit variance (the scale of real SD
latents). Each row reports the mean segments per image so the merge's load is visible.
The work done per image does not otherwise depend on the weights' values.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.gpu_monitor import timed_run  # noqa: E402
from diffseg_core.extract import AttentionExtractor  # noqa: E402
from diffseg_core.segmentor import DiffSeg  # noqa: E402
from pipeline.job.actors import CONCURRENT_CALLS, LabelActor  # noqa: E402
from pipeline.job.labels import unpack_label_map  # noqa: E402

GOAL_IMAGES_PER_S = 200.0  # one H100 (issue 15)


def photo_batch(batch: int, size: int) -> np.ndarray:
    """Real photographs (scikit-image's bundled ones), resized to size x size, cycled; random pixels without it."""
    from PIL import Image

    try:
        from skimage import data

        sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.cat()]
    except Exception:  # noqa: BLE001
        rng = np.random.RandomState(0)
        sources = [rng.randint(0, 256, (size, size, 3), dtype=np.uint8)]
    resized = [np.asarray(Image.fromarray(s).convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
               for s in sources]
    return np.stack([resized[i % len(resized)] for i in range(batch)])


def rows(pixels: np.ndarray, label_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Decoded rows as the decode stage hands them to the actor."""
    n = len(pixels)
    h, w = label_size
    return {"image_id": np.array([f"img{i}" for i in range(n)], dtype=object),
            "source": np.array(["bench"] * n, dtype=object), "width": np.full(n, w, np.int32),
            "height": np.full(n, h, np.int32), "error": np.array([None] * n, dtype=object), "pixels": pixels,
            "_shard_id": np.zeros(n, np.int64), "_shard_rows": np.full(n, n, np.int64)}


def calibrate_latent_scale(ex: AttentionExtractor, pixels: np.ndarray) -> float:
    """Set the VAE's scaling factor so this model's latents of ``pixels`` have unit variance."""
    with torch.inference_mode():
        mean = ex.encode(ex.to_pixels(pixels)).float() / ex.vae.config.scaling_factor
    scale = 1.0 / max(float(mean.std()), 1e-8)
    ex.vae.register_to_config(scaling_factor=scale)
    return scale


def ours_fn(actor: LabelActor, batch: dict, calls: int, pool: ThreadPoolExecutor | None):
    """One unit of work: ``calls`` batches, run as Ray runs them (``calls`` at a time)."""
    if calls == 1:
        return lambda: actor(batch)
    return lambda: list(pool.map(lambda _: actor(batch), range(calls)))


def naive_fn(ex: AttentionExtractor, vae32: torch.nn.Module, seg: DiffSeg, pixels: np.ndarray,
             label_size: tuple[int, int]):
    from benchmarks.extract_bench import naive_attention

    def run():
        with torch.inference_mode():
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(ex.device)
            latents = (vae32.encode(x).latent_dist.mean * vae32.config.scaling_factor).to(ex.dtype)
            maps = naive_attention(ex, latents)
            return [seg.segment({r: m[b : b + 1] for r, m in maps.items()}, label_size)[0].cpu().numpy()
                    for b in range(len(pixels))]

    return run


def measure(name: str, fn, images_per_call: int, device: torch.device, args, extra: dict) -> dict:
    row = {"method": name, **extra}
    try:
        for _ in range(args.warmup):
            fn()
        times, util = timed_run(fn, device, args.seconds, args.min_calls)
    except torch.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        row["error"] = "out of memory"
        return row
    best, median = min(times), float(np.median(times))
    row.update(images_per_s=images_per_call / median, images_per_s_best=images_per_call / best,
               seconds_per_call_median=median, calls=len(times), **util)
    if device.type == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    return row


def build_extractor(args, device: torch.device, dtype: str, **options) -> AttentionExtractor:
    if args.small:
        return AttentionExtractor.from_pretrained("tiny-random", device=device, dtype=dtype,
                                                  image_size=args.image_size, **options)
    from benchmarks.extract_bench import build_sd14_architecture

    loaded = build_sd14_architecture()
    return AttentionExtractor(loaded, model="sd14-architecture-random-weights", device=device, dtype=dtype,
                              image_size=args.image_size, **options)


def mean_segments(out: dict, label_size: tuple[int, int]) -> float:
    h, w = label_size
    return float(np.mean([int(unpack_label_map(p, h, w).max()) + 1 for p in out["label_packed"] if len(p)]))


def print_row(row: dict) -> None:
    print(json.dumps({k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny-random at 64 px: a smoke test for CPU")
    p.add_argument("--dtypes", default="fp16,bf16", help="UNet dtypes (the VAE is bf16 on GPU, see --vae-dtype)")
    p.add_argument("--vae-dtype", default=None, help="default: auto (bf16 on GPU)")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    p.add_argument("--naive-batch-sizes", default="1,8,32", help="the naive loop keeps every probability: it runs "
                   "out of memory at large batches")
    p.add_argument("--variant-batch", type=int, default=32,
                   help="batch at which channels_last, torch.compile and one call at a time are measured")
    p.add_argument("--variants", default="calls1,channels_last,compile", help="comma-separated; '' for none")
    p.add_argument("--calls", type=int, default=CONCURRENT_CALLS, help="calls in flight, as Ray runs the actor")
    p.add_argument("--image-size", type=int, default=None, help="default 512 (64 with --small)")
    p.add_argument("--label-size", default=None, help="HxW the label maps are made at (default: the image size)")
    p.add_argument("--num-points", type=int, default=None, help="default 16 (8 with --small)")
    p.add_argument("--seconds", type=float, default=None, help="least time per measurement (default 4, 1 small)")
    p.add_argument("--min-calls", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the actor's 2 on GPU)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.image_size = args.image_size or (64 if args.small else 512)
    args.num_points = args.num_points or (8 if args.small else 16)
    args.seconds = args.seconds if args.seconds is not None else (1.0 if args.small else 4.0)
    label_size = tuple(int(v) for v in args.label_size.split("x")) if args.label_size else (args.image_size,) * 2
    device = torch.device(args.device)
    from pipeline.job.actors import GPU_ACTOR_CPUS

    torch.set_num_threads(args.threads or (GPU_ACTOR_CPUS if device.type == "cuda" else torch.get_num_threads()))
    print(f"# machine: {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.2f}", flush=True)
    if device.type == "cuda":
        print(f"# device: {torch.cuda.get_device_name(device)}", flush=True)
        torch.backends.cudnn.benchmark = True  # as LabelActor sets it
    print(f"# model: {'tiny-random' if args.small else 'SD 1.x architecture'} with RANDOM weights, "
          f"{args.image_size} px, labels at {label_size[0]}x{label_size[1]}, num_points {args.num_points}", flush=True)
    diffseg_kwargs = {"kl_threshold": 1.1, "num_points": args.num_points}
    if args.small:
        diffseg_kwargs["kl_threshold"] = 1e-3  # tiny-random's attention is nearly uniform
    results: list[dict] = []
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    naive_sizes = {int(b) for b in args.naive_batch_sizes.split(",") if b}
    variants = [v for v in args.variants.split(",") if v]
    dtypes = [d for d in args.dtypes.split(",") if d]
    pool = ThreadPoolExecutor(max(args.calls, 1))

    for d_index, dtype in enumerate(dtypes):
        t0 = time.perf_counter()
        ex = build_extractor(args, device, dtype, vae_dtype=args.vae_dtype)
        seg = DiffSeg(**diffseg_kwargs)
        scale = calibrate_latent_scale(ex, photo_batch(4, args.image_size))
        actor = LabelActor.from_parts(ex, seg)
        vae32 = copy.deepcopy(ex.vae).float()
        print(f"# {dtype}: UNet {ex.dtype}, VAE {ex.vae_dtype}, built in {time.perf_counter() - t0:.1f} s, "
              f"latent scale {scale:.3g}", flush=True)
        common = {"unet_dtype": dtype, "vae_dtype": str(ex.vae_dtype).removeprefix("torch.")}
        for b in sizes:
            batch = rows(photo_batch(b, args.image_size), label_size)
            out = actor(batch)
            extra = {**common, "batch": b, "calls_in_flight": args.calls, "segments_per_image": mean_segments(
                out, label_size), "packed_bytes_per_image": float(np.mean([len(x) for x in out["label_packed"]]))}
            row = measure("ours (actor)", ours_fn(actor, batch, args.calls, pool), b * args.calls, device, args, extra)
            if "images_per_s" in row and device.type == "cuda":
                row["meets_200_goal"] = row["images_per_s"] >= GOAL_IMAGES_PER_S
            results.append(row)
            print_row(row)
            if b in naive_sizes:
                nrow = measure("naive diffusers loop", naive_fn(ex, vae32, seg, batch["pixels"], label_size), b,
                               device, args, {**common, "vae_dtype": "float32", "batch": b})
                if "images_per_s" in nrow and "images_per_s" in row:
                    nrow["ours_over_naive"] = row["images_per_s"] / nrow["images_per_s"]
                results.append(nrow)
                print_row(nrow)
        del vae32
        if args.variant_batch and variants:
            batch = rows(photo_batch(args.variant_batch, args.image_size), label_size)
            base = {**common, "batch": args.variant_batch}
            if "calls1" in variants:
                results.append(measure("ours, one call at a time", ours_fn(actor, batch, 1, None),
                                       args.variant_batch, device, args, {**base, "calls_in_flight": 1}))
                print_row(results[-1])
            if "channels_last" in variants:
                ex.unet.to(memory_format=torch.channels_last)
                ex.vae.to(memory_format=torch.channels_last)
                ex.channels_last = True
                results.append(measure("ours + channels_last", ours_fn(actor, batch, args.calls, pool),
                                       args.variant_batch * args.calls, device, args, base))
                print_row(results[-1])
                ex.unet.to(memory_format=torch.contiguous_format)
                ex.vae.to(memory_format=torch.contiguous_format)
                ex.channels_last = False
            if "compile" in variants and d_index == len(dtypes) - 1:  # compiling wraps the modules for good
                t1 = time.perf_counter()
                try:
                    ex._compile()
                    ex.compiled = True
                    actor(batch)
                    row = measure("ours + torch.compile", ours_fn(actor, batch, args.calls, pool),
                                  args.variant_batch * args.calls, device, args,
                                  {**base, "compile_seconds": time.perf_counter() - t1})
                except Exception as exc:  # noqa: BLE001 - report it, keep the other figures
                    row = {"method": "ours + torch.compile", **base, "error": f"{type(exc).__name__}: {exc}"[:300]}
                results.append(row)
                print_row(row)
        del actor, ex, seg
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    pool.shutdown()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
