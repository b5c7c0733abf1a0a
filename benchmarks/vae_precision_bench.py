"""VAE encoder precision: do bf16 latents give the labels float32 latents give?

    python benchmarks/vae_precision_bench.py                      # full-size SD 1.x VAE+UNet, RANDOM weights, 512 px
    python benchmarks/vae_precision_bench.py --model tiny-demo    # a learned model, where one is at hand

The same photographs (scikit-image's) are encoded with the VAE in float32 and in
bfloat16 (the GPU default since issue 15); everything after the encoder runs in
float32 on both latents: one UNet call, DiffSeg, NMS at 512 x 512. Reported per
image: max |a - b| / max |a| and mean |a - b| / mean |a| of the latents, their
relative L2 difference, and the share of label pixels unchanged (ids compared as
they are, and after matching segments one to one).

With RANDOM weights the VAE maps images to nearly constant latents; the VAE's scaling
factor is calibrated so float32 latents have unit variance (the scale of real SD
latents), which makes the attention, and so the labels, depend on the image. Both
encodes share that factor, so the comparison is fair, but the labels mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.actor_bench import calibrate_latent_scale, photo_batch  # noqa: E402
from diffseg_core.extract import AttentionExtractor  # noqa: E402
from diffseg_core.segmentor import DiffSeg  # noqa: E402
from tests.synthetic_attention import agreement as matched_agreement  # noqa: E402 - Hungarian-matched pixels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SD 1.x architecture with random weights; or tiny-random, "
                   "tiny-demo, a folder")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--image-size", type=int, default=None, help="default: the model's native size")
    p.add_argument("--kl-threshold", type=float, default=None, help="default: the model's (the paper's 1.1 for SD)")
    p.add_argument("--num-points", type=int, default=None, help="default: the model's (16 for SD)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    print(f"# machine: {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    if args.model is None:
        from benchmarks.extract_bench import build_sd14_architecture

        ex = AttentionExtractor(build_sd14_architecture(), model="sd14-architecture-random-weights", device="cpu",
                                dtype="fp32", image_size=args.image_size or 512, vae_dtype="fp32")
        random_weights, calibrate = True, True
    else:
        ex = AttentionExtractor.from_pretrained(args.model, device="cpu", dtype="fp32", image_size=args.image_size,
                                                vae_dtype="fp32")
        random_weights = bool(ex.model_info.get("random_weights"))
        calibrate = False
    images = photo_batch(args.images, ex.image_size)
    if calibrate:
        calibrate_latent_scale(ex, images)
    print(f"# model {args.model or 'SD 1.x architecture'}{' (RANDOM weights)' if random_weights else ''}, "
          f"{ex.image_size} px, built in {time.perf_counter() - t0:.1f} s", flush=True)
    from diffseg_core.method_defaults import with_method_defaults

    seg = DiffSeg(**with_method_defaults(args.model or "CompVis/stable-diffusion-v1-4",
                                         {"kl_threshold": args.kl_threshold, "num_points": args.num_points}))
    print(f"# DiffSeg: {seg!r}", flush=True)
    size = (ex.image_size, ex.image_size)
    results = []
    with torch.inference_mode():
        pixels = ex.to_pixels(images)
        latents = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            torch.nn.Module.to(ex.vae, dtype)  # SD's VAE keeps nothing in fp32: torch's cast, without diffusers' warning
            ex.vae_dtype = dtype
            t = time.perf_counter()
            latents[name] = torch.cat([ex.encode(pixels[i : i + 1]).float() for i in range(len(pixels))])
            print(f"# VAE encode {name}: {(time.perf_counter() - t) / len(pixels):.2f} s/image", flush=True)
        torch.nn.Module.to(ex.vae, torch.float32)
        labels = {}
        for name, lat in latents.items():
            labels[name] = [seg.label_maps(seg.proposals(ex.attention(lat[i : i + 1])), [size])[0].numpy()
                            for i in range(len(lat))]
    a, b = latents["fp32"], latents["bf16"]
    for i in range(len(a)):
        d = (a[i] - b[i]).abs()
        la, lb = labels["fp32"][i], labels["bf16"][i]
        row = {"image": i, "latent_max_rel": float(d.max() / a[i].abs().max()),
               "latent_mean_rel": float(d.mean() / a[i].abs().mean()),
               "latent_rel_l2": float((a[i] - b[i]).norm() / a[i].norm()),
               "segments_fp32": int(la.max()) + 1, "segments_bf16": int(lb.max()) + 1,
               "label_pixels_equal": float((la == lb).mean()), "label_pixels_matched": matched_agreement(la, lb)}
        results.append(row)
        print(json.dumps({k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    summary = {k: (min(r[k] for r in results) if k.startswith("label") else max(r[k] for r in results))
               for k in ("latent_max_rel", "latent_mean_rel", "latent_rel_l2", "label_pixels_equal",
                         "label_pixels_matched")}
    print("worst over images:", json.dumps({k: float(f"{v:.4g}") for k, v in summary.items()}), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": results, "worst": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
