"""One real `diffseg label` output, read by every reader a user reaches for: Hugging Face
``datasets.load_dataset(OUTPUT)`` (through the dataset card, label_map as images), pandas,
``pyarrow.dataset`` and ``ray.data.read_parquet``; each sees the same rows and nothing else."""
from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import yaml
from pipeline_helpers import FAST

from pipeline import label
from pipeline.data.encode import decode_png
from pipeline.data.schema import OUTPUT_SCHEMA, part_name
from pipeline.job.dataset_card import CARD, DATA_FILES, card_features, dataset_card

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


@pytest.fixture(scope="module")
def output(ray_session, tmp_path_factory):
    """The shipped example photos plus one broken file, labelled into 2 shards (3 + 2 rows)."""
    root = tmp_path_factory.mktemp("readers")
    src, out = root / "in", root / "out"
    shutil.copytree(EXAMPLES, src)  # README.md beside the photos is not an input
    (src / "broken.jpg").write_bytes(b"not a jpeg")
    summary = label(str(src), str(out), rows_per_file=3, rle=True, **FAST)
    assert summary["complete"] and summary["images"] == 5 and summary["errors"] == 1
    return out


def _by_id(rows: list[dict]) -> dict[str, dict]:
    return {r["image_id"]: r for r in rows}


def test_card_is_written_whole_and_pyarrow_skips_it(output):
    card = output / CARD
    assert card.is_file() and not (output / "README.md").exists()
    assert not [p.name for p in output.iterdir() if p.name.startswith(CARD) and p.name != CARD]  # no temp left
    meta = yaml.safe_load(card.read_text())
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": "labels-*.parquet"}]
    assert "RANDOM weights" in card.read_text()  # tiny-random: the card says so
    parts = sorted(p.name for p in output.iterdir() if fnmatch.fnmatch(p.name, DATA_FILES))
    assert parts == [part_name(0, 0), part_name(1, 0)]


def test_every_reader_sees_the_same_rows(output):
    from datasets import load_dataset
    from PIL import Image

    want = _by_id(pads.dataset(str(output), format="parquet").to_table().to_pylist())
    assert sorted(want) == ["astronaut.jpg", "broken.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]

    frame = pd.read_parquet(output)
    assert sorted(frame["image_id"]) == sorted(want) and list(frame.columns) == OUTPUT_SCHEMA.names

    import ray

    ray_rows = ray.data.read_parquet(str(output)).take_all()
    assert sorted(r["image_id"] for r in ray_rows) == sorted(want)

    ds = load_dataset(str(output), cache_dir=str(output.parent / "hf-cache"))
    assert list(ds) == ["train"] and ds["train"].num_rows == len(want)
    assert ds["train"].column_names == OUTPUT_SCHEMA.names
    for row in ds["train"]:
        stored = want[row["image_id"]]
        if stored["error"] is not None:
            assert row["label_map"] is None and row["error"] == stored["error"]
            continue
        assert isinstance(row["label_map"], Image.Image)
        assert (row["label_map"].width, row["label_map"].height) == (stored["width"], stored["height"])
        assert np.array_equal(np.asarray(row["label_map"]), decode_png(stored["label_map"]))
        assert row["segments"] == stored["segments"] and row["num_segments"] == stored["num_segments"]


def test_card_features_are_the_output_schema_with_label_map_as_image():
    from datasets import Features, Image

    expected = Features.from_arrow_schema(OUTPUT_SCHEMA)
    expected["label_map"] = Image()
    meta = yaml.safe_load(dataset_card())
    assert Features._from_yaml_list(meta["dataset_info"]["features"]) == expected
    assert fnmatch.fnmatch(part_name(123456, 7), DATA_FILES)
    assert not fnmatch.fnmatch("_manifest.json", DATA_FILES)


def test_a_png_column_of_another_type_is_refused():
    odd = pa.schema([("label_map", pa.string())])
    with pytest.raises(TypeError, match="label_map is declared an image but is string"):
        card_features(odd)
