"""Bad input never stops a run: each file ends as a labelled row or a row with a clear error."""
from __future__ import annotations

import numpy as np
from pipeline_helpers import FAST, bad_image_corpus, read_output, write_corpus

from pipeline import label
from pipeline.data.encode import decode_png


def test_every_bad_or_odd_image_ends_as_one_row(ray_session, tmp_path):
    corpus = bad_image_corpus()
    write_corpus(tmp_path / "in", corpus)
    summary = label(str(tmp_path / "in"), str(tmp_path / "out"), rle=True, rows_per_file=6, **FAST)
    expected_errors: dict[str, int] = {}
    for _, kind, _ in corpus.values():
        if kind:
            expected_errors[kind] = expected_errors.get(kind, 0) + 1
    assert summary["complete"] and summary["images"] == len(corpus)
    assert summary["errors_by_kind"] == expected_errors
    rows = {r["image_id"]: r for r in read_output(str(tmp_path / "out")).to_pylist()}
    assert sorted(rows) == sorted(corpus)
    for name, (_, kind, size) in corpus.items():
        row = rows[name]
        assert row["source"].endswith("/" + name)
        if kind:
            assert row["error"].startswith(kind + ": ") and row["label_map"] is None and row["segments"] is None
            continue
        assert row["error"] is None, (name, row["error"])
        assert (row["width"], row["height"]) == size
        labels = decode_png(row["label_map"])
        assert labels.shape == (size[1], size[0])  # label map at the image's own size
        assert row["num_segments"] == len(row["segments"]) == len(np.unique(labels))
        assert sum(s["area"] for s in row["segments"]) == size[0] * size[1]
        assert all(s["rle"]["size"] == [size[1], size[0]] for s in row["segments"])
