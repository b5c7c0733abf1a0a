"""``diffseg export``: pseudo-labels -> COCO instances JSON (RLE), a COCO results list, or label-map PNGs.

COCO instances (``--to coco``): every segment of every image becomes one
annotation with a compressed RLE ``segmentation`` (``pycocotools.mask.encode``
on a Fortran-ordered uint8 mask, ``counts`` as a str), ``area`` and ``bbox`` from
the RLE, ``iscrowd`` 0, and one category "segment" (DiffSeg segments have no
class). ``file_name`` is the image_id, so the tools find the image under the
same root the labels came from. pycocotools' ``COCO`` API, FiftyOne's
``COCODetectionDataset`` and CVAT/Datumaro's "COCO instances" importer read RLE
segmentations of this form. ``layout="datumaro"`` writes it as
``DEST/annotations/instances_default.json`` beside ``DEST/images/default/``, the
folder layout Datumaro's ``coco_instances`` importer (and CVAT's dataset import)
requires (Datumaro 1.13 refuses a dataset without the images folder). When the
labels' input was a local folder, ``images/default`` is a link to it, so
``images/default/<file_name>`` is each labelled picture; otherwise it is an
empty folder to copy or link the images into.

Labels made with a vocabulary (``--vocabulary``) export its classes instead:
category ``i + 1`` is vocabulary class ``i`` (same order as the class maps),
each segment has its class's category and ``attributes.class_score``; segments
of unknown class go to one extra category "unknown" (listed only when used), so
nothing is dropped and no class is made up. ``--to png`` writes the class maps
with ``--maps class`` (8-bit, 255 = unknown).

COCO results (``--to coco-results``): what ``COCO.loadRes`` and ``COCOeval`` take,
a list of ``{image_id, category_id, segmentation, score}`` (no ``bbox``:
``loadRes`` would take its area for the segment's; it derives the box from the RLE). Image ids are
the instances file's (both number the ok rows 1..N in the same order), so the two
files of one labels folder pair up. DiffSeg has no confidence: ``score`` is the
segment's area as a fraction of its image (0..1], a documented, deterministic
ranking (larger segments first) for the tools that need one, not a probability.
With a vocabulary, ``score`` is the segment's ``class_score`` (the share of its
pixels that vote for its class).

The JSON is streamed: images and annotations go to temporary files while the
label rows are read, then are joined, so memory stays bounded on big sets.
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
from typing import Any, Iterator

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from pipeline.data.label_files import (
    ROW_COLUMNS,
    committed_label_files,
    is_error,
    iter_label_batches,
    label_map,
    vocabulary_names,
)
from pipeline.data.manifest import read_labels_manifest
from pipeline.data.sources import IMAGE_EXTENSIONS, open_fs

SEGMENT_CATEGORY = {"id": 1, "name": "segment", "supercategory": "segment"}
UNKNOWN_CATEGORY = "unknown"
MAPS = ("label", "class")  # --to png: segment-id maps or class maps


class Categories:
    """COCO categories: "segment" alone, or one per vocabulary class plus "unknown" when used."""

    def __init__(self, names: list[str] | None) -> None:
        self.names = names
        self.unknown_used = False

    def of(self, segment: dict[str, Any] | None) -> tuple[int, float | None]:
        """(category id, class score) of a row's segment record."""
        if self.names is None:
            return SEGMENT_CATEGORY["id"], None
        name = (segment or {}).get("class")
        score = (segment or {}).get("class_score")
        if name is None or name not in self.names:
            self.unknown_used = True
            return len(self.names) + 1, score
        return self.names.index(name) + 1, score

    def to_json(self) -> list[dict[str, Any]]:
        if self.names is None:
            return [SEGMENT_CATEGORY]
        cats = [{"id": i + 1, "name": n, "supercategory": "class"} for i, n in enumerate(self.names)]
        if self.unknown_used:
            cats.append({"id": len(self.names) + 1, "name": UNKNOWN_CATEGORY, "supercategory": UNKNOWN_CATEGORY})
        return cats
LAYOUTS = ("file", "datumaro")
DATUMARO_INSTANCES = "annotations/instances_default.json"  # Datumaro: annotations/<task>_<subset>.json
DATUMARO_IMAGES = "images/default"  # Datumaro: images/<subset>/<file_name>


