"""Inputs whose names repeat or look like globs (issue 14), through label(), export, show and the reader.

A tar with repeated member names, a Parquet file with repeated keys, files named
``bracket[1].png``, ``star*.png``, ``q?.png``, ``a::b.png``, markup in a name, names
that collide once sanitised or case-folded, all under an input folder and into an
output folder whose names hold ``[``: every input object gets exactly one row with a
distinct, stable id, the run commits, and every id leads back to its own image.
"""
from __future__ import annotations

import csv
import html.parser
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pipeline_helpers import FAST, read_output

ODD_FILE_NAMES = ["bracket[1].png", "star*.png", "q?.png", "a::b.png", "<b>&\"x'.png", "K:1.png", "K_1.png",
                  "Case.png", "case.png", "hash#1.png", "pct%20.png"]
TAR_MEMBERS = ["a.jpg", "a.jpg", "a.jpg", "a.png", "b.jpg"]
TAR_IDS = ["dup.tar/a", "dup.tar/a#2", "dup.tar/a#3", "dup.tar/a.png", "dup.tar/b"]
PARQUET_KEYS = ["x", "x", "x#2", "x", None, "y"]
PARQUET_IDS = ["keys.parquet/x", "keys.parquet/x#2", "keys.parquet/x#2#2", "keys.parquet/x#3", "keys.parquet/4",
               "keys.parquet/y"]


def _image(i: int) -> np.ndarray:
    """A distinct image of a distinct size per input object: the size in a row tells its source."""
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, size=(20 + i, 24 + 2 * i, 3), dtype=np.uint8)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # lossless, whatever the member's extension says
    return buf.getvalue()


