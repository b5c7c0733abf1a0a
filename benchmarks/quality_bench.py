"""Segmentation quality of tiny-demo on held-out synthetic scenes: DiffSeg (tau swept) vs the
paper's K-Means-C (k = 6) and K-Means-S (k = true regions per scene), and tiny-random.

    python benchmarks/quality_bench.py --scenes 200 --taus 0.5,0.7,0.9,1.1,1.3,1.5
    python benchmarks/quality_bench.py --scenes 200 --taus 1.5 --pamr 10 --ncut --scenes-kind both

``--ncut T,T,...`` adds the normalized-cut grouping (``DiffSeg(grouping="ncut")``, issue 33) at each
threshold, for each ``--ncut-affinity``, plain and with PAMR at ``DiffSeg(boundaries="pamr")``'s
defaults (the card's setting), on the same pass's attention and encoder features
(``AttentionExtractor.extract``, once per batch). ``--scenes-kind textured`` scores the textured
variant of the same seeds (close colours, distinct textures; ``make_scene(textured=True)``);
``both`` prints one table per kind. The "segments / image" column is the mean number of segments
in the final label maps, beside the scenes' true mean region count.

Every method clusters the same attention (one extractor pass per scene) and is scored with
the paper's protocol (``SegmentationMetrics``: per-image Hungarian matching, TP/FP/FN summed
over the scenes). Scenes come from ``scenes.HELD_OUT_SEEDS``, which training never sees.
tiny-random (random weights) is the floor, scored the same way at its own defaults.

A reference row, "colour oracle", is not a model: its attention is computed from each scene's own
pixels (every 8 x 8 patch's mean colour, a Gaussian kernel on colour distance, at tiny-demo's
32 x 32 attention grid) and merged by the same DiffSeg. It shows what a model that groups
pixels perfectly by colour would score on these scenes at this resolution: the ceiling that
colour alone gives (textures, gradients and region edges cost it the rest).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from diffseg_core.aggregate import aggregate_attention
from diffseg_core.demo_model.scenes import HELD_OUT_SEEDS, MAX_REGIONS, make_scene
from diffseg_core.extract import AttentionExtractor, Extraction
from diffseg_core.kmeans import kmeans_constant, kmeans_per_image
from diffseg_core.merge import compact_labels, labels_from_proposals
from diffseg_core.method_defaults import model_method_defaults
from diffseg_core.metrics import SegmentationMetrics
from diffseg_core.segmentor import DiffSeg

ORACLE_SIGMA = 20.0  # colour distance scale of the oracle's kernel, in 0-255 RGB units


def colour_oracle(images: np.ndarray, patch: int = 8) -> dict[int, torch.Tensor]:
    """{R: (B, R*R, R*R)} attention from the pictures themselves: softmax over keys of
    -|c_q - c_k|^2 / (2 sigma^2), c = each patch x patch block's mean colour."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    colours = torch.nn.functional.avg_pool2d(x, patch).flatten(2).transpose(1, 2)  # (B, R*R, 3)
    attention = torch.softmax(-torch.cdist(colours, colours) ** 2 / (2 * ORACLE_SIGMA**2), dim=-1)
    return {images.shape[1] // patch: attention}


BOUNDARY_TOLERANCE = 2  # px: a predicted boundary pixel this close to a true one counts as found


def boundary(labels: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another label."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


class BoundaryF:
    """Boundary F-score at a pixel tolerance, counts summed over the scenes: precision is the share
    of predicted boundary pixels within the tolerance of a true one, recall the converse."""

    def __init__(self, tolerance: int = BOUNDARY_TOLERANCE) -> None:
        self.tolerance, self.counts = tolerance, np.zeros(4)

    def update(self, pred: np.ndarray, truth: np.ndarray) -> None:
        from scipy.ndimage import distance_transform_edt

        p, t = boundary(pred), boundary(truth)
        near_t = distance_transform_edt(~t) <= self.tolerance if t.any() else np.zeros_like(t)
        near_p = distance_transform_edt(~p) <= self.tolerance if p.any() else np.zeros_like(p)
        self.counts += [(p & near_t).sum(), p.sum(), (t & near_p).sum(), t.sum()]

    def f(self) -> float:
        hit_p, n_p, hit_t, n_t = self.counts
        precision, recall = hit_p / max(n_p, 1), hit_t / max(n_t, 1)
        return 2 * precision * recall / max(precision + recall, 1e-12)


#: DiffSeg variants scored beside the plain method: name -> DiffSeg's refinement / clean-up options.
VARIANTS: dict[str, dict[str, Any]] = {}

#: The PAMR setting the ncut rows are scored with: DiffSeg(boundaries="pamr")'s defaults, tiny-demo's card.
NCUT_PAMR = {"boundaries": "pamr"}
NCUT_THRESHOLDS = "auto,0.35,0.5,0.7"


def ncut_groupings(thresholds: list[float | str], affinities: list[str], weights: list[float] | None,
                   alpha: float, pamr_thresholds: list[float | str] | None = None,
                   ) -> dict[str, tuple[DiffSeg, DiffSeg | None]]:
    """{row name: (the cut, boundaries off; the same cut's PAMR finisher, or None where the threshold
    is not in ``pamr_thresholds`` (None: every threshold gets one))} per affinity and threshold."""
    out = {}
    for affinity in affinities:
        for threshold in thresholds:
            options = {"grouping": "ncut", "ncut_threshold": threshold, "ncut_affinity": affinity,
                       "ncut_alpha": alpha, "weights": weights}
            with_pamr = pamr_thresholds is None or threshold in pamr_thresholds
            out[f"ncut {affinity} tau={threshold}"] = (DiffSeg(**options),
                                                       DiffSeg(**options, **NCUT_PAMR) if with_pamr else None)
    return out


def score(extract: Callable[[np.ndarray], dict[int, torch.Tensor] | Extraction], method: dict[str, Any],
          scenes: list, taus: list[float], batch: int, kmeans: bool, variants: dict[str, dict[str, Any]] | None = None,
          ncut: dict[str, tuple[DiffSeg, DiffSeg | None]] | None = None,
          progress: Callable[[int, dict[str, tuple[SegmentationMetrics, BoundaryF, list[int]]]], None] | None = None,
          ) -> dict[str, tuple[SegmentationMetrics, BoundaryF, list[int]]]:
    """{method: (metrics, boundary F, segments per image)} over the scenes, labelled at their own size
    from the attention ``extract`` gives (maps, or an `Extraction` whose features the ncut rows may
    use), with DiffSeg's ``method`` parameters (num_points, iterations, weights) and tau swept; each
    of ``variants`` ({suffix: DiffSeg options}) is scored beside each tau, each of ``ncut``
    (`ncut_groupings`) plain and "+pamr", the cut batched over the batch's images. ``progress``
    is called with the scenes scored so far and the metrics after each batch."""
    weights = method["weights"]
    variants = variants or {}
    ncut = ncut or {}
    segmentors = {tau: DiffSeg(kl_threshold=tau, num_points=method["num_points"],
                               iterations=method["iterations"], weights=weights) for tau in taus}
    finishers = {suffix: DiffSeg(**options) for suffix, options in variants.items()}
    names = [f"DiffSeg tau={tau:g}{suffix}" for tau in taus for suffix in ["", *variants]]
    names += [f"{name}{suffix}" for name, (_, finisher) in ncut.items() for suffix in ("", " +pamr")[: 1 + bool(finisher)]]
    names += ["K-Means-C", "K-Means-S"] if kmeans else []
    metrics = {name: (SegmentationMetrics(MAX_REGIONS, -1), BoundaryF(), []) for name in names}
    for start in range(0, len(scenes), batch):
        chunk = scenes[start : start + batch]
        images = np.stack([s.image for s in chunk])
        out = extract(images)
        maps, features = (out.self_attention, out.features) if isinstance(out, Extraction) else (out, None)
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # the model's input
        sizes = [scene.regions.shape for scene in chunk]
        cut_preds: dict[str, list[torch.Tensor]] = {}
        for name, (cut, finisher) in ncut.items():
            proposals = cut.proposals(maps, features)
            cut_preds[name] = cut.label_maps(proposals, sizes)
            if finisher is not None:
                cut_preds[f"{name} +pamr"] = finisher.label_maps(proposals, sizes, pixels)
        for b, scene in enumerate(chunk):
            one = {r: m[b : b + 1] for r, m in maps.items()}
            size = scene.regions.shape
            aggregate = aggregate_attention(one, weights)
            preds = {}
            for tau, seg in segmentors.items():
                proposals = seg.proposals_from_aggregate(aggregate)[0]
                preds[f"DiffSeg tau={tau:g}"] = compact_labels(labels_from_proposals(proposals, size))
                for suffix, finisher in finishers.items():
                    preds[f"DiffSeg tau={tau:g}{suffix}"] = finisher.label_maps([proposals], [size],
                                                                                pixels[b : b + 1])[0]
            if kmeans:
                preds["K-Means-C"] = kmeans_constant(one, k=6, output_size=size)[0]
                preds["K-Means-S"] = kmeans_per_image(one, [scene.num_regions], output_size=size)[0]
            preds.update({name: labels[b] for name, labels in cut_preds.items()})
            truth = scene.regions.astype(np.int64)
            for name, pred in preds.items():
                pred = pred.to(torch.int64).cpu().numpy()
                metrics[name][0].update(pred, truth)
                metrics[name][1].update(pred, truth)
                metrics[name][2].append(len(np.unique(pred)))
        if progress is not None:
            progress(start + len(chunk), metrics)
    return metrics


def print_table(rows: list[tuple[str, str, tuple[SegmentationMetrics, BoundaryF, list[int]]]], model: str,
                default_tau: float) -> None:
    """The markdown table of ``rows`` (model, method, scores); the model's default DiffSeg row in bold."""
    print(f"| model | method | mIoU | pixel accuracy | boundary F ({BOUNDARY_TOLERANCE} px) | segments / image |\n"
          "|---|---|---|---|---|---|")
    for row_model, name, (m, bf, segments) in rows:
        bold = "**" if row_model == model and name == f"DiffSeg tau={default_tau:g}" else ""
        print(f"| {row_model} | {bold}{name}{bold} | {bold}{m.miou():.3f}{bold} | {bold}{m.pixel_accuracy():.3f}{bold} "
              f"| {bf.f():.3f} | {np.mean(segments):.2f} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--taus", default="0.5,0.7,0.9,1.1,1.3,1.5")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-random", action="store_true", help="skip the tiny-random floor")
    parser.add_argument("--no-oracle", action="store_true", help="skip the colour-oracle reference row")
    parser.add_argument("--no-kmeans", action="store_true",
                        help="skip K-Means-C/S (slow on 64 x 64 attention: 4096 points of 4096 dimensions)")
    parser.add_argument("--model", default="tiny-demo",
                        help="the model scored (a training run's output folder, say); its card gives the defaults")
    parser.add_argument("--first-scene", type=int, default=0,
                        help="index into HELD_OUT_SEEDS of the first scene; 50000: the validation scenes the "
                        "shipped defaults were chosen on (0: this table's)")
    parser.add_argument("--weights", default=None, help="aggregation weights, finest first (default: the model's)")
    parser.add_argument("--num-points", type=int, default=None, help="anchor grid side (default: the model's)")
    parser.add_argument("--iterations", type=int, default=None, help="merge iterations (default: the model's)")
    parser.add_argument("--timestep", type=int, default=300, help="timestep of the one UNet call (the paper's 300)")
    parser.add_argument("--pamr", default=None, metavar="ITERATIONS[:D,D,...]",
                        help="score DiffSeg with --boundaries pamr too, at these iterations (and dilations), "
                        "e.g. 10:1,2,4,8,12,24; several separated by '/'")
    parser.add_argument("--clean", default=None, metavar="AREA",
                        help="score the first --pamr setting with --min-region-area AREA --connected too")
    parser.add_argument("--ncut", nargs="?", const=NCUT_THRESHOLDS, default=None, metavar="T,T,...",
                        help="score DiffSeg(grouping='ncut') too at these thresholds ('auto' or a float; "
                        f"alone: {NCUT_THRESHOLDS}), plain and with PAMR at its defaults")
    parser.add_argument("--ncut-affinity", default="attention,features",
                        help="the cut's affinities to score (attention, features or both, comma-separated)")
    parser.add_argument("--ncut-alpha", type=float, default=10.0, help="the affinity's exponent (DiffCut's 10)")
    parser.add_argument("--scenes-kind", choices=("plain", "textured", "both"), default="plain",
                        help="the scenes scored: the plain ones, their textured variants (close colours, "
                        "distinct textures) or both, one table per kind")
    parser.add_argument("--ncut-pamr", default=None, metavar="T,T,...",
                        help="score the ncut rows with PAMR only at these of the --ncut thresholds (default: all)")
    parser.add_argument("--report-every", type=int, default=0, metavar="SCENES",
                        help="print the model's table so far every SCENES scenes (a long run's partial figures)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    taus = [float(t) for t in args.taus.split(",")]
    started, cpu0 = time.perf_counter(), time.process_time()
    demo = AttentionExtractor.from_pretrained(args.model, timestep=args.timestep)
    demo_method = model_method_defaults(args.model)
    if args.weights is not None:
        demo_method["weights"] = [float(w) for w in args.weights.split(",")]
    for key in ("num_points", "iterations"):
        if getattr(args, key) is not None:
            demo_method[key] = getattr(args, key)
    demo_size = demo.image_size
    seeds = [HELD_OUT_SEEDS[args.first_scene + k] for k in range(args.scenes)]
    default_tau = demo_method["kl_threshold"]
    variants: dict[str, dict[str, Any]] = {}
    for spec in (args.pamr.split("/") if args.pamr else []):
        iterations, _, dilations = spec.partition(":")
        options = {"boundaries": "pamr", "pamr_iterations": int(iterations)}
        if dilations:
            options["pamr_dilations"] = [int(d) for d in dilations.split(",")]
        variants[f" +pamr {spec}"] = options
    if args.clean is not None and variants:
        first = next(iter(variants.values()))
        variants[f"{next(iter(variants))} +clean {args.clean}"] = {
            **first, "min_region_area": int(args.clean), "connected": True}
    ncut = {}
    if args.ncut:
        thresholds = [t if t == "auto" else float(t) for t in args.ncut.split(",")]
        pamr_thresholds = (None if args.ncut_pamr is None else
                           [t if t == "auto" else float(t) for t in args.ncut_pamr.split(",")])
        ncut = ncut_groupings(thresholds, args.ncut_affinity.split(","), demo_method["weights"], args.ncut_alpha,
                              pamr_thresholds)
    random_extractor = None if args.no_random else AttentionExtractor.from_pretrained("tiny-random")
    kinds = ["plain", "textured"] if args.scenes_kind == "both" else [args.scenes_kind]
    for kind in kinds:
        kind_started = time.perf_counter()
        scenes = [make_scene(seed, demo_size, textured=kind == "textured") for seed in seeds]
        truth_regions = np.mean([scene.num_regions for scene in scenes])
        header = (f"held-out {kind} scenes ({demo_size} px, seeds {seeds[0]}..{seeds[-1]}, "
                  f"{truth_regions:.2f} true regions / image); "
                  f"{args.model}'s default tau: {default_tau:g}; {demo_method['num_points']} x "
                  f"{demo_method['num_points']} anchors, {demo_method['iterations']} iterations, weights "
                  f"{demo_method['weights'] or 'proportional'}, timestep {args.timestep}"
                  + (f"; ncut alpha {args.ncut_alpha:g}" if ncut else ""))

        def report(done: int, metrics: dict, kind: str = kind, started: float = kind_started) -> None:
            if args.report_every and done < len(seeds) and done % args.report_every < args.batch:
                print(f"\n(partial, {kind}: {done} of {len(seeds)} scenes, {time.perf_counter() - started:.0f} s)")
                print_table([(args.model, name, m) for name, m in metrics.items()], args.model, default_tau)

        # extract(): the attention and the encoder's features from one pass per batch
        demo_scores = score(demo.extract, demo_method, scenes, taus, args.batch, not args.no_kmeans, variants, ncut,
                            report)
        rows = [(args.model, name, m) for name, m in demo_scores.items()]
        if not args.no_oracle:  # the model's parameters; one resolution, so no per-level weights
            oracle = score(colour_oracle, {**demo_method, "weights": None}, scenes, taus, args.batch, False)
            rows += [("colour oracle", name, m) for name, m in oracle.items()]
        if random_extractor is not None:
            random_method = model_method_defaults("tiny-random")
            random = score(random_extractor, random_method, scenes, [random_method["kl_threshold"]], args.batch, False)
            rows += [("tiny-random", name, m) for name, m in random.items()]
        print(f"\n{len(scenes)} {header}")
        print_table(rows, args.model, default_tau)
        print(f"({kind}: {time.perf_counter() - kind_started:.0f} s wall)", flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    print(f"\n{time.perf_counter() - started:.0f} s wall, {time.process_time() - cpu0:.0f} s CPU; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({args.threads} threads); load average {', '.join(f'{v:.1f}' for v in load)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