def segment_annotations(labels: np.ndarray, image_id: int, first_ann_id: int,
                        segments: list[dict[str, Any]] | None = None,
                        categories: Categories | None = None) -> list[dict[str, Any]]:
    """One COCO annotation per segment id present in ``labels`` (H, W); with ``categories`` of a
    vocabulary, each takes its class from the row's ``segments`` records."""
    from pycocotools import mask as mask_utils

    by_id = {int(s["id"]): s for s in segments or ()}
    categories = categories or Categories(None)
    anns = []
    for k, seg in enumerate(np.unique(labels)):
        rle = mask_utils.encode(np.asfortranarray((labels == seg).astype(np.uint8)))
        category, score = categories.of(by_id.get(int(seg)))
        attributes: dict[str, Any] = {"segment_id": int(seg)}
        if categories.names is not None:
            attributes["class_score"] = score
        anns.append({
            "id": first_ann_id + k,
            "image_id": image_id,
            "category_id": category,
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": 0,
            "attributes": attributes,
        })
    return anns


def _coco_rows(labels_uri: str, storage_options: dict[str, Any] | None, counts: dict[str, int],
               categories: Categories) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(COCO image, its annotations) per ok row, ids numbered from 1 in file order; counts errors."""
    files = committed_label_files(labels_uri, storage_options)
    columns = ROW_COLUMNS + (("segments",) if categories.names is not None else ())
    images = annotations = 0
    for rows in iter_label_batches(files, columns, storage_options=storage_options):
        for row in rows:
            if is_error(row):
                counts["errors"] += 1
                continue
            lm = label_map(row)
            images += 1
            image = {"id": images, "file_name": row["image_id"], "width": int(lm.shape[1]), "height": int(lm.shape[0])}
            anns = segment_annotations(lm, images, annotations + 1, row.get("segments"), categories)
            annotations += len(anns)
            yield image, anns


def export_coco(labels_uri: str, out_path: str, storage_options: dict[str, Any] | None = None,
                layout: str = "file") -> dict[str, Any]:
    """Write a COCO instances JSON of every ok row; returns counts (images, annotations, errors, path).

    ``layout="file"``: ``out_path`` is the JSON file; ``"datumaro"``: ``out_path`` is a folder and the
    JSON goes to ``out_path/annotations/instances_default.json``, next to ``out_path/images/default``
    (counts["images_dir"]: "link to INPUT" or "empty").
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    out = Path(out_path) / DATUMARO_INSTANCES if layout == "datumaro" else Path(out_path)
    if layout == "datumaro" and Path(out_path).is_file():
        raise ValueError(f"--layout datumaro writes into a folder, and {out_path} is a file")
    out.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, Any] = {"images": 0, "annotations": 0, "errors": 0, "path": str(out)}
    categories = Categories(vocabulary_names(labels_uri, storage_options))
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        with open(os.path.join(tmp, "images"), "w") as img_f, open(os.path.join(tmp, "annotations"), "w") as ann_f:
            for image, anns in _coco_rows(labels_uri, storage_options, counts, categories):
                img_f.write(("," if counts["images"] else "") + json.dumps(image))
                counts["images"] += 1
                for ann in anns:
                    ann_f.write(("," if counts["annotations"] else "") + json.dumps(ann))
                    counts["annotations"] += 1
        part = out.with_name(out.name + ".tmp")
        with open(part, "w") as f:
            f.write('{"info": {"description": "DiffSeg pseudo-labels", "source": ')
            f.write(json.dumps(labels_uri) + '}, "licenses": [], "categories": ')
            f.write(json.dumps(categories.to_json()) + ', "images": [')
            with open(os.path.join(tmp, "images")) as src:
                shutil.copyfileobj(src, f)
            f.write('], "annotations": [')
            with open(os.path.join(tmp, "annotations")) as src:
                shutil.copyfileobj(src, f)
            f.write("]}\n")
        os.replace(part, out)
    if layout == "datumaro":
        counts["images_dir"] = _datumaro_images(labels_uri, Path(out_path) / DATUMARO_IMAGES, storage_options)
    return counts


