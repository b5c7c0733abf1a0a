"""Ground-truth readers for ``diffseg eval``: COCO-Stuff-27, Cityscapes, and plain mask folders.

Each format gives a :class:`GroundTruth`: an index from a label row's
``image_id`` to its ground-truth PNG, and a function that turns that PNG into
class ids ``0..C-1`` with ``-1`` for ignored pixels (the metrics' convention).

* **coco-stuff-27**: COCO-Stuff 164k ``stuffthingmaps`` PNGs (pixel value =
  category id - 1, 255 unlabelled). Fine categories map to the 27 coarse
  classes through their *supercategory*, read from the dataset's own annotation
  JSON(s) (``instances_*.json`` for the 12 thing supercategories and
  ``stuff_*.json`` for the 15 stuff ones; supercategory "other" is ignored).
  This is the fine -> coarse map of PiCIE/STEGO that google/diffseg loads as a
  pickle (``fine_index_to_coarse_index``), in STEGO's class order. PNGs are
  matched by file stem (``000000000139.jpg`` -> ``000000000139.png``).
* **cityscapes**: ``gtFine/*/*/*_gtFine_labelIds.png``; label ids 7..33 ->
  0..26, everything else ignored (google/diffseg ``cityscapes_data.py``).
  ``<city>_<seq>_<frame>_leftImg8bit.png`` matches ``<city>_<seq>_<frame>_gtFine_labelIds.png``.
* **masks**: a folder of PNG label maps whose values are class ids; matched by
  the image_id's relative path (extension -> ``.png``), else by unique stem.
"""
from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from pipeline.data.label_files import is_error
from pipeline.data.sources import IMAGE_EXTENSIONS, open_fs

FORMATS = ("coco-stuff-27", "cityscapes", "masks")


def add_ground_truth_arguments(parser: Any) -> None:
    """The ground-truth folder and its ``--format``, as ``diffseg eval`` and ``diffseg tune`` take them."""
    parser.add_argument("ground_truth", help="ground-truth folder (searched recursively for PNGs)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="ground truth's kind: COCO-Stuff stuffthingmaps (27 coarse classes), Cityscapes gtFine, "
                        "or a folder of PNG class maps named like the images")

# STEGO's COCO-Stuff-27 class order (things 0..11, stuff 12..26), as supercategory names of the
# COCO annotation files; google/diffseg uses the same fine -> coarse map (PiCIE's pickle).
COCO_THING_SUPERCATEGORIES = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen",
    "accessory", "animal", "outdoor", "person", "sports", "vehicle",
)
COCO_STUFF_SUPERCATEGORIES = (
    "ceiling", "floor", "food-stuff", "furniture-stuff", "raw-material", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
)
COCO_27 = COCO_THING_SUPERCATEGORIES + COCO_STUFF_SUPERCATEGORIES
COCO_IGNORED_SUPERCATEGORIES = ("other",)

CITYSCAPES_27 = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
    "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky",
    "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)
CITYSCAPES_GT_SUFFIX = "_gtFine_labelIds.png"
CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit"

UNMAPPED = -2  # a value with no class and not ignored: the image is reported, not scored


class GroundTruthError(ValueError):
    """The ground truth cannot be used as given (one sentence saying why)."""


