"""``diffseg tune``: the subcommand (registered by pipeline.after.cli.add_subcommands)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipeline.after.datasets_gt import add_ground_truth_arguments
from pipeline.arg_types import comma_floats, comma_ints, described
from pipeline.data.credentials import storage_options_json
from pipeline.help_format import DefaultsHelpFormatter


def _floats_or_range(text: str) -> list[float]:
    """"0.9,1.0,1.1" or a range "0.6:1.4:0.1" (inclusive)."""
    from pipeline.tune.grid import frange

    if ":" in text:
        parts = [float(v) for v in text.split(":")]
        if len(parts) != 3:
            raise ValueError(text)  # refused with what --tau takes (pipeline.arg_parser)
        return frange(*parts)
    return comma_floats(text)


def _choices(allowed: str) -> Any:
    """A comma list of values from ``diffseg_core.parameters.<allowed>`` (read when parsed, not at import)."""
    def parse(text: str) -> list[str]:
        from diffseg_core import parameters

        values = [v.strip().lower() for v in text.split(",")]
        if any(v not in getattr(parameters, allowed) for v in values):
            raise ValueError(text)
        return values

    return parse


def _cut_thresholds(text: str) -> list[float | str]:
    """"auto,0.35,0.5": numbers in (0, 2] or auto (the cut's per-image rule)."""
    from diffseg_core.parameters import grouping_problem

    values: list[float | str] = [v.strip().lower() if v.strip().lower() == "auto" else float(v) for v in text.split(",")]
    if any(grouping_problem("ncut", v) for v in values):
        raise ValueError(text)
    return values


def _switches(text: str) -> list[bool]:
    values = {"off": False, "on": True, "false": False, "true": True}
    try:
        return [values[v.strip().lower()] for v in text.split(",")]
    except KeyError:
        raise ValueError(text) from None


def _schedule(text: str) -> tuple[float, ...]:
    return tuple(_floats_or_range(text))


_FLOATS = "numbers separated by commas (0.9,1.1) or a range START:STOP:STEP (0.6:1.4:0.1)"
_floats = described(_floats_or_range, _FLOATS, "0.9,1.1", "0.6:1.4:0.1", "1.1")
_steps = described(_floats_or_range, _FLOATS.replace("0.9,1.1", "0,-0.1"), "0,-0.1", "-0.1")
_ints = described(comma_ints, "whole numbers separated by commas (2,3)", "2,3", "10")
_mode_list = described(_choices("BOUNDARY_MODES"), "off, pamr or off,pamr", "off", "pamr", "off,pamr", "PAMR")
_switch_list = described(_switches, "off, on or off,on", "off", "on", "off,on", "true")
_grouping_list = described(_choices("GROUPINGS"), "kl-merge, ncut or kl-merge,ncut", "kl-merge", "ncut", "kl-merge,ncut")
_affinity_list = described(_choices("NCUT_AFFINITIES"), "attention, features or attention,features", "attention", "features",
                           "attention,features")
_cut_list = described(_cut_thresholds, "auto or numbers in (0, 2] separated by commas (auto,0.35,0.5)", "auto",
                      "auto,0.35,0.5", "0.5")
_schedules = described(_schedule, "one tau per iteration separated by commas (1.1,1.0,0.9)", "1.1,1.0,0.9")


def add_tune(subparsers: Any) -> None:
    from pipeline.tune.grid import DEFAULT_NUM_POINTS, WEIGHT_PRESETS, Grid

    g = Grid()
    t = subparsers.add_parser(
        "tune", formatter_class=DefaultsHelpFormatter,
        help="choose tau and the other DiffSeg parameters on a small labelled sample",
        description="Extract attention once per labelled image (cached under OUT/attention, reused by later "
        "runs), score every setting of the grid with the paper's protocol on Ray, and write OUT/best.json "
        "(use it with `diffseg label --params OUT/best.json`), OUT/results.csv and OUT/tau.png. The held-out "
        "score is a k-fold estimate of what the chosen setting gives on new images.",
    )
    t.add_argument("images", help="folder (or glob) of the labelled images: image files, local or fsspec URL")
    add_ground_truth_arguments(t)
    t.add_argument("--n", type=int, default=100, help="images to sample (seeded) from those with ground truth")
    t.add_argument("--out", default="tune", help="local folder for best.json, results.csv, tau.png and the cache")
    t.add_argument("--folds", type=int, default=5, help="k of the k-fold held-out estimate")
    t.add_argument("--seed", type=int, default=0, help="sample and fold split")
    m = t.add_argument_group("model (as diffseg label)")
    m.add_argument("--model", default="CompVis/stable-diffusion-v1-4",
                   help="hub id, local diffusers folder, .safetensors, tiny-demo (small learned demo model) or "
                   "tiny-random (random weights)")
    m.add_argument("--revision", default=None, help="hub revision")
    m.add_argument("--image-size", type=int, default=None, help="model input size (default: the model's native)")
    m.add_argument("--timestep", type=int, default=300, help="timestep of the one UNet call, as for diffseg label")
    m.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")
    m.add_argument("--paper-preprocess", action="store_true",
                   help="the paper's protocol: centre-crop to a square, labels at S x S (as label --paper-preprocess)")
    m.add_argument("--batch-size", type=int, default=4, help="images per extractor call")
    s = t.add_argument_group("grid (each list is searched in full)")
    s.add_argument("--tau", type=_floats, default=g.taus, help="KL thresholds: a list 0.9,1.1 or a range START:STOP:STEP")
    s.add_argument("--iterations", type=_ints, default=g.iterations, help="merging iteration counts")
    s.add_argument("--tau-steps", type=_steps, default=g.tau_steps,
                   help="per-iteration change of tau: 0 = one tau for all iterations; -0.1 makes 1.1,1.0,0.9 of 1.1")
    s.add_argument("--schedules", nargs="+", type=_schedules, default=[],
                   help="extra per-iteration schedules, each one tau per iteration: 1.1,1.0,0.9 1.2,1.1")
    s.add_argument("--num-points", type=_ints, default=None,
                   help=f"anchor grid sides (default: {','.join(map(str, DEFAULT_NUM_POINTS))}, those that fit the model)")
    s.add_argument("--weights", nargs="+", default=g.weights,
                   help=f"aggregation weights: presets ({', '.join(WEIGHT_PRESETS)}) or numbers finest first (8,4,2,1)")
    s.add_argument("--refine", type=_switch_list, default=g.refine,
                   help="off, on, or off,on (k-means refinement costs ~40x a plain setting on CPU)")
    s.add_argument("--boundaries", type=_mode_list, default=g.boundaries,
                   help="off, pamr, or off,pamr: PAMR is scored on the best --boundary-candidates plain settings "
                   "of each fold (seconds an image at 512 px on a CPU, so not on every setting)")
    s.add_argument("--pamr-iterations", type=_ints, default=g.pamr_iterations,
                   help="PAMR iteration counts searched (one chain of iterations scores them all)")
    s.add_argument("--boundary-candidates", type=int, default=g.boundary_candidates,
                   help="plain settings per fold and grouping whose PAMR variants are scored")
    s.add_argument("--grouping", type=_grouping_list, default=g.groupings,
                   help="groupings searched: kl-merge (DiffSeg's), ncut (the normalized cut, at each --ncut-threshold "
                   "x --ncut-affinity) or both; --grouping kl-merge leaves the cut out")
    s.add_argument("--ncut-threshold", type=_cut_list, default=g.ncut_thresholds,
                   help="the cut's stopping thresholds searched: auto (its per-image rule) and/or numbers in (0, 2]")
    s.add_argument("--ncut-affinity", type=_affinity_list, default=g.ncut_affinities,
                   help="what the cut cuts: attention (the aggregate's rows), features (the UNet encoder's; scored "
                   "only where the cache holds them) or both")
    e = t.add_argument_group("scoring")
    e.add_argument("--score-size", type=int, default=512,
                   help="score at most this many pixels on the label frame's longer side (0: full size)")
    e.add_argument("--chunk-size", type=int, default=None, help="images per Ray task (default: ~2 tasks per CPU)")
    e.add_argument("--top", type=int, default=15, help="rows of the table printed (all are in results.csv)")
    e.add_argument("--categories", nargs="+", default=None, help="coco-stuff-27: annotation JSON(s), as for eval")
    e.add_argument("--coco-offset", type=int, default=1,
                   help="coco-stuff-27: category id = pixel value + this (1 for stuffthingmaps)")
    e.add_argument("--num-classes", type=int, default=None, help="masks: number of classes (values 0..N-1)")
    e.add_argument("--ignore-value", type=int, nargs="*", default=[255], help="masks: pixel values to ignore")
    e.add_argument("--storage-options", type=storage_options_json, default=None, help="fsspec options as JSON")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(handler=run_tune)


def run_tune(args: argparse.Namespace) -> int:
    from diffseg_core.model_check import ModelLoadError
    from pipeline.after.datasets_gt import GroundTruthError
    from pipeline.errors import LabelError
    from pipeline.tune.grid import Grid, GridError
    from pipeline.tune.prepare import SampleError
    from pipeline.tune.report import format_report
    from pipeline.tune.run import TuneError, tune

    grid = Grid(taus=args.tau, iterations=args.iterations, tau_steps=args.tau_steps, schedules=list(args.schedules),
                num_points=args.num_points, weights=list(args.weights), refine=args.refine,
                boundaries=args.boundaries, pamr_iterations=args.pamr_iterations,
                boundary_candidates=args.boundary_candidates, groupings=args.grouping,
                ncut_thresholds=args.ncut_threshold, ncut_affinities=args.ncut_affinity)
    try:
        report = tune(
            args.images, args.ground_truth, args.format, model=args.model, revision=args.revision,
            image_size=args.image_size, timestep=args.timestep, dtype=args.dtype,
            paper_preprocess=args.paper_preprocess, n=args.n, out=args.out, folds=args.folds, seed=args.seed,
            grid=grid, score_size=args.score_size, batch_size=args.batch_size, chunk_size=args.chunk_size,
            categories=args.categories, coco_offset=args.coco_offset, num_classes=args.num_classes,
            ignore_values=args.ignore_value, storage_options=args.storage_options, progress=not args.no_progress,
        )
    except (GridError, GroundTruthError, SampleError, TuneError, ModelLoadError, LabelError) as exc:
        print(f"diffseg tune: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report, args.top))
    return 0
