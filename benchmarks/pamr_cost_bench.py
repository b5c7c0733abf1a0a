"""Cost of --boundaries pamr: refinement time per 512 px image against full-size SD 1.x's VAE + UNet
time for the same image, measured in one run (SD 1.4's architecture, RANDOM weights: the time is
the weights' shapes', not their values').

    python benchmarks/pamr_cost_bench.py --threads 1 --proposals 16

The refined masks are ``--proposals`` soft maps at 64 x 64 (a typical SD image holds 10-30),
upsampled to the model's 512 x 512 input and refined there with the image's affinities, as
``DiffSeg.label_maps`` does; timed for each --pamr setting (ITERATIONS:DILATIONS, '/'-separated).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.extract_bench import build_sd14_architecture
from diffseg_core.extract import AttentionExtractor  # noqa: E402
from diffseg_core.segmentor import DiffSeg  # noqa: E402


def machine_line() -> str:
    """The processor, CPU count, torch version and load average, for a benchmark's last line."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
            f"load average {', '.join(f'{v:.1f}' for v in load)}")


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--proposals", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pamr", default="10:1,2,4,8,12,24/10:1,2,4,8/5:1,2,4,8,12,24")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    extractor = AttentionExtractor(build_sd14_architecture(), model="sd14-architecture-random-weights",
                                   device=device, dtype=torch.float32)
    from skimage import data

    image = np.ascontiguousarray(data.astronaut()[:512, :512])
    pixels = extractor.to_pixels(image[None])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def model() -> None:
        with torch.inference_mode():
            extractor(pixels)
        sync()

    model()  # warm-up
    model_s = best_of(model, args.repeats)
    gen = torch.Generator().manual_seed(0)
    proposals = [torch.softmax(3 * torch.randn((args.proposals, 64 * 64), generator=gen), -1)
                 .reshape(args.proposals, 64, 64).to(device)]
    print(f"SD 1.4 architecture VAE + UNet, one 512 px image: {model_s:.2f} s ({device}, {args.threads} threads)")
    print("| PAMR setting | refinement s / image | share of VAE + UNet |\n|---|---|---|")
    for spec in args.pamr.split("/"):
        iterations, _, dilations = spec.partition(":")
        seg = DiffSeg(boundaries="pamr", pamr_iterations=int(iterations),
                      pamr_dilations=[int(d) for d in dilations.split(",")])

        def refine() -> None:
            with torch.inference_mode():
                seg.refined(proposals, pixels)
            sync()

        refine()
        s = best_of(refine, args.repeats)
        print(f"| {iterations} iterations, dilations {dilations} | {s:.3f} | {100 * s / model_s:.1f}% |")
    print(f"\n{machine_line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