@dataclass
class GroundTruth:
    """Where each image's ground truth is and how its pixel values become classes."""

    format: str
    root: str
    class_names: list[str]
    lut: np.ndarray | None  # pixel value -> class, -1 ignored, UNMAPPED unknown; None: identity (masks)
    by_path: dict[str, str]  # relative key (no extension) -> URI
    by_stem: dict[str, str]  # normalised stem -> URI (unique stems only)
    ignore_values: tuple[int, ...] = (255,)
    storage_options: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def find(self, image_id: str) -> str | None:
        """URI of the ground-truth PNG of ``image_id``, or None."""
        key = _strip_image_ext(image_id)
        if key in self.by_path:
            return self.by_path[key]
        return self.by_stem.get(_normalise_stem(self.format, posixpath.basename(key)))

    def load(self, uri: str) -> np.ndarray:
        """(H, W) int64 classes, -1 ignored. Raises GroundTruthError on values with no class."""
        fs, path = open_fs(uri, self.storage_options)
        with fs.open(path, "rb") as f, Image.open(io.BytesIO(f.read())) as img:
            raw = np.asarray(img)
        if raw.ndim == 3:  # label PNGs saved as RGB(A): the id is in every channel
            raw = raw[..., 0]
        raw = raw.astype(np.int64)
        if self.lut is not None:
            classes = self.lut[np.clip(raw, 0, len(self.lut) - 1)]
            classes[(raw < 0) | (raw >= len(self.lut))] = UNMAPPED
        else:
            classes = raw.copy()
            classes[np.isin(raw, self.ignore_values)] = -1
            classes[(classes >= self.num_classes) | (classes < -1)] = UNMAPPED
        bad = classes == UNMAPPED
        if bad.any():
            values = np.unique(raw[bad])[:10].tolist()
            raise GroundTruthError(f"ground-truth values {values} map to no class ({self.format})")
        return classes


def load_ground_truth(
    format: str,
    root: str,
    *,
    categories: Sequence[str] | None = None,
    coco_offset: int = 1,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    ignore_values: Sequence[int] = (255,),
    storage_options: dict[str, Any] | None = None,
) -> GroundTruth:
    """Index the ground truth under ``root`` for ``format`` (see the module docstring)."""
    if format not in FORMATS:
        raise GroundTruthError(f"unknown ground-truth format {format!r}; one of {', '.join(FORMATS)}")
    fs, base = open_fs(root, storage_options)
    base = base.rstrip("/") or base
    if not fs.isdir(base):
        raise GroundTruthError(f"ground truth {root!r} is not a folder")
    pngs = sorted(p for p in fs.find(base) if p.lower().endswith(".png"))
    if format == "cityscapes":
        pngs = [p for p in pngs if p.endswith(CITYSCAPES_GT_SUFFIX)]
    if not pngs:
        raise GroundTruthError(f"no ground-truth PNG found under {root!r} for format {format}")
    by_path: dict[str, str] = {}
    stems: dict[str, list[str]] = {}
    for p in pngs:
        rel = p[len(base):].lstrip("/")
        uri = fs.unstrip_protocol(p)
        by_path[rel[: -len(".png")]] = uri
        stems.setdefault(_normalise_stem(format, posixpath.basename(rel)[: -len(".png")]), []).append(uri)
    by_stem = {s: u[0] for s, u in stems.items() if len(u) == 1}
    notes = []
    if len(by_stem) < len(stems):
        notes.append(f"{len(stems) - len(by_stem)} ground-truth file names occur twice; matched by path only")

    if format == "coco-stuff-27":
        files = list(categories or []) or _find_category_files(fs, base)
        lut = coco_fine_to_coarse(_read_categories(files, storage_options), offset=coco_offset)
        names = list(COCO_27)
        notes.append(f"fine -> 27 coarse classes by supercategory from {', '.join(posixpath.basename(f) for f in files)}")
        ignore: tuple[int, ...] = (255,)
    elif format == "cityscapes":
        lut = np.full(256, -1, dtype=np.int64)
        lut[7:34] = np.arange(27)
        names = list(CITYSCAPES_27)
        ignore = ()
    else:
        if num_classes is None:
            raise GroundTruthError("--format masks needs --num-classes")
        lut = None
        names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise GroundTruthError(f"{len(names)} class names for {num_classes} classes")
        ignore = tuple(int(v) for v in ignore_values)
    return GroundTruth(format, root, names, lut, by_path, by_stem, ignore, storage_options, notes)


