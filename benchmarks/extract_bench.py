"""Attention extraction speed and memory: ours vs the naive keep-every-probability approach.

Full-size SD 1.x architecture (SD 1.4's UNet and VAE configs) with RANDOM
weights built from the configs: no download, and the figures are the same as
with real weights because the work does not depend on the values.  The
empty-prompt embedding is a random (1, 77, 768) tensor (no text encoder is
needed to time the UNet).

Methods, measured in the same run on the same modules:
- ours: `AttentionExtractor` (attn1 probabilities head-averaged per chunk into
  per-resolution float32 buffers, every other attention on SDPA, UNet stopped
  after its last attn1); also without the early stop, to measure it.
- naive: diffusers' default ``AttnProcessor`` (non-SDPA) on every attention
  layer, every attn1 probability tensor (B*heads, N, N) kept for the whole
  UNet call, averaged afterwards.
- with ``--vocabulary-classes C``: ours with the vocabulary probe on every
  attn2 layer (`AttentionExtractor.extract`; C random class embeddings, as a
  text encoder would give, the cost does not depend on them) against ours
  without it, on the same modules, and the voting (combine + vote at the image
  size) per image.

Vocabulary cost (CPU):  python benchmarks/extract_bench.py --no-baseline --vocabulary-classes 27 --threads 1

CPU (here):   python benchmarks/extract_bench.py
GPU:          python benchmarks/extract_bench.py --device cuda --dtypes fp16,bf16 --batch-sizes 1,2,4,8,16,32,64

On a GPU the VAE encodes in bf16 by default (``--vae-dtype``); the float32 encode that
``force_upcast`` made before is timed beside it (``vae_encode_fp32``).  GPU rows carry
NVML's utilisation (benchmarks/gpu_monitor.py).

Per image the VAE encoder costs 1.08 TFLOP and the UNet 0.68 TFLOP at 512 px;
on an H100 (~800 TFLOP/s dense bf16) that bounds throughput near 450 images/s.
GPU rows report the fraction of that bound reached.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.gpu_monitor import GpuMonitor  # noqa: E402
from diffseg_core.attention_capture import install_capture, self_attention_layers  # noqa: E402
from diffseg_core.extract import AttentionExtractor, resolve_dtype  # noqa: E402
from diffseg_core.model_loading import LoadedModel  # noqa: E402
from diffseg_core.vocabulary import PRESETS, EncodedVocabulary, Vocabulary  # noqa: E402

BOUND_IMAGES_PER_S = 450.0  # H100, see the module docstring


# ----------------------------------------------------------------------------- models


def random_vocabulary(classes: int, width: int = 768) -> EncodedVocabulary:
    """``classes`` names (COCO-Stuff-27's first, then numbered) with random unit-scale embeddings."""
    names = list(PRESETS["coco-stuff-27"])[:classes] + [f"class {i}" for i in range(27, classes)]
    gen = torch.Generator().manual_seed(1)
    return EncodedVocabulary(vocabulary=Vocabulary(tuple(names)), embeddings=torch.randn(classes, width, generator=gen))


def build_sd14_architecture() -> LoadedModel:
    """SD 1.4's UNet and VAE from their configs, random weights, float32 on CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
        act_fn="silu",
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        mid_block_scale_factor=1,
        norm_eps=1e-5,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        act_fn="silu",
        sample_size=512,
        scaling_factor=0.18215,
    ).eval()
    vae.decoder = None
    vae.post_quant_conv = None
    hidden = torch.randn(1, 77, 768)
    return LoadedModel(unet=unet, vae=vae, encoder_hidden_states=hidden, source="config", resolved="sd14-config")


# ----------------------------------------------------------------------------- naive baseline


class KeepAllProbsProcessor:
    """diffusers' default ``AttnProcessor`` (baddbmm + softmax + bmm), keeping every probability tensor."""

    def __init__(self, store: list):
        from diffusers.models.attention_processor import AttnProcessor

        self.store = store
        self.inner = AttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        original = attn.get_attention_scores

        def keep(query, key, mask=None):
            probs = original(query, key, mask)
            self.store.append((attn.heads, probs))
            return probs

        attn.get_attention_scores = keep
        try:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        finally:
            del attn.get_attention_scores


def naive_attention(extractor: AttentionExtractor, latents: torch.Tensor) -> dict[int, torch.Tensor]:
    """The naive approach: full UNet, every attn1 probability kept, averaged afterwards."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    unet = extractor.unet
    store: list = []
    attn1 = {id(m) for _, m in self_attention_layers(unet)}
    for m in unet.modules():
        if isinstance(m, Attention):
            m.set_processor(KeepAllProbsProcessor(store) if id(m) in attn1 else AttnProcessor())
    try:
        b = latents.shape[0]
        t = torch.tensor(extractor.timestep, device=latents.device)
        with torch.inference_mode():
            unet(latents, t, encoder_hidden_states=extractor._hidden.expand(b, -1, -1), return_dict=False)
            groups: dict[int, list[torch.Tensor]] = {}
            for heads, probs in store:
                n = probs.shape[-1]
                groups.setdefault(int(round(n ** 0.5)), []).append(probs.view(b, heads, n, n).float().mean(1))
            return {r: torch.stack(g).mean(0) for r, g in sorted(groups.items())}
    finally:
        store.clear()
        install_capture(unet, extractor._state)  # put ours back


def vote_batch(class_attention: dict[int, torch.Tensor], size: int) -> list:
    """Classes for every image of a batch from its class attention, at the image size.

    The segments are a fixed 8 x 8 grid of blocks: the cost of voting does not depend on them.
    """
    from diffseg_core.class_vote import combine_class_attention, vote_classes

    labels = (torch.arange(size)[:, None] * 8 // size) * 8 + torch.arange(size)[None, :] * 8 // size
    maps = combine_class_attention(class_attention)
    return [vote_classes(m, labels) for m in maps]


# ----------------------------------------------------------------------------- measuring


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def rss_kib(field: str) -> int:
    try:
        import psutil  # noqa: F401

        if field == "VmRSS":
            return psutil.Process().memory_info().rss // 1024
    except ImportError:
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def peak_mib(device: torch.device, rss_before_kib: int) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}
    hwm = rss_kib("VmHWM")
    return {"peak_rss_mib": hwm / 1024, "peak_above_start_mib": (hwm - rss_before_kib) / 1024}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(methods: dict, device: torch.device, iterations: int, batch: int, warmup: bool = True):
    """Time each method ``iterations`` times, interleaved round by round (fairer on a shared
    machine), after one warm-up call each.  Best time and the highest peak memory per method.
    """
    rows = {name: {"method": name, "batch": batch, "seconds_per_call": [], "cpu_seconds_per_call": []}
            for name in methods}
    outputs = {}
    rounds = iterations + (1 if warmup else 0)
    for i in range(rounds):
        for name, fn in methods.items():
            reset_peak(device)
            before = rss_kib("VmRSS")
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            with GpuMonitor(device, interval_s=0.02) as monitor:
                outputs[name] = fn()
                sync(device)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            if warmup and i == 0:
                continue
            row = rows[name]
            row["seconds_per_call"].append(round(elapsed, 3))
            # process CPU time: less sensitive than wall time to other jobs on a shared machine
            row["cpu_seconds_per_call"].append(round(cpu, 3))
            for key, value in peak_mib(device, before).items():
                row[key] = max(row.get(key, 0.0), value)
            row.setdefault("_util", []).extend(monitor.samples)
    for row in rows.values():
        util = row.pop("_util", [])
        if util:
            row["gpu_util_mean_pct"] = sum(util) / len(util)
        row["images_per_s"] = batch / min(row["seconds_per_call"])
        key = "peak_gpu_mib" if device.type == "cuda" else "peak_above_start_mib"
        row[key + "_per_image"] = row[key] / batch
    return rows, outputs


def _short(value):
    """Four significant digits for printing (keeps tiny differences visible)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", "--dtype", default=None,
                   help="UNet dtypes, comma-separated: fp32 (CPU default), fp16, bf16")
    p.add_argument("--vae-dtype", default=None, help="VAE encoder dtype (default auto: bf16 on GPU)")
    p.add_argument("--batch-sizes", default="1", help="comma-separated, e.g. 1,2,4,8,16,32,64")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--chunk-mib", type=int, default=None,
                   help="bound on one chunk of float32 attention probabilities (default: the extractor's)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's); 1 makes process CPU time a steady measure on a shared machine")
    p.add_argument("--vocabulary-classes", type=int, default=0,
                   help="also time the vocabulary probe with this many classes (27: COCO-Stuff-27)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    print(f"# machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    if device.type == "cuda":
        print(f"# device: {torch.cuda.get_device_name(device)}", flush=True)
    rows = []
    for name in (args.dtypes or "").split(",") if args.dtypes else [None]:
        rows.extend(run_dtype(args, device, resolve_dtype(name, device)))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def run_dtype(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    t0 = time.perf_counter()
    loaded = build_sd14_architecture()
    if args.vocabulary_classes:
        loaded.vocabulary = random_vocabulary(args.vocabulary_classes)
    extra = {"chunk_bytes": args.chunk_mib * 2**20} if args.chunk_mib else {}
    ex = AttentionExtractor(loaded, model="sd14-architecture-random-weights", device=device, dtype=dtype,
                            image_size=args.image_size, vae_dtype=args.vae_dtype, **extra)
    del loaded
    import copy

    vae32 = copy.deepcopy(ex.vae).float() if ex.vae_dtype != torch.float32 else None
    print(f"# built SD1.4-architecture UNet ({sum(p.numel() for p in ex.unet.parameters()) / 1e6:.0f} M params) "
          f"+ VAE encoder with RANDOM weights in {time.perf_counter() - t0:.1f} s; "
          f"{len(ex.layer_names)} attn1 layers; dtype {dtype}, VAE {ex.vae_dtype}; chunk {ex._state.chunk_bytes / 2**20:.0f} MiB",
          flush=True)

    rows = []
    rng = np.random.RandomState(0)
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        images = rng.randint(0, 256, (batch, args.image_size, args.image_size, 3), dtype=np.uint8)
        pixels = ex.to_pixels(images).to(device)
        # A random-weight VAE maps every image to a nearly constant latent (std ~0.04), which makes
        # the UNet's self-attention nearly uniform; unit-variance random latents (the scale of real
        # SD latents) give non-trivial attention, so the ours-vs-naive comparison means something.
        # The UNet's cost does not depend on the values.
        gen = torch.Generator().manual_seed(batch)
        side = args.image_size // ex.vae_scale_factor
        latents = torch.randn(batch, 4, side, side, generator=gen).to(device, dtype)
        try:
            def ours():
                ex.early_stop = True
                return ex.attention(latents)

            def ours_full():
                ex.early_stop = False
                try:
                    return ex.attention(latents)
                finally:
                    ex.early_stop = True

            methods = {"vae_encode": lambda: ex.encode(pixels), "ours_unet": ours,
                       "ours_unet_no_early_stop": ours_full}
            if vae32 is not None:
                def encode_fp32():
                    with torch.inference_mode():
                        return vae32.encode(pixels.float()).latent_dist.mean

                methods["vae_encode_fp32"] = encode_fp32
            if args.vocabulary_classes:
                methods["ours_unet_with_vocabulary"] = lambda: ex._unet_pass(latents, probe=True)
                class_attention = ex._unet_pass(latents, probe=True).class_attention
                methods["class_vote (combine + vote, per batch)"] = lambda: vote_batch(class_attention, args.image_size)
            if not args.no_baseline:
                methods["naive_unet"] = lambda: naive_attention(ex, latents)
            try:
                timed, outs = measure(methods, device, args.iterations, batch)
                naive_oom = False
            except torch.OutOfMemoryError:
                if args.no_baseline:
                    raise
                gc.collect()
                torch.cuda.empty_cache()
                methods.pop("naive_unet")
                timed, outs = measure(methods, device, args.iterations, batch)
                naive_oom = True
            for row in timed.values():
                row["unet_dtype"], row["vae_dtype"] = str(dtype), str(ex.vae_dtype)
            rows.extend(timed.values())
            vae_s = batch / timed["vae_encode"]["images_per_s"]
            ours_unet_s = batch / timed["ours_unet"]["images_per_s"]
            full_s = batch / timed["ours_unet_no_early_stop"]["images_per_s"]
            rows.append({"method": "ours_end_to_end (vae + unet)", "batch": batch,
                         "images_per_s": batch / (vae_s + ours_unet_s),
                         "early_stop_saving": 1 - ours_unet_s / full_s})
            if args.vocabulary_classes:
                cpu = {k: min(timed[k]["cpu_seconds_per_call"]) for k in timed}
                vocab_s = batch / timed["ours_unet_with_vocabulary"]["images_per_s"]
                vote_s = batch / timed["class_vote (combine + vote, per batch)"]["images_per_s"]
                rows.append({"method": f"ratio with/without a {args.vocabulary_classes}-class vocabulary",
                             "batch": batch, "unet_stage": vocab_s / ours_unet_s,
                             "unet_stage_cpu_time": cpu["ours_unet_with_vocabulary"] / cpu["ours_unet"],
                             "end_to_end": (vae_s + vocab_s + vote_s) / (vae_s + ours_unet_s),
                             "vote_seconds_per_image": vote_s / batch})
            if naive_oom:
                rows.append({"method": "naive_unet", "batch": batch, "error": "out of memory"})
            elif "naive_unet" in timed:
                naive_unet_s = batch / timed["naive_unet"]["images_per_s"]
                ours_maps, naive_maps = outs["ours_unet"], outs["naive_unet"]
                rows.append({"method": "naive_end_to_end (vae + unet)", "batch": batch,
                             "images_per_s": batch / (vae_s + naive_unet_s),
                             "max_abs_diff_vs_ours": max((ours_maps[r] - naive_maps[r]).abs().max().item()
                                                         for r in ours_maps),
                             "max_prob_ours": {r: ours_maps[r].max().item() for r in ours_maps},
                             "uniform_prob": {r: 1 / r**2 for r in ours_maps}})
                cpu = {k: min(timed[k]["cpu_seconds_per_call"]) for k in timed}
                rows.append({"method": "ratio ours/naive", "batch": batch,
                             "unet_stage": naive_unet_s / ours_unet_s,
                             "end_to_end": (vae_s + naive_unet_s) / (vae_s + ours_unet_s),
                             "unet_stage_cpu_time": cpu["naive_unet"] / cpu["ours_unet"],
                             "end_to_end_cpu_time": (cpu["vae_encode"] + cpu["naive_unet"])
                             / (cpu["vae_encode"] + cpu["ours_unet"])})
        except torch.OutOfMemoryError:
            rows.append({"method": "ours", "batch": batch, "error": "out of memory"})
            break
        if device.type == "cuda":
            for r in rows:
                if r.get("batch") == batch and r["method"].startswith("ours_end_to_end"):
                    r["fraction_of_450_bound"] = r["images_per_s"] / BOUND_IMAGES_PER_S
        for r in rows:
            if r.get("batch") == batch:
                print(json.dumps(_short(r)), flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
