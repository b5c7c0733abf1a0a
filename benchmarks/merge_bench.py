"""Time DiffSeg.segment on the official fixtures' attention (R = 64) against a
straight port of the reference's loop structure, in the same run.

    python benchmarks/merge_bench.py                 # CPU, all 8 fixtures
    python benchmarks/merge_bench.py --device cuda   # where a GPU is lent

Measured: seconds per image at batch 1 and images/s at batch 1 and 8, with the
maps as the fixtures hold them (2 heads), with 8 heads as SD 1.x has (the
fixture's heads repeated: same labels, SD's memory traffic), and head-averaged
(what the attention extractor hands over); aggregation included, input
building excluded; peak
memory above the input (CPU: resident-set high-water mark reset before each
measurement; CUDA: max_memory_allocated). The baseline is
benchmarks/reference_port.py, one image at a time.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import reference_port  # noqa: E402
from diffseg_core import DiffSeg  # noqa: E402
from tests.official_fixtures import CASES, build_maps, load_case  # noqa: E402


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(device: str) -> float:
    """Reset the memory high-water mark; return the current usage in MiB."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pass
    return rss_mib("VmRSS")


def peak(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return rss_mib("VmHWM")


def timed(fn, device: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per configuration (after one warm-up)")
    parser.add_argument("--baseline-images", type=int, default=2, help="fixtures the (slow) reference port runs on")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    device = args.device

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    cases = [build_maps(load_case(name)) for name in CASES]
    rows = []

    heads = cases[0][max(cases[0])].shape[1]
    forms = {
        f"fixture ({heads} heads)": lambda maps: maps,
        "8 heads (fixture heads repeated)": lambda maps: {r: m.repeat(1, 8 // heads, 1, 1) for r, m in maps.items()},
        "head-averaged": lambda maps: {r: m.mean(1) for r, m in maps.items()},
    }
    for form, make in forms.items():
        inputs = [make(maps) for maps in cases]
        inputs = [{r: m.to(device) for r, m in maps.items()} for maps in inputs]
        # Batch 1: every fixture, one at a time. A fresh segmentor each time,
        # so that its reusable work buffers count in the peak.
        seg = DiffSeg(kl_threshold=1.1, num_points=16, iterations=3)
        base = reset_peak(device)
        seg.segment(inputs[0])  # warm-up
        per_image = []
        for maps in inputs:
            per_image += timed(lambda: seg.segment(maps), device, args.repeats)
        mem1 = peak(device) - base
        median1 = statistics.median(per_image)
        rows.append((form, 1, median1, 1 / median1, mem1))
        # Batch N: the fixtures stacked.
        batch = {r: torch.cat([maps[r] for maps in (inputs * args.batch)[: args.batch]]) for r in inputs[0]}
        del inputs
        seg = DiffSeg(kl_threshold=1.1, num_points=16, iterations=3)
        base = reset_peak(device)
        seg.segment(batch)  # warm-up
        times = timed(lambda: seg.segment(batch), device, max(2, args.repeats // 2))
        memn = peak(device) - base
        median_n = statistics.median(times)
        rows.append((form, args.batch, median_n / args.batch, args.batch / median_n, memn))
        del batch, seg

    print("\nours (DiffSeg.segment, 512x512 labels)")
    print("| input | batch | s/image (median) | images/s | peak memory above the input (work buffers included) |")
    print("|---|---|---|---|---|")
    for form, b, spi, ips, mem in rows:
        print(f"| {form} | {b} | {spi:.3f} | {ips:.2f} | {mem:.0f} MiB |")

    baseline = []
    for maps in cases[: args.baseline_images]:
        start = time.perf_counter()
        reference_port.segment(maps)
        baseline.append(time.perf_counter() - start)
    base_spi = statistics.median(baseline)
    ours_spi = rows[0][2]
    print(f"\nbaseline (straight port of the reference's loops, CPU, fixture input): {base_spi:.2f} s/image "
          f"over {len(baseline)} image(s)")
    print(f"ratio: ours is {base_spi / ours_spi:.1f}x faster than the baseline at batch 1 (same input)")
    batch1 = {form: spi for form, b, spi, _, _ in rows if b == 1}
    verdict = ", ".join(f"{form} {spi:.3f} s {'met' if spi <= 0.150 else 'NOT met'}" for form, spi in batch1.items())
    print(f"target <= 0.150 s/image at batch 1 on CPU: {verdict}")


if __name__ == "__main__":
    main()
