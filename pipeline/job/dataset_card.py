"""The output folder's dataset card, so that Hugging Face ``datasets.load_dataset(OUTPUT)`` reads the labels.

Without a card, ``load_dataset`` guesses its loader from the most common file
extension and picks JSON (``_manifest.json``, ``_done/*.json``): it only skips
names starting with ``.`` or ``__``. The card's YAML names the data files
(``configs``/``data_files``: the committed ``labels-*.parquet``) and their
features, with ``label_map`` declared an ``Image``: ``datasets`` reads the
Parquet column (plain ``binary``, PNG bytes; the schema is unchanged) and
decodes each value to a PIL image.

Why ``.huggingface.yaml`` and not ``README.md``: ``datasets`` (2.17 and later)
and the Hub read a card's YAML from either file, but a ``README.md`` beside the
Parquet files breaks ``pd.read_parquet(OUTPUT)`` and ``pyarrow.dataset``, whose
discovery tries every file not starting with ``.`` or ``_`` as Parquet. A name
starting with ``.`` is skipped by pyarrow, pandas, Ray Data and ``datasets``'
own file discovery alike.
"""
from __future__ import annotations

import uuid
from typing import Any

import fsspec
import pyarrow as pa
import yaml

from pipeline.data.schema import CLASS_MAP, OUTPUT_SCHEMA, output_schema

CARD = ".huggingface.yaml"
DATA_FILES = "labels-*.parquet"  # pipeline.data.schema.part_name: every committed part, nothing else
IMAGE_COLUMNS = frozenset({"label_map", CLASS_MAP})  # binary PNG columns that datasets decodes as images

_DTYPES = {
    pa.string(): "string", pa.large_string(): "large_string", pa.binary(): "binary",
    pa.large_binary(): "large_binary", pa.bool_(): "bool", pa.int8(): "int8", pa.int16(): "int16",
    pa.int32(): "int32", pa.int64(): "int64", pa.uint8(): "uint8", pa.uint16(): "uint16",
    pa.uint32(): "uint32", pa.uint64(): "uint64", pa.float16(): "float16", pa.float32(): "float32",
    pa.float64(): "float64",
}


def _feature(field: pa.Field) -> dict[str, Any]:
    """One field in the card's YAML form of ``datasets.Features`` (``dtype``, ``list`` or ``struct``)."""
    return {"name": field.name, **_type(field.type)}


def _type(t: pa.DataType) -> dict[str, Any]:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _type(t.value_type)
        return {"list": inner["dtype"] if set(inner) == {"dtype"} else inner}
    if pa.types.is_struct(t):
        return {"struct": [_feature(t.field(i)) for i in range(t.num_fields)]}
    if t in _DTYPES:
        return {"dtype": _DTYPES[t]}
    raise TypeError(f"no datasets feature for the Arrow type {t}")


def card_features(schema: pa.Schema = OUTPUT_SCHEMA) -> list[dict[str, Any]]:
    """The output's features as the card's ``dataset_info.features`` list; PNG columns as images."""
    out = []
    for field in schema:
        if field.name in IMAGE_COLUMNS:
            if field.type != pa.binary():
                raise TypeError(f"{field.name} is declared an image but is {field.type}, not binary PNG bytes")
            out.append({"name": field.name, "dtype": "image"})
        else:
            out.append(_feature(field))
    return out


def dataset_card(manifest: dict[str, Any] | None = None) -> str:
    """The card's text: YAML that ``datasets`` and the Hub read, with a comment naming the model."""
    model = (manifest or {}).get("model") or {}
    header = ["# Dataset card for Hugging Face datasets: load_dataset(THIS_FOLDER) reads labels-*.parquet,",
              "# label_map decoded as a PIL image of segment ids. Written by diffseg-labeler; _manifest.json",
              "# records the model and parameters."]
    if model.get("model"):
        header.append(f"# model: {model['model']}")
    if model.get("random_weights"):
        header.append("# WARNING: that model has RANDOM weights; these labels mean nothing (plumbing test).")
    elif model.get("demo_model"):
        header.append("# NOTE: that model is a small DEMO model trained for minutes on synthetic scenes, "
                      "not Stable Diffusion; these labels are coarse.")
    body = {
        "pretty_name": "DiffSeg pseudo-labels",
        "tags": ["image-segmentation", "pseudo-labels", "diffseg"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES}]}],
        "dataset_info": {"features": card_features(output_schema(classes="vocabulary" in (manifest or {})))},
    }
    return "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False)


def write_dataset_card(fs: fsspec.AbstractFileSystem, root: str, manifest: dict[str, Any] | None = None) -> None:
    """Write ``root/.huggingface.yaml`` via a temporary name, then move it into place."""
    tmp = f"{root}/{CARD}.{uuid.uuid4().hex}.tmp"
    fs.pipe_file(tmp, dataset_card(manifest).encode())
    fs.mv(tmp, f"{root}/{CARD}")
