"""The paper's k-means baselines for ``diffseg eval --baselines``: K-Means-C and K-Means-S.

The label Parquet holds no attention, so for every image the DiffSeg labels are
scored on (committed ok row, in the image list if any, with ground truth) we
read its source image from the labeling input by ``image_id``
(pipeline.after.image_index), run the same extractor as the labeling run (model,
revision, timestep and image size from the labels' ``_manifest.json`` unless
given), and cluster the aggregated attention rows with
``diffseg_core.kmeans``: **K-Means-C** with k = 6, **K-Means-S** with k = the
number of ground-truth classes present in the image (ignored pixels excluded).
Labels are made at the label map's size and scored, each method with its own
``SegmentationMetrics``, against the same ground truth (same crop/resize rule)
as the DiffSeg labels.

In-process only (images go through the extractor ``batch_size`` at a time),
even when the DiffSeg labels themselves are scored on Ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from diffseg_core.metrics import SegmentationMetrics
from pipeline.after.datasets_gt import (
    GroundTruth,
    GroundTruthError,
    listed_rows,
    rows_with_ground_truth,
)
from pipeline.after.image_index import ImageIndex, center_crop_resize, decode_rgb
from pipeline.data.label_files import iter_label_batches, label_map
from pipeline.data.readers import chunked

METHODS = ("K-Means-C", "K-Means-S")
K_CONSTANT = 6  # the paper's K-Means-C
MAX_LISTED = 20


@dataclass
class _Item:
    image_id: str
    size: tuple[int, int]  # (H, W) of the label map
    gt_uri: str


def extractor_settings(manifest: dict[str, Any] | None, model: str | None, image_size: int | None) -> dict[str, Any]:
    """Model and image size for the extractor: given values first, then the manifest's, then the defaults."""
    from diffseg_core.extract import DEFAULT_MODEL

    info = (manifest or {}).get("model") or {}
    params = (manifest or {}).get("parameters") or {}
    notes = []
    recorded_model = info.get("model") if isinstance(info, dict) else None
    recorded_size = params.get("image_size") if isinstance(params, dict) else None
    if model is not None and recorded_model is not None and str(model) != str(recorded_model):
        notes.append(f"baselines use model {model!r}; the labels were made with {recorded_model!r}")
    if image_size is not None and recorded_size is not None and int(image_size) != int(recorded_size):
        notes.append(f"baselines use image size {image_size}; the labels were made at {recorded_size}")
    from_manifest = model is None and recorded_model is not None
    return {
        "model": model if model is not None else (recorded_model or DEFAULT_MODEL),
        "image_size": int(image_size) if image_size is not None else (int(recorded_size) if recorded_size else None),
        # revision and timestep only make sense for the recorded model
        "revision": (params.get("revision") or info.get("revision")) if from_manifest else None,
        "timestep": int(params.get("timestep", 300)) if recorded_model is not None else 300,
        # the labeling run's opt-in to pickle weights holds for the same model, not for another
        "allow_unsafe_weights": bool(params.get("allow_unsafe_weights")) if from_manifest else False,
        "source": "manifest" if from_manifest else ("given" if model is not None else "default"),
        "notes": notes,
    }


def _scored_items(files: list[str], gt: GroundTruth, image_list: set[str] | None,
                  storage_options: dict[str, Any] | None) -> list[_Item]:
    """The rows evaluate.score_rows scores (same filters), as (id, label size, ground-truth URI)."""
    items = []
    for rows in iter_label_batches(files, ("image_id", "label_map", "error"), storage_options):
        for row, uri in rows_with_ground_truth(listed_rows(rows, image_list), gt):
            try:
                shape = label_map(row).shape
            except (OSError, ValueError):
                continue
            items.append(_Item(row["image_id"], (int(shape[0]), int(shape[1])), uri))
    return items


