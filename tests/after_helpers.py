"""Test inputs for the after-labeling tests: label Parquet written directly in the pipeline's format.

Rows are made with the pipeline's own encoder (pipeline.data.encode) and schema
(pipeline.data.schema), committed the way the sink commits them (a part file, then a
``_done/`` marker), so the readers see exactly what ``diffseg label`` writes,
with no model and no Ray.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.encode import class_png, encode_label, name_segments
from pipeline.data.schema import (
    DONE_DIR,
    MANIFEST,
    UNKNOWN_CLASS,
    marker_name,
    output_schema,
    part_name,
)

# (image_id, label map) for a labelled image, (image_id, "kind: detail") for an error row;
# with a vocabulary, (image_id, (label map, class index per segment id (-1 unknown), scores))
Row = tuple[str, Union[np.ndarray, str, tuple]]


def label_table(rows: Sequence[Row], rle: bool = False, vocabulary: Sequence[str] | None = None) -> pa.Table:
    schema = output_schema(classes=vocabulary is not None)
    cols: dict[str, list] = {name: [] for name in schema.names}
    for image_id, value in rows:
        cols["image_id"].append(image_id)
        cols["source"].append(f"file:///input/{image_id}")
        if isinstance(value, str):
            for name, v in (("width", 0), ("height", 0), ("label_map", None), ("num_segments", None),
                            ("segments", None), ("error", value), ("class_map", None)):
                if name in cols:
                    cols[name].append(v)
            continue
        classes = scores = None
        if isinstance(value, tuple):
            value, classes, scores = value
        png, n, segs = encode_label(np.asarray(value), rle)
        if vocabulary is not None:
            classes = np.asarray(classes)
            name_segments(segs, classes, scores, vocabulary)
            cols["class_map"].append(class_png(np.where(classes >= 0, classes, UNKNOWN_CLASS)[np.asarray(value)]))
        cols["width"].append(int(value.shape[1]))
        cols["height"].append(int(value.shape[0]))
        cols["label_map"].append(png)
        cols["num_segments"].append(n)
        cols["segments"].append(segs)
        cols["error"].append(None)
    return pa.table(cols, schema=schema)


def write_labels(root: Path, shards: Sequence[Sequence[Row]], row_group_size: int | None = None,
                 uncommitted: Sequence[Row] = (), vocabulary: Sequence[str] | None = None) -> Path:
    """One committed part + marker per shard; ``uncommitted`` rows go to a part with no marker.
    With ``vocabulary`` (class names), rows carry classes and the manifest records the names."""
    root.mkdir(parents=True, exist_ok=True)
    (root / DONE_DIR).mkdir(exist_ok=True)
    for shard_id, rows in enumerate(shards):
        pq.write_table(label_table(rows, vocabulary=vocabulary), root / part_name(shard_id, 0),
                       row_group_size=row_group_size)
        (root / DONE_DIR / marker_name(shard_id)).write_text(json.dumps({"shard_id": shard_id, "rows": len(rows)}))
    if uncommitted:
        pq.write_table(label_table(uncommitted, vocabulary=vocabulary), root / part_name(len(shards), 0))
    manifest: dict = {"note": "written by tests/after_helpers.py"}
    if vocabulary is not None:
        manifest["vocabulary"] = {"names": list(vocabulary)}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
