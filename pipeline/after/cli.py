"""``diffseg eval | export | show``: the subcommands for after labeling.

``pipeline.cli`` wires them in with ``add_subcommands(sub)`` on its subparsers;
each parser sets ``handler``, which takes the parsed args and returns the exit code.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.after.datasets_gt import add_ground_truth_arguments
from pipeline.after.export import DATUMARO_IMAGES, LAYOUTS, MAPS
from pipeline.arg_parser import CommandParser
from pipeline.data.credentials import storage_options_json
from pipeline.help_format import DefaultsHelpFormatter


def add_subcommands(subparsers: Any) -> None:
    """Add ``eval``, ``export`` and ``show`` to an argparse subparsers object."""
    fmt = DefaultsHelpFormatter
    e = subparsers.add_parser(
        "eval", formatter_class=fmt, help="pixel accuracy and mIoU against ground truth (paper protocol)",
        description="Score pseudo-labels against ground truth with the paper's protocol: per-image Hungarian "
        "matching of segments to classes, TP/FP/FN summed over the dataset. Ground truth of another size than "
        "its label is centre-cropped to the label's aspect ratio and resized (nearest) to it.",
    )
    e.add_argument("labels", help="output folder of `diffseg label` (or one .parquet file)")
    add_ground_truth_arguments(e)
    e.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    e.add_argument("--image-list", default=None,
                   help="score only these images (one id or file stem a line, e.g. Coco164kFull_Stuff_Coarse_7.txt)")
    e.add_argument("--categories", nargs="+", default=None,
                   help="coco-stuff-27: annotation JSON(s) with the categories (instances_*.json + stuff_*.json); "
                   "default: found next to the ground truth")
    e.add_argument("--coco-offset", type=int, default=1,
                   help="coco-stuff-27: category id = pixel value + this (1 for stuffthingmaps)")
    e.add_argument("--num-classes", type=int, default=None, help="masks: number of classes (values 0..N-1)")
    e.add_argument("--ignore-value", type=int, nargs="*", default=[255], help="masks: pixel values to ignore")
    e.add_argument("--ray", dest="use_ray", action="store_true", default=None,
                   help="score on Ray (default: from 500 label rows)")
    e.add_argument("--no-ray", dest="use_ray", action="store_false", help="score in this process")
    e.add_argument("--workers", type=int, default=None, help="Ray actors scoring (default: CPUs - 1)")
    e.add_argument("--ray-address", default=None, help="Ray cluster address for --ray (default: start a local Ray)")
    e.add_argument("--storage-options", type=storage_options_json, default=None, help="fsspec options as JSON")
    e.add_argument("--baselines", action="store_true",
                   help="also score the paper's K-Means-C (k = 6) and K-Means-S (k = ground-truth classes per "
                   "image) from the same attention: re-runs the extractor on each scored image of --images, "
                   "in this process only (even when the labels are scored on Ray)")
    e.add_argument("--images", default=None, help="--baselines: the input the labels were made from (same URL as for label)")
    e.add_argument("--model", default=None,
                   help="--baselines: model for the attention (default: the labels' _manifest.json, else SD v1.4)")
    e.add_argument("--image-size", type=int, default=None,
                   help="--baselines: model input size (default: the labels' _manifest.json, else the model's native)")
    e.add_argument("--image-column", default=None, help="--baselines, Parquet inputs: the image-bytes column")
    e.add_argument("--baseline-batch-size", type=int, default=4, help="--baselines: images per extractor call")
    e.add_argument("--semantic", action="store_true",
                   help="score the class maps of labels made with --vocabulary as they are, no matching: "
                   "presets coco-stuff-27 and cityscapes against those formats; masks: class i = mask value i")
    e.set_defaults(handler=run_eval)

    x = subparsers.add_parser(
        "export", formatter_class=fmt, help="export labels to COCO JSON (RLE), COCO results or label-map PNGs",
        description="Export pseudo-labels. --to coco OUT.json: COCO instances JSON, one RLE annotation per segment, "
        "category 'segment' (with --layout datumaro, OUT is a folder and the JSON goes to "
        "OUT/annotations/instances_default.json, the layout Datumaro and CVAT import). --to coco-results OUT.json: "
        "a COCO results list for COCO.loadRes / COCOeval, image ids as in the instances file, score = the "
        "segment's area fraction (DiffSeg has no confidence). --to png DIR: one label-map PNG per image. "
        "Labels made with --vocabulary: the COCO categories are the vocabulary's classes (plus 'unknown' when "
        "used), coco-results scores are the segments' class scores, and --maps class writes class maps. "
        "Error rows are skipped.",
    )
    x.add_argument("labels", help="output folder of `diffseg label`")
    x.add_argument("--to", required=True, nargs=2, metavar=("{coco,coco-results,png}", "DEST"),
                   help="coco OUT.json, coco-results OUT.json, or png DIR")
    x.add_argument("--layout", choices=LAYOUTS, default="file",
                   help="--to coco: 'file' writes DEST as the JSON; 'datumaro' writes "
                   "DEST/annotations/instances_default.json")
    x.add_argument("--maps", choices=MAPS, default="label",
                   help="--to png: 'label' writes segment ids, 'class' the class maps of labels made with "
                   "--vocabulary (class index per pixel, 255 = unknown)")
    x.add_argument("--storage-options", type=storage_options_json, default=None, help="fsspec options as JSON")
    x.set_defaults(handler=run_export)

    s = subparsers.add_parser(
        "show", formatter_class=fmt, help="overlay PNGs and an index.html gallery",
        description="Draw the first N labelled images with their segments and boundaries, and write "
        "OUT/index.html listing segment counts and every error row.",
    )
    s.add_argument("labels", help="output folder of `diffseg label`")
    s.add_argument("--images", required=True, help="the input the labels were made from (same URL as for label)")
    s.add_argument("--out", required=True, help="folder for index.html and overlays/")
    s.add_argument("--n", type=int, default=64, help="images to draw")
    s.add_argument("--image-column", default=None, help="Parquet inputs: the image-bytes column")
    s.add_argument("--storage-options", type=storage_options_json, default=None, help="fsspec options as JSON")
    s.set_defaults(handler=run_show)


def _fail(command: str, exc: Exception) -> int:
    print(f"diffseg {command}: error: {exc}", file=sys.stderr)
    return 2


_USER_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError, RuntimeError)


def run_eval(args: argparse.Namespace) -> int:
    from pipeline.after.evaluate import evaluate, format_report

    try:
        result = evaluate(
            args.labels, args.ground_truth, args.format, image_list=args.image_list, categories=args.categories,
            coco_offset=args.coco_offset, num_classes=args.num_classes, ignore_values=args.ignore_value,
            use_ray=args.use_ray, workers=args.workers, ray_address=args.ray_address,
            storage_options=args.storage_options, baselines=args.baselines, images=args.images, model=args.model,
            image_size=args.image_size, image_column=args.image_column, baseline_batch_size=args.baseline_batch_size,
            semantic=args.semantic,
        )
    except _USER_ERRORS as exc:
        return _fail("eval", exc)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0 if result["num_images"] else 1


def run_export(args: argparse.Namespace) -> int:
    from pipeline.after.export import export_coco, export_coco_results, export_png

    kind, dest = args.to
    if kind not in ("coco", "coco-results", "png"):
        return _fail("export", ValueError(f"--to must be coco, coco-results or png, not {kind!r}"))
    if args.layout != "file" and kind != "coco":
        return _fail("export", ValueError(f"--layout {args.layout} applies to --to coco only"))
    if args.maps != "label" and kind != "png":
        return _fail("export", ValueError(f"--maps {args.maps} applies to --to png only"))
    try:
        if kind == "coco":
            counts = export_coco(args.labels, dest, args.storage_options, layout=args.layout)
            print(f"wrote {counts['path']}: {counts['images']} images, {counts['annotations']} segments "
                  f"({counts['errors']} error rows skipped)")
            if args.layout == "datumaro":
                images = str(Path(dest) / DATUMARO_IMAGES)
                print(f"{images}: the input images are not local: copy or link them there for Datumaro/CVAT"
                      if counts["images_dir"] == "empty" else f"{images}: {counts['images_dir']}")
        elif kind == "coco-results":
            counts = export_coco_results(args.labels, dest, args.storage_options)
            print(f"wrote {counts['path']}: {counts['annotations']} segments of {counts['images']} images, "
                  f"score = {counts['score']} ({counts['errors']} error rows skipped)")
        else:
            counts = export_png(args.labels, dest, args.storage_options, maps=args.maps)
            print(f"wrote {counts['images']} {args.maps} maps under {dest} ({counts['errors']} error rows skipped"
                  + (f", {counts['collisions']} given a ~N suffix: their PNG path was another id's" if counts["collisions"] else "")
                  + ")")
    except _USER_ERRORS as exc:
        return _fail("export", exc)
    return 0


def run_show(args: argparse.Namespace) -> int:
    from pipeline.after.gallery import build_gallery

    try:
        result = build_gallery(args.labels, args.images, args.out, n=args.n, storage_options=args.storage_options,
                               image_column=args.image_column)
    except _USER_ERRORS as exc:
        return _fail("show", exc)
    print(f"wrote {result['index']}: {result['shown']} images shown, {result['errors']} error rows listed"
          + (f", {result['images_not_shown']} source images unreadable" if result["images_not_shown"] else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m pipeline.after.cli``) until pipeline.cli wires the subcommands in."""
    parser = CommandParser(prog="diffseg")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
