"""The output table's Arrow schema (DESIGN.md, "Output") and the output folder's layout."""
from __future__ import annotations

import pyarrow as pa

RLE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
SEGMENT = pa.struct(
    [
        ("id", pa.int32()),
        ("area", pa.int64()),
        ("bbox", pa.list_(pa.int32())),  # [x, y, w, h]
        ("rle", RLE),  # COCO compressed RLE; null unless --rle
    ]
)
OUTPUT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("label_map", pa.binary()),
        ("num_segments", pa.int32()),
        ("segments", pa.list_(SEGMENT)),
        ("error", pa.string()),
    ]
)
# With a vocabulary (``--vocabulary``), and only then, segments name their class and the row
# carries a class map: outputs made without one keep exactly the schema above.
CLASS_SEGMENT = pa.struct(
    list(SEGMENT)
    + [
        ("class", pa.string()),  # a vocabulary name, or null: unknown
        ("class_score", pa.float32()),  # share of the segment's pixels that vote for its class
    ]
)
CLASS_MAP = "class_map"  # PNG (8-bit) of the vocabulary index per pixel, UNKNOWN_CLASS where none
UNKNOWN_CLASS = 255
CLASS_OUTPUT_SCHEMA = pa.schema(
    [f if f.name != "segments" else pa.field("segments", pa.list_(CLASS_SEGMENT)) for f in OUTPUT_SCHEMA]
    + [pa.field(CLASS_MAP, pa.binary())]
)


def output_schema(classes: bool) -> pa.Schema:
    """The output table's schema: with the class fields when the run has a vocabulary."""
    return CLASS_OUTPUT_SCHEMA if classes else OUTPUT_SCHEMA


def as_output(table: pa.Table) -> pa.Table:
    """The output columns of ``table``, cast to the output schema; rows of a run with a
    vocabulary carry a ``class_map`` column (every row of that output does)."""
    schema = output_schema(classes=CLASS_MAP in table.column_names)
    return table.select(schema.names).cast(schema)


# Columns that travel with each row to the sink but are not written.
SHARD_ID = "_shard_id"
SHARD_ROWS = "_shard_rows"  # rows in the row's shard; -1 while the reader does not know yet
TIMING_COLUMNS = ("_t_decode", "_t_model", "_t_merge", "_t_encode")
STAGE_NAMES = {"_t_decode": "read+decode", "_t_model": "model", "_t_merge": "merge", "_t_encode": "encode"}

# Output folder layout. Everything but the committed Parquet files starts with "_",
# which pyarrow/pandas/Spark dataset discovery skip: `pd.read_parquet(OUTPUT)` just works.
MANIFEST = "_manifest.json"
PLAN = "_plan.jsonl.gz"
DONE_DIR = "_done"  # one marker per committed shard, written last
TMP_DIR = "_inprogress"  # spill parts written by workers, one folder per shard; never read as labels
LEASE = "_lease.json"  # the run that writes this output now (pipeline/job/lease.py)
STAGED_DIR = "_staged"  # a shard's final files before (and just after) its marker; moved to the root after it
METADATA_KEY = b"diffseg"


def part_name(shard_id: int, part: int, generation: int = 0) -> str:
    """A committed file's name; ``generation`` > 0 for a shard rewritten by ``--retry-errors``."""
    suffix = f"-g{generation}" if generation else ""
    return f"labels-{shard_id:06d}-{part:03d}{suffix}.parquet"


def spill_dir(shard_id: int) -> str:
    """Folder (relative to the output root) of a shard's spill parts."""
    return f"{TMP_DIR}/{shard_id:06d}"


def staged_path(shard_id: int, name: str) -> str:
    """Where a shard's file ``name`` is written before its marker (relative to the output root):
    under a ``_`` folder, which no reader looks in (pyarrow, pandas, datasets' card globs)."""
    return f"{STAGED_DIR}/{shard_id:06d}/{name}"


def marker_name(shard_id: int) -> str:
    return f"{shard_id:06d}.json"


def shard_of_part(name: str) -> int | None:
    """Shard id of a committed part file name, or None for anything else."""
    base = name.rsplit("/", 1)[-1]
    if not (base.startswith("labels-") and base.endswith(".parquet")):
        return None
    try:
        return int(base.split("-")[1])
    except (IndexError, ValueError):
        return None
