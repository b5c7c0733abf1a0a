"""``diffseg eval``: pixel accuracy and mIoU of pseudo-labels against ground truth (paper protocol).

Per image: decode the label map, read its ground truth (pipeline.after.datasets_gt),
bring the ground truth to the label's size if they differ (centre-crop to the
label's aspect ratio, then nearest resize: the paper's crop-to-square + 512 px
for square labels), and feed both to a ``SegmentationMetrics`` accumulator
(per-image Hungarian matching). Workers send back ``to_dict()`` partials that the
driver merges, so the scores are the dataset-level ones, not a mean of images.

Small sets run in-process; larger ones (or ``use_ray=True``) read the label
Parquet with Ray Data and score batches in an actor pool, each actor holding
the ground-truth index once.

``semantic=True`` (``--semantic``) scores the class maps of labels made with a
vocabulary directly against the ground truth, with no matching (the
open-vocabulary protocol): class i of the ``coco-stuff-27`` / ``cityscapes``
presets is class i of those formats; for ``masks`` class i is mask value i.
Unknown pixels (255) count as misses of their true class.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from diffseg_core.metrics import SegmentationMetrics
from diffseg_core.vocabulary import PRESETS
from pipeline.after.datasets_gt import (
    GroundTruth,
    GroundTruthError,
    listed_rows,
    load_ground_truth,
    read_image_list,
    rows_with_ground_truth,
)
from pipeline.after.image_index import center_crop_resize
from pipeline.after.method import describe_method, method_fields
from pipeline.data.manifest import read_labels_manifest
from pipeline.data.label_files import (
    arrow_filesystem,
    class_map,
    committed_label_files,
    iter_label_batches,
    label_map,
    vocabulary_names,
)

EVAL_COLUMNS = ("image_id", "label_map", "error")
RAY_THRESHOLD = 500  # rows; below this the Ray start-up costs more than it saves
MAX_LISTED = 20  # ids kept per kind of problem, for the report (--json)
SHOWN = 5  # of those, lines the table prints per kind


@dataclass
class EvalSpec:
    """Everything a worker needs to score rows (pickled once per actor)."""

    ground_truth: GroundTruth
    image_list: set[str] | None = None
    semantic: bool = False  # score class maps as they are (no matching)

    @property
    def columns(self) -> list[str]:
        return [*EVAL_COLUMNS, "class_map"] if self.semantic else list(EVAL_COLUMNS)

    def metrics(self) -> SegmentationMetrics:
        return SegmentationMetrics(self.ground_truth.num_classes, -1, matching="none" if self.semantic else "hungarian")


def _empty_partial(spec: EvalSpec) -> dict[str, Any]:
    return {
        "metrics": spec.metrics().to_dict(),
        "rows": 0, "in_list": 0, "label_errors": 0, "missing_gt": 0, "gt_errors": 0, "resized": 0,
        "examples": {"label_errors": [], "missing_gt": [], "gt_errors": []},
    }


def score_rows(rows: Sequence[dict[str, Any]], spec: EvalSpec) -> dict[str, Any]:
    """Score label rows (dicts with image_id, label_map, error) -> a partial result (plain data)."""
    gt = spec.ground_truth
    metrics = spec.metrics()
    out = _empty_partial(spec)
    listed = listed_rows(rows, spec.image_list)
    out["rows"] += len(rows)
    out["in_list"] += len(listed)
    for row, uri in rows_with_ground_truth(listed, gt, note=lambda kind, text: _note(out, kind, text)):
        image_id = row["image_id"]
        try:
            pred = class_map(row) if spec.semantic else label_map(row)
            target = gt.load(uri)
            if target.shape != pred.shape:
                target = center_crop_resize(target, pred.shape, nearest=True)
                out["resized"] += 1
            metrics.update(pred, target)
        except (GroundTruthError, OSError, ValueError) as exc:
            _note(out, "gt_errors", f"{image_id}: {type(exc).__name__}: {exc}")
    out["metrics"] = metrics.to_dict()
    return out


def _note(out: dict[str, Any], kind: str, text: str) -> None:
    out[kind] += 1
    if len(out["examples"][kind]) < MAX_LISTED:
        out["examples"][kind].append(text)


def merge_partials(partials: Sequence[dict[str, Any]], spec: EvalSpec) -> dict[str, Any]:
    """Sum the workers' partial results (accumulators merged with SegmentationMetrics.merge)."""
    total = _empty_partial(spec)
    metrics = SegmentationMetrics.from_dict(total["metrics"])
    for part in partials:
        metrics.merge(SegmentationMetrics.from_dict(part["metrics"]))
        for key in ("rows", "in_list", "label_errors", "missing_gt", "gt_errors", "resized"):
            total[key] += part[key]
        for kind, items in part["examples"].items():
            room = MAX_LISTED - len(total["examples"][kind])
            total["examples"][kind].extend(items[:max(0, room)])
    total["metrics"] = metrics.to_dict()
    return total