def crop_to_aspect(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre-crop ``image`` to the aspect ratio of ``size`` (no resize): the label's frame.

    A label of the image's own size (the default labeling) leaves it unchanged;
    a square label of a non-square image (the paper's crop-to-square) crops it.
    """
    h, w = image.shape[:2]
    out_h, out_w = size
    if h * out_w == w * out_h:
        return image
    if h * out_w > w * out_h:
        ch, cw = max(1, round(w * out_h / out_w)), w
    else:
        ch, cw = h, max(1, round(h * out_w / out_h))
    top, left = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(image[top : top + ch, left : left + cw])


def compute_baselines(
    labels_files: list[str],
    gt: GroundTruth,
    images: str,
    *,
    image_list: set[str] | None = None,
    model: str | None = None,
    image_size: int | None = None,
    manifest: dict[str, Any] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 4,
    k_constant: int = K_CONSTANT,
    image_column: str | None = None,
    storage_options: dict[str, Any] | None = None,
    extractor: Any = None,
) -> dict[str, Any]:
    """Score K-Means-C and K-Means-S on the images the DiffSeg labels are scored on.

    Returns ``{"methods": {name: {"pixel_accuracy", "miou", "num_images",
    "labelled_pixels", "metrics"}}, "per_image": [{"image_id", "k": {name: k},
    "segments": {name: predicted segment count}}], "model", "image_size",
    "skipped", "examples", "notes"}``. ``extractor``: an AttentionExtractor to
    use instead of loading one (tests).
    """
    import torch

    from diffseg_core.kmeans import kmeans_constant, kmeans_per_image

    if batch_size < 1:
        raise ValueError(f"baseline batch size must be >= 1, got {batch_size}")
    settings = extractor_settings(manifest, model, image_size)
    items = _scored_items(labels_files, gt, image_list, storage_options)
    index = ImageIndex.build(images, storage_options, image_column)
    if extractor is None:
        from diffseg_core.extract import AttentionExtractor

        extractor = AttentionExtractor.from_pretrained(
            settings["model"], device=device, dtype=dtype, image_size=settings["image_size"],
            timestep=settings["timestep"], revision=settings["revision"],
            allow_unsafe_weights=settings["allow_unsafe_weights"],
        )
    metrics = {name: SegmentationMetrics(gt.num_classes, -1) for name in METHODS}
    per_image: list[dict[str, Any]] = []
    skipped = {"image_errors": 0, "gt_errors": 0}
    examples: dict[str, list[str]] = {"image_errors": [], "gt_errors": []}

    def note(kind: str, text: str) -> None:
        skipped[kind] += 1
        if len(examples[kind]) < MAX_LISTED:
            examples[kind].append(text)

    by_id = {it.image_id: it for it in items}

    def decoded() -> Iterator[tuple[_Item, np.ndarray, np.ndarray]]:
        for image_id, data, error in index.read(list(by_id)):
            item = by_id[image_id]
            if data is None:
                note("image_errors", f"{image_id}: {error}")
                continue
            try:
                target = gt.load(item.gt_uri)
                if target.shape != item.size:
                    target = center_crop_resize(target, item.size, nearest=True)
            except (GroundTruthError, OSError, ValueError) as exc:
                note("gt_errors", f"{image_id}: {type(exc).__name__}: {exc}")
                continue
            try:
                rgb = crop_to_aspect(decode_rgb(data), item.size)
            except Exception as exc:  # noqa: BLE001 - any undecodable source image is one skipped image
                note("image_errors", f"{image_id}: {type(exc).__name__}: {exc}")
                continue
            yield item, rgb, target

    for batch in chunked(decoded(), batch_size):
        maps = extractor([rgb for _, rgb, _ in batch])
        n_rows = max(int(m.shape[1]) for m in maps.values())  # aggregate rows: the largest resolution
        for b, (item, _, target) in enumerate(batch):
            one = {r: m[b : b + 1] for r, m in maps.items()}
            classes = int(np.unique(target[target >= 0]).size)
            ks = {"K-Means-C": min(k_constant, n_rows), "K-Means-S": min(max(classes, 1), n_rows)}
            preds = {
                "K-Means-C": kmeans_constant(one, k=ks["K-Means-C"], output_size=item.size),
                "K-Means-S": kmeans_per_image(one, [ks["K-Means-S"]], output_size=item.size),
            }
            result: dict[str, Any] = {"image_id": item.image_id, "gt_classes": classes, "k": ks, "segments": {}}
            for name, pred in preds.items():
                pred_np = pred[0].to(torch.int64).cpu().numpy()
                scores = metrics[name].update(pred_np, target)
                result["segments"][name] = int(np.unique(pred_np).size)
                result[name] = {"pixel_accuracy": scores["pixel_accuracy"], "miou": scores["miou"]}
            per_image.append(result)

    notes = list(settings["notes"])
    if skipped["image_errors"] or skipped["gt_errors"]:
        notes.append(f"baselines scored {len(per_image)} of {len(items)} images the labels are scored on "
                     f"({skipped['image_errors']} source images unreadable, {skipped['gt_errors']} ground truths)")
    info = getattr(extractor, "model_info", {}) or {}
    return {
        "methods": {name: {**m.summary(), "metrics": m.to_dict()} for name, m in metrics.items()},
        "per_image": per_image,
        "model": info.get("model", settings["model"]),
        "model_from": settings["source"],
        "image_size": info.get("image_size", settings["image_size"]),
        "k_constant": k_constant,
        "images": images,
        "skipped": skipped,
        "examples": examples,
        "notes": notes,
    }