def _datumaro_images(labels_uri: str, images_dir: Path, storage_options: dict[str, Any] | None) -> str:
    """Make ``images/default``: a link to the labels' local input folder when there is one, else empty."""
    if images_dir.is_symlink() or images_dir.exists():
        return f"kept {'link to ' + os.readlink(images_dir) if images_dir.is_symlink() else 'folder'}"
    images_dir.parent.mkdir(parents=True, exist_ok=True)
    source = (read_labels_manifest(labels_uri, storage_options) or {}).get("input")
    if isinstance(source, str):
        fs, path = open_fs(source)
        if isinstance(fs, LocalFileSystem) and os.path.isdir(path):
            os.symlink(os.path.abspath(path), images_dir, target_is_directory=True)
            return f"link to {os.path.abspath(path)}"
    images_dir.mkdir()
    return "empty"


def export_coco_results(labels_uri: str, out_path: str,
                        storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a COCO results list (``COCO.loadRes``, ``COCOeval``) of every segment of every ok row.

    ``score`` = segment area / image area: DiffSeg gives no confidence, this is a ranking by size.
    Returns counts (images, annotations, errors).
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[str, Any] = {"images": 0, "annotations": 0, "errors": 0, "path": str(out)}
    categories = Categories(vocabulary_names(labels_uri, storage_options))
    counts["score"] = "area fraction" if categories.names is None else "class score"
    part = out.with_name(out.name + ".tmp")
    try:
        with open(part, "w") as f:
            f.write("[")
            for image, anns in _coco_rows(labels_uri, storage_options, counts, categories):
                counts["images"] += 1
                pixels = image["width"] * image["height"]
                for ann in anns:
                    # no "bbox": loadRes would then take the box's area as the segment's
                    score = ann["attributes"].get("class_score")
                    result = {"image_id": ann["image_id"], "category_id": ann["category_id"],
                              "segmentation": ann["segmentation"],
                              "score": ann["area"] / pixels if score is None else score}
                    f.write(("," if counts["annotations"] else "") + json.dumps(result))
                    counts["annotations"] += 1
            f.write("]\n")
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
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


def export_png(labels_uri: str, out_dir: str, storage_options: dict[str, Any] | None = None,
               maps: str = "label") -> dict[str, Any]:
    """One label-map PNG per ok row (the stored PNG bytes, 8- or 16-bit), at ``out_dir/png_relpath(id)``.

    ``maps="class"``: the class maps instead (labels made with a vocabulary; 8-bit, class index
    per pixel, 255 = unknown), a ``masks`` ground truth for the vocabulary's classes.

    Every ok row gets its own file: ids that map to one path (``a.jpg`` and ``a.png``,
    ``k:1`` and ``k_1`` after sanitising, ``A.jpg`` and ``a.jpg``) get ``~2``, ``~3``, ...
    in label-file order (counted as ``collisions``). ``out_dir/_index.csv`` lists
    ``image_id,png`` for every file written, so each PNG leads back to its image.
    """
    if maps not in MAPS:
        raise ValueError(f"maps must be one of {', '.join(MAPS)}, not {maps!r}")
    files = committed_label_files(labels_uri, storage_options)
    column = "label_map" if maps == "label" else "class_map"
    if maps == "class" and vocabulary_names(labels_uri, storage_options) is None:
        raise ValueError(f"{labels_uri} holds no class maps: label with --vocabulary to export them.")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    counts: dict[str, Any] = {"images": 0, "errors": 0, "collisions": 0}
    taken: set[str] = {PNG_INDEX.casefold()}
    with open(root / PNG_INDEX, "w", newline="", encoding="utf-8") as index_file:
        index = csv.writer(index_file)
        index.writerow(["image_id", "png"])
        for rows in iter_label_batches(files, tuple(dict.fromkeys(("image_id", "label_map", "error", column))),
                                       storage_options):
            for row in rows:
                if is_error(row):
                    counts["errors"] += 1
                    continue
                wanted = png_relpath(row["image_id"])
                rel = distinct_path(wanted, taken)
                counts["collisions"] += rel != wanted
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(row[column])
                index.writerow([row["image_id"], rel])
                counts["images"] += 1
    return counts