def coco_fine_to_coarse(categories: list[dict[str, Any]], offset: int = 1) -> np.ndarray:
    """Lookup table: stuffthingmaps pixel value (category id - ``offset``) -> coarse class 0..26.

    255 and supercategory "other" -> -1; values of no listed category -> UNMAPPED.
    """
    lut = np.full(256, UNMAPPED, dtype=np.int64)
    lut[255] = -1
    unknown = set()
    for cat in categories:
        value = int(cat["id"]) - offset
        sup = str(cat.get("supercategory", ""))
        if not 0 <= value < 255:
            continue
        if sup in COCO_IGNORED_SUPERCATEGORIES:
            lut[value] = -1
        elif sup in COCO_27:
            lut[value] = COCO_27.index(sup)
        else:
            unknown.add(sup)
    if unknown:
        raise GroundTruthError(f"supercategories {sorted(unknown)} are not COCO-Stuff-27's")
    present = {COCO_27[c] for c in lut if c >= 0}
    if not present & set(COCO_THING_SUPERCATEGORIES) or not present & set(COCO_STUFF_SUPERCATEGORIES):
        raise GroundTruthError(
            "COCO-Stuff-27 needs the categories of both things and stuff: pass the instances_*.json and "
            "stuff_*.json annotation files (or one file listing both) with --categories"
        )
    return lut


def _read_categories(files: Sequence[str], storage_options: dict[str, Any] | None) -> list[dict[str, Any]]:
    cats: dict[int, dict[str, Any]] = {}
    for uri in files:
        fs, path = open_fs(uri, storage_options)
        with fs.open(path, "rb") as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or "categories" not in doc:
            raise GroundTruthError(f"{uri} has no 'categories' list")
        for cat in doc["categories"]:
            cats[int(cat["id"])] = cat
    return list(cats.values())


def _find_category_files(fs: Any, base: str) -> list[str]:
    """COCO annotation JSONs under the ground-truth folder (or its parent): stuff_* and instances_*."""
    for folder in (base, posixpath.dirname(base)):
        found = sorted(
            p for p in fs.find(folder, maxdepth=3)
            if p.endswith(".json") and posixpath.basename(p).startswith(("stuff_", "instances_", "categories"))
        )
        if found:
            return [fs.unstrip_protocol(p) for p in found]
    raise GroundTruthError(
        "no COCO annotation file found near the ground truth: pass --categories instances_val2017.json "
        "stuff_val2017.json (their 'categories' give each fine class its supercategory)"
    )


def _strip_image_ext(image_id: str) -> str:
    stem, ext = posixpath.splitext(image_id)
    return stem if ext.lower() in IMAGE_EXTENSIONS else image_id


def _normalise_stem(format: str, stem: str) -> str:
    if format == "cityscapes":
        for suffix in (CITYSCAPES_GT_SUFFIX[: -len(".png")], CITYSCAPES_IMAGE_SUFFIX):
            if stem.endswith(suffix):
                return stem[: -len(suffix)]
    return stem


def read_image_list(path: str, storage_options: dict[str, Any] | None = None) -> set[str]:
    """Ids of a curated subset, one a line (e.g. Coco164kFull_Stuff_Coarse_7.txt); blank lines skipped."""
    fs, p = open_fs(path, storage_options)
    with fs.open(p, "r") as f:
        return {line.strip() for line in f if line.strip()}


def listed_rows(rows: Iterable[dict[str, Any]], image_list: set[str] | None) -> list[dict[str, Any]]:
    """The label rows an image list keeps (all of them without a list)."""
    return [row for row in rows if image_list is None or in_image_list(row["image_id"], image_list)]


def rows_with_ground_truth(
    rows: Iterable[dict[str, Any]], gt: GroundTruth, note: Callable[[str, str], None] | None = None
) -> Iterator[tuple[dict[str, Any], str]]:
    """(row, ground-truth URI) for every row that is scored; ``note(kind, text)`` hears of
    each row passed over: "label_errors" (an error row) or "missing_gt" (no ground truth).

    The one definition of which rows are scored, shared by DiffSeg's scores and the
    k-means baselines', so both cover the same images.
    """
    for row in rows:
        image_id = row["image_id"]
        if is_error(row):
            if note:
                note("label_errors", f"{image_id}: {row.get('error')}")
            continue
        uri = gt.find(image_id)
        if uri is None:
            if note:
                note("missing_gt", image_id)
            continue
        yield row, uri


def in_image_list(image_id: str, wanted: set[str]) -> bool:
    """An image matches a list line by its id, its id without extension, or its file stem."""
    key = _strip_image_ext(image_id)
    return image_id in wanted or key in wanted or posixpath.basename(key) in wanted