class _ScoreBatches:
    """Ray Data callable class: a batch of label rows -> one row holding the batch's partial."""

    def __init__(self, spec: EvalSpec) -> None:
        self.spec = spec

    def __call__(self, batch: Any) -> dict[str, list]:
        import json

        part = score_rows(batch.to_pylist(), self.spec)
        return {"partial": [json.dumps(part)]}


def _run_ray(files: list[str], spec: EvalSpec, workers: int | None, ray_address: str | None,
             storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
    import json

    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.ray_connect import init_ray

    init_ray(ray_address, include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    size = workers or max(1, cpus - 1)
    filesystem, paths = arrow_filesystem(files, storage_options)
    ds = ray.data.read_parquet(paths, filesystem=filesystem).select_columns(spec.columns)
    ds = ds.map_batches(_ScoreBatches, fn_constructor_kwargs={"spec": spec}, batch_size=64,
                        batch_format="pyarrow", compute=ActorPoolStrategy(size=size), num_cpus=1)
    return [json.loads(r["partial"]) for r in ds.take_all()]


def _count_rows(files: list[str], storage_options: dict[str, Any] | None) -> int:
    import pyarrow.parquet as pq

    from pipeline.data.sources import open_fs

    total = 0
    for uri in files:
        fs, path = open_fs(uri, storage_options)
        with fs.open(path, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def evaluate(
    labels: str,
    ground_truth: str,
    format: str,
    *,
    image_list: str | None = None,
    categories: Sequence[str] | None = None,
    coco_offset: int = 1,
    num_classes: int | None = None,
    ignore_values: Sequence[int] = (255,),
    use_ray: bool | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    storage_options: dict[str, Any] | None = None,
    baselines: bool = False,
    images: str | None = None,
    model: str | None = None,
    image_size: int | None = None,
    image_column: str | None = None,
    baseline_batch_size: int = 4,
    semantic: bool = False,
) -> dict[str, Any]:
    """Score the committed labels under ``labels`` against ``ground_truth``; returns the report dict.

    ``use_ray``: None decides by size (Ray from RAY_THRESHOLD rows), True/False forces it.
    ``baselines``: also score K-Means-C / K-Means-S from the attention of the source images
    under ``images`` (pipeline.after.baselines; in-process), reported under ``"baselines"``.
    ``semantic``: score the class maps (labels made with a vocabulary) with no matching.
    Raises GroundTruthError / NoLabelsError with one clear sentence on unusable input.
    """
    if baselines and not images:
        raise ValueError("--baselines needs --images INPUT: the images the labels were made from "
                         "(the label files hold no attention to cluster).")
    class_names = mask_names = None
    if semantic:
        if baselines:
            raise ValueError("--semantic scores class maps and --baselines segment ids: run them separately.")
        class_names = vocabulary_names(labels, storage_options)
        if class_names is None:
            raise ValueError(f"{labels} holds no class maps: label with --vocabulary to score them with --semantic.")
        if format == "masks":  # class i is mask value i: name the table's rows after the vocabulary
            num_classes = len(class_names) if num_classes is None else num_classes
            mask_names = class_names if num_classes == len(class_names) else None
    gt = load_ground_truth(format, ground_truth, categories=categories, coco_offset=coco_offset,
                           num_classes=num_classes, ignore_values=ignore_values, storage_options=storage_options,
                           class_names=mask_names)
    if semantic:
        check_semantic(class_names, gt, format)
    wanted = read_image_list(image_list, storage_options) if image_list else None
    spec = EvalSpec(gt, wanted, semantic=semantic)
    files = committed_label_files(labels, storage_options)
    if use_ray is None:
        use_ray = _count_rows(files, storage_options) >= RAY_THRESHOLD
    if use_ray:
        partials = _run_ray(files, spec, workers, ray_address, storage_options)
    else:
        partials = [score_rows(rows, spec) for rows in iter_label_batches(files, spec.columns, storage_options)]
    result = report(merge_partials(partials, spec), spec, format, used_ray=use_ray, image_list=image_list)
    manifest = read_labels_manifest(labels, storage_options)
    if manifest is not None:  # which grouping made these labels (absent from the parameters: the KL merge)
        result.update(method_fields(manifest.get("parameters")))
    if baselines:
        from pipeline.after.baselines import compute_baselines

        result["baselines"] = compute_baselines(
            files, gt, images, image_list=wanted, model=model, image_size=image_size,
            manifest=manifest, batch_size=baseline_batch_size,
            image_column=image_column, storage_options=storage_options,
        )
    return result


def check_semantic(names: Sequence[str], gt: GroundTruth, format: str) -> None:
    """Raise ValueError unless class i of these labels is class i of the ground truth."""
    if format in PRESETS:
        if list(names) != list(PRESETS[format]):
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise ValueError(
                f"--semantic --format {format} scores labels made with --vocabulary {format} (its class i is the "
                f"format's class i); these were made with {len(names)} other classes ({shown})."
            )
    elif len(names) > gt.num_classes:
        raise ValueError(
            f"the labels' vocabulary has {len(names)} classes but the masks have {gt.num_classes} "
            "(--num-classes): class i of the vocabulary is mask value i."
        )


def report(total: dict[str, Any], spec: EvalSpec, format: str, *, used_ray: bool,
           image_list: str | None) -> dict[str, Any]:
    """The JSON-able result: scores, per-class IoU, what was skipped and why."""
    metrics = SegmentationMetrics.from_dict(total["metrics"])
    iou = metrics.iou_per_class()
    names = spec.ground_truth.class_names
    notes = list(spec.ground_truth.notes)
    if spec.semantic:
        notes.append("class maps scored as they are, no matching (open-vocabulary protocol); "
                     "unknown pixels count as misses of their true class")
    if total["resized"]:
        notes.append(
            f"{total['resized']} ground-truth map(s) differ in size from their label: centre-cropped to the "
            "label's aspect ratio and resized (nearest) to the label's size, as the paper's preprocessing does"
        )
    out = {
        "format": format,
        "semantic": spec.semantic,
        "pixel_accuracy": metrics.pixel_accuracy(),
        "miou": metrics.miou(),
        "num_images": metrics.num_images,
        "labelled_pixels": metrics.labelled_pixels,
        "per_class_iou": {n: (None if math.isnan(v) else float(v)) for n, v in zip(names, iou)},
        "label_rows": total["rows"],
        "skipped": {k: total[k] for k in ("label_errors", "missing_gt", "gt_errors")},
        "examples": total["examples"],
        "gt_resized": total["resized"],
        "ray": used_ray,
        "notes": notes,
        "metrics": metrics.to_dict(),
    }
    if image_list is not None:
        out["image_list"] = {"path": image_list, "listed": len(spec.image_list or ()), "with_label_row": total["in_list"]}
    return out


def format_report(r: dict[str, Any]) -> str:
    """The table ``diffseg eval`` prints."""
    def pct(v: float | None) -> str:
        return "    -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:5.1f}"

    sk = r["skipped"]
    lines = [
        f"{r['format']}{' class maps' if r.get('semantic') else ''}: {r['num_images']} images scored, "
        f"{r['labelled_pixels']} labelled pixels"
        f" (skipped: {sk['label_errors']} label errors, {sk['missing_gt']} without ground truth,"
        f" {sk['gt_errors']} unreadable ground truth)",
    ]
    if "grouping" in r:
        lines.append(f"labels made with {describe_method(r)}")
    if "image_list" in r:
        il = r["image_list"]
        lines.append(f"image list {il['path']}: {il['with_label_row']} of {il['listed']} listed images have a label row")
    lines += [f"{'pixel accuracy':<18}{pct(r['pixel_accuracy'])} %", f"{'mIoU':<18}{pct(r['miou'])} %", ""]
    if "baselines" in r:
        b = r["baselines"]
        lines.append(f"{'method':<18}{'ACC %':>6}{'mIoU %':>8}   images")
        rows = [("DiffSeg", r)] + [(name, b["methods"][name]) for name in b["methods"]]
        lines += [f"{name:<18}{pct(m['pixel_accuracy']):>6}{pct(m['miou']):>8}   {m['num_images']}" for name, m in rows]
        lines += [f"(baselines from the attention of {b['model']} at {b['image_size']} px; "
                  f"K-Means-C k = {b['k_constant']}, K-Means-S k = ground-truth classes per image)", ""]
    lines.append(f"{'class':<18}IoU %")
    lines += [f"{name:<18}{pct(v)}" for name, v in r["per_class_iou"].items()]
    lines += _listed("", r["examples"], r["skipped"])
    if "baselines" in r:
        lines += _listed("baselines, ", r["baselines"].get("examples", {}), r["baselines"].get("skipped", {}))
    lines += [f"note: {n}" for n in r["notes"] + r.get("baselines", {}).get("notes", [])]
    return "\n".join(lines)


def _listed(prefix: str, examples: dict[str, list[str]], counts: dict[str, int]) -> list[str]:
    """Up to SHOWN example lines per kind of problem, then one line saying how many more there are."""
    lines = []
    for kind, items in examples.items():
        name = kind.replace("_", " ")
        lines += [f"{prefix}{name}: {item}" for item in items[:SHOWN]]
        more = max(counts.get(kind, len(items)), len(items)) - min(len(items), SHOWN)
        if more > 0:
            lines.append(f"{prefix}{name}: ... and {more} more"
                         + (f" (--json lists the first {MAX_LISTED})" if len(items) > SHOWN else ""))
    return lines