@pytest.fixture(scope="module")
def odd_inputs(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """The input folder ``in[1]`` and {expected image_id: source pixels}."""
    root = tmp_path_factory.mktemp("names") / "in[1]"
    (root / "odd").mkdir(parents=True)
    expected: dict[str, np.ndarray] = {}
    n = 0
    for name in ODD_FILE_NAMES:
        expected[f"odd/{name}"] = img = _image(n)
        (root / "odd" / name).write_bytes(_png(img))
        n += 1
    with tarfile.open(root / "dup.tar", "w") as tar:
        for member, image_id in zip(TAR_MEMBERS, TAR_IDS):
            expected[image_id] = img = _image(n)
            body = _png(img)
            info = tarfile.TarInfo(member)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
            n += 1
    images = []
    for image_id in PARQUET_IDS:
        expected[image_id] = img = _image(n)
        images.append(_png(img))
        n += 1
    pq.write_table(pa.table({"key": pa.array(PARQUET_KEYS, pa.string()), "image": pa.array(images, pa.binary())}),
                   root / "keys.parquet", row_group_size=4)
    return root, expected


@pytest.fixture(scope="module")
def labelled(odd_inputs, ray_session, tmp_path_factory):
    """label() of the odd inputs into ``out[2]``; returns (input folder, output folder, expected, summary)."""
    from pipeline import label

    root, expected = odd_inputs
    out = tmp_path_factory.mktemp("names-out") / "out[2]"
    summary = label(str(root), str(out), rows_per_file=4, **FAST)
    return root, out, expected, summary


def test_every_input_object_gets_one_row_with_a_distinct_stable_id(labelled):
    from pipeline import label

    root, out, expected, summary = labelled
    assert summary["complete"], summary
    assert summary["images"] == summary["labelled"] == len(expected)
    rows = read_output(str(out)).to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(expected)  # one row each, none lost, none twice
    for r in rows:
        assert r["error"] is None, (r["image_id"], r["error"])
        h, w = expected[r["image_id"]].shape[:2]
        assert (r["height"], r["width"]) == (h, w), r["image_id"]  # the row came from its own member / key
    again = label(str(root), str(out), rows_per_file=4, **FAST)  # the rerun finds nothing left to do
    assert again["complete"] and again["shards"]["written_this_run"] == 0
    assert again["images"] == len(expected)


def test_a_folder_or_file_named_like_a_glob_is_taken_literally(odd_inputs, tmp_path):
    from pipeline.data.readers import read_image_files
    from pipeline.data.sources import list_inputs, relative_id

    root, expected = odd_inputs
    listing = list_inputs(str(root))  # "in[1]" exists: a folder, not a pattern
    assert sorted(relative_id(u, listing.root) for u in listing.images) == sorted(f"odd/{n}" for n in ODD_FILE_NAMES)
    rows = list(read_image_files(listing.images, listing.root, None))
    assert [r.error for r in rows] == [None] * len(ODD_FILE_NAMES)
    for r in rows:
        assert r.data == (root / r.image_id).read_bytes()  # its own bytes, not a glob's match
    png = (root / "odd" / "bracket[1].png").read_bytes()
    for name in ("bracket[1].png", "bracket1.png", "bracket2.png"):
        (tmp_path / name).write_bytes(png)
    one = list_inputs(str(tmp_path / "bracket[1].png"))  # a file named like a pattern: that file only
    assert [relative_id(u, one.root) for u in one.images] == ["bracket[1].png"]
    pattern = list_inputs(str(tmp_path / "bracket[0-9].png"))  # a pattern that names no file is still a glob
    assert [relative_id(u, pattern.root) for u in pattern.images] == ["bracket1.png", "bracket2.png"]


def test_repeated_tar_members_and_parquet_keys_get_numbered_ids():
    from pipeline.data.readers import UniqueKeys

    keys = UniqueKeys()
    assert [keys.claim(k) for k in ["a", "a", "a#2", "a", "b", "a#2"]] == ["a", "a#2", "a#2#2", "a#3", "b", "a#2#3"]


def test_png_export_writes_one_file_per_row_even_when_ids_collide(labelled, tmp_path, capsys):
    from pipeline.after.cli import main as after_main
    from pipeline.after.export import PNG_INDEX

    _, out, expected, _ = labelled
    dest = tmp_path / "masks[3]"
    assert after_main(["export", str(out), "--to", "png", str(dest)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {len(expected)} label maps" in printed and "3 given a ~N suffix" in printed
    with open(dest / PNG_INDEX, newline="", encoding="utf-8") as f:
        index = {row["image_id"]: row["png"] for row in csv.DictReader(f)}
    assert sorted(index) == sorted(expected)
    assert len({p.casefold() for p in index.values()}) == len(expected)  # distinct even on a case-folding disk
    assert index["odd/K:1.png"] == "odd/K_1.png" and index["odd/K_1.png"] == "odd/K_1~2.png"
    assert index["odd/Case.png"] == "odd/Case.png" and index["odd/case.png"] == "odd/case~2.png"
    assert index["dup.tar/a"] == "dup.tar/a.png" and index["dup.tar/a.png"] == "dup.tar/a~2.png"
    assert index["dup.tar/a#2"] == "dup.tar/a#2.png" and index["odd/bracket[1].png"] == "odd/bracket[1].png"
    labels = {r["image_id"]: r["label_map"] for r in read_output(str(out)).to_pylist()}
    for image_id, rel in index.items():
        assert (dest / rel).read_bytes() == labels[image_id]
    assert len(list(dest.rglob("*.png"))) == len(expected)


class _Captions(html.parser.HTMLParser):
    """The alt text of every <img> and the bold text of every <figcaption>, as a browser reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.alts: list[str] = []
        self.bold: list[str] = []
        self._open: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.alts.append(dict(attrs)["alt"])
        elif tag in ("figcaption", "b"):
            self._open.append(tag)

    def handle_endtag(self, tag):
        if self._open and self._open[-1] == tag:
            self._open.pop()

    def handle_data(self, data):
        if self._open == ["figcaption", "b"]:
            self.bold.append(data)


def test_gallery_shows_every_odd_id_escaped(labelled, tmp_path):
    from pipeline.after.gallery import build_gallery

    root, out, expected, _ = labelled
    result = build_gallery(str(out), str(root), str(tmp_path / "gallery"), n=64)
    assert result["shown"] == len(expected) and result["images_not_shown"] == 0
    page = _Captions()
    page.feed((tmp_path / "gallery" / "index.html").read_text())
    assert sorted(page.alts) == sorted(expected)
    assert sorted(page.bold) == sorted(expected)  # '<b>&"x\'.png' is text, not markup
    assert sorted(p.name for p in (tmp_path / "gallery" / "overlays").iterdir()) == [
        f"{k:05d}.png" for k in range(len(expected))]


def test_reader_joins_each_label_to_its_own_image(labelled):
    from pipeline.after.reader import PseudoLabelDataset

    root, out, expected, _ = labelled
    pairs = list(PseudoLabelDataset(str(out), str(root), return_id=True, transform=lambda i, l: (i, l)))
    assert sorted(p[0] for p in pairs) == sorted(expected)
    for image_id, image, labels in pairs:
        np.testing.assert_array_equal(image, expected[image_id])  # a#2 is the second member, not the first
        assert labels.shape == image.shape[:2]


def test_ray_reader_on_a_labels_folder_named_like_a_glob(labelled, ray_session):
    from pipeline.after.reader import ray_dataset

    root, out, expected, _ = labelled
    rows = ray_dataset(str(out), str(root)).take_all()
    assert sorted(r["image_id"] for r in rows) == sorted(expected)
    for r in rows:
        np.testing.assert_array_equal(np.asarray(r["image"]), expected[r["image_id"]])
