"""``diffseg export``: pseudo-labels -> COCO instances JSON (RLE) or a folder of label-map PNGs.

COCO: every segment of every image becomes one annotation with a compressed RLE
``segmentation`` (``pycocotools.mask.encode`` on a Fortran-ordered uint8 mask,
``counts`` as a str), ``area`` and ``bbox`` from the RLE, ``iscrowd`` 0, and one
category "segment" (DiffSeg segments have no class). ``file_name`` is the
image_id, so the tools find the image under the same root the labels came from.
pycocotools' ``COCO`` API, FiftyOne's ``COCODetectionDataset`` and
CVAT/Datumaro's "COCO instances" importer read RLE segmentations of this form.

The JSON is streamed: images and annotations go to two temporary files while
the label rows are read, then are joined, so memory stays bounded on big sets.
Error rows are skipped and counted.
"""
from __future__ import annotations

import csv
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.label_files import committed_label_files, is_error, iter_label_batches, label_map
from pipeline.sources import IMAGE_EXTENSIONS

SEGMENT_CATEGORY = {"id": 1, "name": "segment", "supercategory": "segment"}


def segment_annotations(labels: np.ndarray, image_id: int, first_ann_id: int) -> list[dict[str, Any]]:
    """One COCO annotation per segment id present in ``labels`` (H, W)."""
    from pycocotools import mask as mask_utils

    anns = []
    for k, seg in enumerate(np.unique(labels)):
        rle = mask_utils.encode(np.asfortranarray((labels == seg).astype(np.uint8)))
        anns.append({
            "id": first_ann_id + k,
            "image_id": image_id,
            "category_id": SEGMENT_CATEGORY["id"],
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": 0,
            "attributes": {"segment_id": int(seg)},
        })
    return anns


def export_coco(labels_uri: str, out_path: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a COCO instances JSON of every ok row; returns counts (images, annotations, errors)."""
    files = committed_label_files(labels_uri, storage_options)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = {"images": 0, "annotations": 0, "errors": 0}
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        img_f = open(os.path.join(tmp, "images"), "w")
        ann_f = open(os.path.join(tmp, "annotations"), "w")
        with img_f, ann_f:
            for rows in iter_label_batches(files, storage_options=storage_options):
                for row in rows:
                    if is_error(row):
                        counts["errors"] += 1
                        continue
                    lm = label_map(row)
                    img_id = counts["images"] + 1
                    image = {"id": img_id, "file_name": row["image_id"], "width": int(lm.shape[1]),
                             "height": int(lm.shape[0])}
                    img_f.write(("," if counts["images"] else "") + json.dumps(image))
                    counts["images"] += 1
                    for ann in segment_annotations(lm, img_id, counts["annotations"] + 1):
                        ann_f.write(("," if counts["annotations"] else "") + json.dumps(ann))
                        counts["annotations"] += 1
        part = out.with_name(out.name + ".tmp")
        with open(part, "w") as f:
            f.write('{"info": {"description": "DiffSeg pseudo-labels", "source": ')
            f.write(json.dumps(labels_uri) + '}, "licenses": [], "categories": ')
            f.write(json.dumps([SEGMENT_CATEGORY]) + ', "images": [')
            with open(os.path.join(tmp, "images")) as src:
                shutil.copyfileobj(src, f)
            f.write('], "annotations": [')
            with open(os.path.join(tmp, "annotations")) as src:
                shutil.copyfileobj(src, f)
            f.write("]}\n")
        os.replace(part, out)
    return counts


def png_relpath(image_id: str) -> str:
    """A safe relative path for an image's label PNG: image extension -> .png, no '..' or absolute parts."""
    parts = [p for p in image_id.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    parts = ["".join(c if c.isprintable() and c not in ':*?"<>|' else "_" for c in p) for p in parts] or ["_"]
    stem, ext = posixpath.splitext(parts[-1])
    parts[-1] = (stem if ext.lower() in IMAGE_EXTENSIONS and stem else parts[-1]) + ".png"
    return "/".join(parts)


PNG_INDEX = "_index.csv"  # image_id -> PNG path, for ids that sanitising changed or made collide


def distinct_path(rel: str, taken: set[str]) -> str:
    """``rel``, or ``stem~2.png``, ``stem~3.png``, ... when another id already has that path.

    Compared case-folded: ``A.png`` and ``a.png`` are one file on macOS and Windows disks.
    """
    stem, ext = posixpath.splitext(rel)
    candidate, n = rel, 1
    while candidate.casefold() in taken:
        n += 1
        candidate = f"{stem}~{n}{ext}"
    taken.add(candidate.casefold())
    return candidate


def export_png(labels_uri: str, out_dir: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One label-map PNG per ok row (the stored PNG bytes, 8- or 16-bit), at ``out_dir/png_relpath(id)``.

    Every ok row gets its own file: ids that map to one path (``a.jpg`` and ``a.png``,
    ``k:1`` and ``k_1`` after sanitising, ``A.jpg`` and ``a.jpg``) get ``~2``, ``~3``, ...
    in label-file order (counted as ``collisions``). ``out_dir/_index.csv`` lists
    ``image_id,png`` for every file written, so each PNG leads back to its image.
    """
    files = committed_label_files(labels_uri, storage_options)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    counts: dict[str, Any] = {"images": 0, "errors": 0, "collisions": 0}
    taken: set[str] = {PNG_INDEX.casefold()}
    with open(root / PNG_INDEX, "w", newline="", encoding="utf-8") as index_file:
        index = csv.writer(index_file)
        index.writerow(["image_id", "png"])
        for rows in iter_label_batches(files, ("image_id", "label_map", "error"), storage_options):
            for row in rows:
                if is_error(row):
                    counts["errors"] += 1
                    continue
                wanted = png_relpath(row["image_id"])
                rel = distinct_path(wanted, taken)
                counts["collisions"] += rel != wanted
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(row["label_map"])
                index.writerow([row["image_id"], rel])
                counts["images"] += 1
    return counts
