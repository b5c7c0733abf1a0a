"""diffseg tune's search: settings scored per second on cached attention vs re-extracting for every setting.

Same run, same machine, same threads:

- ours: extract each image's attention once, store it (float16, safetensors:
  pipeline.tune.cache), then score every setting of the grid on the cached
  maps with the code a Ray task runs (pipeline.tune.score.score_chunk: one
  aggregate per weighting, shared anchor distances per anchor grid, shared
  merge prefixes, one NMS + Hungarian scoring per distinct result); with
  ``--ray`` also the whole fan-out on a local Ray (pipeline.tune.search).
- baseline: what tuning without a cache costs: for every setting and image,
  run the extractor, then ``DiffSeg(setting).segment`` and the same scoring.

The machine is shared and its load drifts, so the ratio comes from ``--rounds``
alternating rounds: ours scores the default's group (proportional weights,
16 x 16 anchors, every schedule of the grid) on the cached maps, then the
baseline runs one setting of that group (a different one each round, every one
re-running the extractor) on the same images; ratio per round, median reported.
The whole grid is also timed once (in-process, and with ``--ray`` on a local Ray).

Attention: the 8 official fixtures' maps (R = 64: 64/32/16/8, SD-like structure,
head-averaged) stand in for what SD 1.x gives at 512 px, with their planted
regions as ground truth (27 classes), so merging does realistic work. The
extractor that is timed is SD 1.4's architecture at 512 px with RANDOM weights
built from its configs (benchmarks/extract_bench.py; the cost does not depend
on the values), fed the skimage photographs; its maps are discarded.

    python benchmarks/tune_bench.py                     # CPU: 4 images, the default grid
    python benchmarks/tune_bench.py --device cuda --dtype fp16 --images 8 --ray
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.extract_bench import build_sd14_architecture  # noqa: E402
from benchmarks.merge_bench import peak, reset_peak  # noqa: E402
from diffseg_core import DiffSeg, SegmentationMetrics  # noqa: E402
from diffseg_core.extract import AttentionExtractor  # noqa: E402
from pipeline.tune.cache import AttentionCache  # noqa: E402
from pipeline.tune.grid import Grid, default_setting, settings as grid_settings, weight_values  # noqa: E402
from pipeline.tune.score import score_chunk  # noqa: E402
from pipeline.tune.search import group_settings  # noqa: E402
from tests.official_fixtures import CASES, build_maps, load_case  # noqa: E402

NUM_CLASSES = 27
RESOLUTIONS = [64, 32, 16, 8]


def photos(n: int) -> list[np.ndarray]:
    from skimage import data

    pool = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    return [pool[i % len(pool)] for i in range(n)]


def fixtures(n: int) -> list[tuple[dict[int, torch.Tensor], np.ndarray]]:
    out = []
    for name in CASES[:n]:
        case = load_case(name)
        maps = {r: m.mean(1) for r, m in build_maps(case).items()}  # head-averaged, as the extractor gives
        out.append((maps, case["labels"].astype(np.int16)))
    return out


def time_extraction(extractor: AttentionExtractor, image: np.ndarray, sync, repeats: int = 2) -> float:
    extractor([image])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        extractor([image])
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4, help="fixture images (at most 8)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of ours vs the baseline")
    ap.add_argument("--small-grid", action="store_true", help="taus 0.8:1.2 x iterations 1..3, one weighting")
    ap.add_argument("--ray", action="store_true", help="also the fan-out on a local Ray (all CPUs)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of ours in-process and of the baseline (Ray tasks run 1 thread each); "
                    "1 keeps a shared machine's load from stalling multi-threaded products")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    grid = Grid(taus=[0.8, 0.9, 1.0, 1.1, 1.2], iterations=[1, 2, 3], tau_steps=[0.0], num_points=[16],
                weights=["proportional"]) if args.small_grid else Grid()
    settings, _ = grid_settings(grid, RESOLUTIONS, "sd14-config", 512)
    default = default_setting()
    settings = [default] + [s for s in settings if s != default]
    data = fixtures(min(args.images, len(CASES)))
    n = len(data)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, device {device}; load {os.getloadavg()}")
    print(f"{len(settings)} settings x {n} images ({len(group_settings(settings, RESOLUTIONS))} weight x anchor groups)")

    # ---------------------------------------------------------------- ours
    with tempfile.TemporaryDirectory() as tmp:
        cache = AttentionCache(tmp)
        t = time.perf_counter()
        paths = [str(cache.put(f"img{i}", maps, {"height": 512, "width": 512, "image_size": 512}))
                 for i, (maps, _) in enumerate(data)]
        t_put = (time.perf_counter() - t) / n
        size = os.path.getsize(paths[0])
        targets = [gt for _, gt in data]
        before = reset_peak("cpu")
        t = time.perf_counter()
        counts = np.zeros((len(settings), 3, NUM_CLASSES), dtype=np.int64)
        scored = 0
        for group, members in group_settings(settings, RESOLUTIONS):
            part = score_chunk(paths, targets, [0] * n, group, NUM_CLASSES, 1, threads=None)  # torch's default
            counts[members] += part["counts"][:, 0]
            scored += part["scored"]
        t_search = time.perf_counter() - t
        search_peak = peak("cpu") - before
        ours = len(settings) * n / t_search
        print(f"cache: {size / 2**20:.1f} MiB per image (float16), write {t_put:.3f} s/image")
        print(f"ours, search on cached attention: {t_search:.1f} s for {len(settings) * n} setting-images "
              f"({scored} distinct label maps scored): {ours:.2f} settings x images / s; "
              f"peak memory above the start {search_peak:.0f} MiB")
        if args.ray:
            import ray

            from pipeline.tune.search import run_search

            ray.init(include_dashboard=False, log_to_driver=False)
            result = run_search(settings, paths, targets, [i % 2 for i in range(n)], 2, NUM_CLASSES, RESOLUTIONS,
                                progress=False)
            ray_rate = len(settings) * n / result.seconds
            assert np.array_equal(result.counts.sum(1), counts), "Ray fan-out and in-process scores differ"
            print(f"ours on Ray ({int(ray.cluster_resources()['CPU'])} CPUs, {result.tasks} tasks): "
                  f"{result.seconds:.1f} s, {ray_rate:.2f} settings x images / s")
            ray.shutdown()

    # ---------------------------------------------------------------- ours vs baseline, interleaved
    # This machine is shared and its load drifts by minutes, so the two sides are timed in
    # alternating rounds: each round scores the default's group (proportional weights, 16 x 16
    # anchors: every schedule of the grid) on the cached maps, then runs the baseline for one
    # setting of that group on the same images. The ratio is taken per round; its median is reported.
    extractor = AttentionExtractor(build_sd14_architecture(), model="sd14-config (RANDOM weights)", device=device,
                                   dtype=args.dtype, image_size=512)
    image = photos(1)[0]
    t_extract = time_extraction(extractor, image, sync)
    print(f"extraction (SD 1.4 architecture, 512 px, batch 1): {t_extract:.3f} s/image")
    group, members = next((g, m) for g, m in group_settings(settings, RESOLUTIONS) if 0 in m)
    picks = [members[round(i * (len(members) - 1) / max(1, args.rounds - 1))] for i in range(args.rounds)]
    ratios, base_times, worst = [], [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        cache = AttentionCache(tmp)
        paths = [str(cache.put(f"img{i}", maps, {"height": 512, "width": 512, "image_size": 512}))
                 for i, (maps, _) in enumerate(data)]
        for p in picks:
            t = time.perf_counter()
            part = score_chunk(paths, targets, [0] * n, group, NUM_CLASSES, 1, threads=None)
            ours_round = len(members) * n / (time.perf_counter() - t)
            s = settings[p]
            seg = DiffSeg(kl_threshold=list(s.thresholds), num_points=s.num_points, refine=s.refine,
                          weights=weight_values(s.weights, RESOLUTIONS))
            metrics = SegmentationMetrics(NUM_CLASSES)
            t = time.perf_counter()
            for maps, gt in data:
                extractor([image])  # what tuning without a cache pays for every setting
                sync()
                labels = seg.segment({r: m.to(device) for r, m in maps.items()}, (512, 512))[0].cpu().numpy()
                metrics.update(labels, gt)
            t_base = (time.perf_counter() - t) / n
            base_times.append(t_base)
            ratios.append(ours_round * t_base)
            tp, fp, fn = part["counts"][members.index(p), 0]
            ours_miou = SegmentationMetrics.from_dict({"num_classes": NUM_CLASSES, "tp": tp, "fp": fp, "fn": fn,
                                                       "labelled_pixels": int(tp.sum() + fn.sum()),
                                                       "num_images": n}).miou()
            worst = max(worst, abs(ours_miou - metrics.miou()))
            print(f"round: {s.describe()}: ours {ours_round:.2f} settings x images / s (its group of "
                  f"{len(members)}), baseline {t_base:.2f} s per setting-image, ratio {ours_round * t_base:.0f}x; "
                  f"load {os.getloadavg()[0]:.1f}")
    base = 1.0 / statistics.median(base_times)
    ours_e2e = len(settings) * n / (t_search + n * (t_extract + t_put))
    print(f"baseline, extract + segment + score per setting (median of {len(picks)} rounds): "
          f"{1 / base:.2f} s per setting-image, {base:.3f} settings x images / s")
    print(f"largest mIoU difference, cached float16 vs fresh float32 attention, on those settings: "
          f"{100 * worst:.3f} points")
    print(f"speed-up, search on cached attention (median of the rounds' ratios): {statistics.median(ratios):.0f}x "
          f"(rounds: {', '.join(f'{r:.0f}x' for r in ratios)})")
    print(f"whole grid, including one extraction per image: {ours_e2e:.2f} settings x images / s, "
          f"{ours_e2e / base:.0f}x the baseline's median")


if __name__ == "__main__":
    main()
