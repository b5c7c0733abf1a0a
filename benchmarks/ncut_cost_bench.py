"""Cost of --grouping ncut (issue 33): the normalized cut's time per image against the same model's
VAE encode + UNet pass and against DiffSeg's KL merge, all measured in one run on the same images.

    python benchmarks/ncut_cost_bench.py --model tiny-demo --threads 2
    python benchmarks/ncut_cost_bench.py --model tiny-random --image-size 512 --threads 2
    python benchmarks/ncut_cost_bench.py --model sd14-architecture --device cuda --dtype fp16 --batch 8

The images are held-out synthetic scenes (``make_scene``) at ``--image-size``, so the cut recurses
on real structure (tiny-demo) or on what a random model's attention holds (tiny-random,
``sd14-architecture``: SD 1.4's UNet and VAE from their configs, RANDOM weights, as
``extract_bench.py`` builds them; the time is the shapes', not the weights'). Each stage is timed
alone, best of ``--repeats`` after a warm-up, on one batch, the repeats round-robin over the stages
(on a shared machine each stage then sees the same load):

- model: ``extractor.encode`` (VAE) and ``extractor.attention`` (UNet, the attention and feature
  capture included); ``extractor.extract`` (both, one call) is timed too, as the pipeline calls it;
- aggregate: ``aggregate_attention`` at the card's weights (both groupings start from it; the
  features affinity does not need it);
- KL merge: ``DiffSeg.proposals_from_aggregate`` at the card's tau / anchors / iterations;
- ncut: ``grouping.ncut_proposals`` per affinity (auto threshold, alpha 10), batched over the batch.

Ratios are of per-image times. PAMR and the NMS (the same for both groupings) are not counted.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.extract_bench import build_sd14_architecture  # noqa: E402
from benchmarks.pamr_cost_bench import best_of, machine_line  # noqa: E402
from diffseg_core.aggregate import aggregate_attention  # noqa: E402
from diffseg_core.demo_model.scenes import HELD_OUT_SEEDS, make_scene  # noqa: E402
from diffseg_core.extract import AttentionExtractor  # noqa: E402
from diffseg_core.grouping import ncut_proposals  # noqa: E402
from diffseg_core.method_defaults import PAPER_DEFAULTS, model_method_defaults  # noqa: E402
from diffseg_core.segmentor import DiffSeg  # noqa: E402

SD14 = "sd14-architecture"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load(model: str, device: torch.device, dtype: torch.dtype, image_size: int | None) -> AttentionExtractor:
    """The extractor of ``model``; ``sd14-architecture``: SD 1.4's shapes with random weights."""
    if model == SD14:
        return AttentionExtractor(build_sd14_architecture(), model="sd14-architecture-random-weights",
                                  device=device, dtype=dtype, image_size=image_size, random_weights=True)
    return AttentionExtractor.from_pretrained(model, device=device, dtype=dtype, image_size=image_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-demo", help=f"tiny-demo, tiny-random, a folder, or {SD14}")
    parser.add_argument("--image-size", type=int, default=None,
                        help="pixels a side (default: the model's native size: tiny-demo 256, SD 1.x 512)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the UNet's dtype")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--affinities", default="attention,features")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    extractor = load(args.model, device, DTYPES[args.dtype], args.image_size)
    size = extractor.image_size
    method = dict(PAPER_DEFAULTS) if args.model == SD14 else model_method_defaults(args.model)
    images = np.stack([make_scene(HELD_OUT_SEEDS[k], size).image for k in range(args.batch)])
    pixels = extractor.to_pixels(images)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(fn: Callable[[], object]) -> object:
        with torch.inference_mode():
            out = fn()
        sync()
        return out

    # one warm-up call per stage, in order (each stage's input is the one before's output) ...
    latents = run(lambda: extractor.encode(pixels))
    extraction = run(lambda: extractor.extract(pixels))
    maps, features = extraction.self_attention, extraction.features
    aggregate = run(lambda: aggregate_attention(maps, method["weights"]))
    merge = DiffSeg(kl_threshold=method["kl_threshold"], num_points=method["num_points"],
                    iterations=method["iterations"], weights=method["weights"])
    stages: dict[str, Callable[[], object]] = {
        "encode": lambda: extractor.encode(pixels), "unet": lambda: extractor.attention(latents),
        "extract": lambda: extractor.extract(pixels), "aggregate": lambda: aggregate_attention(maps, method["weights"]),
        "merge": lambda: merge.proposals_from_aggregate(aggregate)}
    for affinity in args.affinities.split(","):
        stages[affinity] = (lambda a=affinity: ncut_proposals(aggregate if a == "attention" else None, features,
                                                              threshold="auto", affinity=a))
    results = {name: run(fn) for name, fn in stages.items() if name not in ("encode", "unet", "extract", "aggregate")}
    # ... then the repeats round-robin over the stages, so that each sees the same load; best of them per image
    seconds = {name: float("inf") for name in stages}
    for _ in range(args.repeats):
        for name, fn in stages.items():
            seconds[name] = min(seconds[name], best_of(lambda fn=fn: run(fn), 1) / args.batch)
    encode_s, unet_s, extract_s, aggregate_s, merge_s = (seconds[k] for k in
                                                          ("encode", "unet", "extract", "aggregate", "merge"))
    merged = results["merge"]
    model_s = encode_s + unet_s
    side = int(round(aggregate.shape[1] ** 0.5))
    print(f"{args.model} at {size} px ({side} x {side} aggregated attention, features "
          f"{tuple(features.shape[1:])}), batch {args.batch}, {device} {args.dtype}, {args.threads} threads, "
          f"best of {args.repeats}; seconds per image")
    print(f"VAE encode {encode_s:.4f} + UNet {unet_s:.4f} = {model_s:.4f} s (extract() in one call: {extract_s:.4f} s); "
          f"aggregate {aggregate_s:.4f} s")
    print("| grouping (after the aggregate) | s / image | segments / image | share of VAE + UNet | "
          "with the aggregate, share of VAE + UNet | against the KL merge |\n|---|---|---|---|---|---|")
    rows = [("DiffSeg KL merge (proposals_from_aggregate)", merge_s, merged, True)]
    rows += [(f"ncut {a}, auto (ncut_proposals)", seconds[a], results[a], a == "attention")
             for a in args.affinities.split(",")]
    for name, cut_s, proposals, needs_aggregate in rows:
        whole = cut_s + (aggregate_s if needs_aggregate else 0.0)
        segments = np.mean([p.shape[0] for p in proposals])
        print(f"| {name} | {cut_s:.4f} | {segments:.1f} | {100 * cut_s / model_s:.1f}% | "
              f"{100 * whole / model_s:.1f}% | {cut_s / merge_s:.2f}x |")
    print(f"\n{machine_line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
