"""Symbolic links in the input (issue 31): a link to a regular file is that file, named by the link
(Hugging Face hub snapshots, DVC and git-annex checkouts, folders of links that pick a subset); a
link to a FIFO, socket or device is skipped unopened and counted; a dangling link is an error row
that names its missing target; links to folders are followed and each real folder is walked once."""
from __future__ import annotations

import io
import os
import socket
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import LabelError, label
from pipeline.cli import format_summary, main
from pipeline.data.readers import read_source
from pipeline.data.sources import (
    NoInputError,
    SkippedInputs,
    first_input,
    input_root,
    iter_inputs,
    list_inputs,
    output_in_input,
    relative_id,
)
from pipeline_helpers import FAST, random_png, read_output

TINY = {**FAST, "batch_size": 5}


_png = random_png


def _tar_bytes(names: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, name in enumerate(names):
            data = _png(i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _parquet_bytes(n: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": [f"p{i}" for i in range(n)], "image": [_png(10 + i) for i in range(n)]}), buf)
    return buf.getvalue()


def _ids(root: str, skipped: SkippedInputs | None = None) -> list[str]:
    """The listing of ``root`` as image ids (paths relative to its input root), in listing order."""
    base = input_root(root)
    return [relative_id(uri, base) for _, uri in iter_inputs(root, skipped=skipped)]


def _rows(root: Path, items: list[tuple[str, str]]) -> dict[str, tuple[bytes | None, str | None]]:
    base = root.as_uri()
    rows = {}
    for kind, uri in items:
        for raw in read_source("images" if kind == "image" else kind, [uri], base, None):
            rows[raw.image_id] = (raw.data, raw.error)
    return rows


def _snapshot(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A Hugging Face hub cache: ``snapshots/<rev>/...`` links into ``blobs/<sha>`` (no extension)."""
    repo = tmp_path / "hub" / "datasets--someone--photos"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    (snap / "images").mkdir(parents=True)
    (snap / "shards").mkdir()
    content = {"a1": _png(1), "b2": _png(2), "t3": _tar_bytes(["m/k0.png", "m/k1.png"]), "q4": _parquet_bytes(2)}
    for sha, data in content.items():
        (blobs / sha).write_bytes(data)
    (snap / "images" / "x.png").symlink_to("../../../blobs/a1")
    (snap / "images" / "y.jpg").symlink_to("../../../blobs/b2")  # the link's name decides the kind
    (snap / "images" / "README").symlink_to("../../../blobs/a1")  # not an input name: not listed
    (snap / "shards" / "train.tar").symlink_to("../../../blobs/t3")
    (snap / "shards" / "train.parquet").symlink_to("../../../blobs/q4")
    (snap / "images" / "real.png").write_bytes(_png(5))  # a regular file beside the links
    return snap, content


# ------------------------------------------------------------------------------ the listing, no Ray


def test_a_link_to_a_regular_file_is_read_as_that_file_under_the_links_own_name(tmp_path):
    snap, content = _snapshot(tmp_path)
    skipped = SkippedInputs()
    items = list(iter_inputs(str(snap), skipped=skipped))
    assert [(k, relative_id(u, snap.as_uri())) for k, u in items] == [
        ("image", "images/real.png"), ("image", "images/x.png"), ("image", "images/y.jpg"),
        ("parquet", "shards/train.parquet"), ("tar", "shards/train.tar")]
    assert skipped.count == 0
    rows = _rows(snap, items)
    assert rows["images/x.png"] == (content["a1"], None)
    assert rows["images/y.jpg"] == (content["b2"], None)
    assert rows["images/real.png"] == (_png(5), None)
    assert rows["shards/train.tar/m/k0"][0] == _png(0) and rows["shards/train.tar/m/k1"][1] is None
    assert rows["shards/train.parquet/p1"] == (_png(11), None)
    # From the repo's root the blobs (no extension) are no inputs: only the snapshot's names are.
    assert _ids(str(snap.parent.parent)) == [f"snapshots/0123abcd/{i}" for i in (
        "images/real.png", "images/x.png", "images/y.jpg", "shards/train.parquet", "shards/train.tar")]
    assert list_inputs(str(snap)).count == 5


def test_a_link_to_a_fifo_socket_or_device_is_skipped_unopened_and_counted(tmp_path):
    src, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    os.mkfifo(elsewhere / "pipe")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(elsewhere / "sock"))
    try:
        (src / "fifo.png").symlink_to(elsewhere / "pipe")
        (src / "sock.jpg").symlink_to(elsewhere / "sock")
        (src / "null.tar").symlink_to("/dev/null")
        (src / "ok.png").write_bytes(_png(0))
        (src / "link.png").symlink_to(src / "ok.png")
        skipped = SkippedInputs()
        assert _ids(str(src), skipped) == ["link.png", "ok.png"]
        assert skipped.sentence() == ("skipped 3 non-regular files (1 FIFO, 1 device, 1 socket): "
                                      "fifo.png, null.tar, sock.jpg")
        # Named on its own: skipped and counted too; put in place after the listing: refused on open.
        alone = SkippedInputs()
        assert list(iter_inputs(str(src / "fifo.png"), skipped=alone)) == []
        assert alone.sentence() == "skipped 1 non-regular file (FIFO): fifo.png"
        (row,) = read_source("images", [(src / "fifo.png").as_uri()], src.as_uri(), None)
        assert row.data is None and row.error.startswith("read error: NotRegularFileError: not a regular file (FIFO)")
        with pytest.raises(OSError, match=r"not a regular file \(device\)"):
            list(read_source("tar", [(src / "null.tar").as_uri()], src.as_uri(), None))
    finally:
        sock.close()


def test_a_dangling_link_is_listed_and_its_row_names_the_missing_target(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(_png(0))
    (src / "gone.png").symlink_to("../blobs/missing")
    (src / "self.png").symlink_to("self.png")  # a link to itself: a loop, an error row too
    (src / "gone-notes.txt").symlink_to("../blobs/nothing")  # not an input name: not listed
    items = list(iter_inputs(str(src)))
    assert [relative_id(u, src.as_uri()) for _, u in items] == ["a.png", "gone.png", "self.png"]
    rows = _rows(src, items)
    assert rows["a.png"] == (_png(0), None)
    data, error = rows["gone.png"]
    assert data is None and error.startswith("read error: DanglingLinkError: dangling symbolic link")
    assert error == ("read error: DanglingLinkError: dangling symbolic link -> ../blobs/missing: "
                     f"{tmp_path}/blobs/missing does not exist")
    data, error = rows["self.png"]
    assert data is None and error.startswith("read error: ") and "self.png" in error
    # A dangling link named on its own is an input too (its row says what is missing).
    assert _ids(str(src / "gone.png")) == ["gone.png"]


def test_links_to_folders_are_followed_and_each_real_folder_is_walked_once(tmp_path):
    src, outside = tmp_path / "in", tmp_path / "outside"
    (src / "a" / "deep").mkdir(parents=True)
    (outside / "more").mkdir(parents=True)
    (src / "a" / "img.png").write_bytes(_png(0))
    (src / "a" / "deep" / "d.png").write_bytes(_png(1))
    (outside / "o.png").write_bytes(_png(2))
    (outside / "more" / "m.png").write_bytes(_png(3))
    (src / "a" / "back").symlink_to("..")  # a loop to the root
    (src / "a" / "deep" / "up").symlink_to("../../a")  # a loop to a folder on the way
    (src / "b").symlink_to("a")  # a second way into a folder already walked
    (src / "c").symlink_to(outside)  # a folder outside the root
    (outside / "loop").symlink_to(outside)
    (src / "_cache").symlink_to(outside)  # hidden names are pruned, links too
    (src / "gone").symlink_to("nowhere")  # a dangling link without an input's name: nothing
    assert _ids(str(src)) == ["a/img.png", "a/deep/d.png", "c/o.png", "c/more/m.png"]
    assert list_inputs(str(src)).count == 4
    # A glob's depth counts the links' folders like real ones.
    assert _ids(f"{src}/*/*.png") == ["a/img.png", "c/o.png"]


def test_a_symlinked_root_and_a_glob_over_links_work_like_what_they_point_to(tmp_path):
    real, picks = tmp_path / "real", tmp_path / "picks"
    (real / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.jpg", "sub/c.png"]):
        (real / name).write_bytes(_png(i))
    (tmp_path / "root-link").symlink_to(real)
    assert _ids(str(tmp_path / "root-link")) == ["a.png", "b.jpg", "sub/c.png"]
    assert input_root(str(tmp_path / "root-link")) == (tmp_path / "root-link").as_uri()
    # A folder of links that picks a subset; a single link; globs over the links.
    picks.mkdir()
    (picks / "first.png").symlink_to(real / "a.png")
    (picks / "third.png").symlink_to(real / "sub" / "c.png")
    (picks / "bee.jpg").symlink_to(real / "b.jpg")
    assert _ids(str(picks)) == ["bee.jpg", "first.png", "third.png"]
    assert _ids(str(picks / "third.png")) == ["third.png"]
    assert input_root(str(picks / "third.png")) == picks.as_uri()
    assert _ids(f"{picks}/*.png") == ["first.png", "third.png"]
    assert _ids(f"{tmp_path}/root-link/**/*.png") == ["a.png", "sub/c.png"]
    assert first_input(str(picks / "first.png"))[1] == (picks / "first.png").as_uri()
    rows = _rows(picks, list(iter_inputs(f"{picks}/*.png")))
    assert rows == {"first.png": (_png(0), None), "third.png": (_png(2), None)}
    # Still refused: an output inside the input, reached through the link to the input.
    assert "is inside the input" in output_in_input(str(tmp_path / "root-link"), str(real / "labels"))
    assert output_in_input(str(picks / "first.png"), str(picks / "labels")) is None


def test_when_everything_was_skipped_the_no_input_sentence_says_so(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    os.mkfifo(tmp_path / "pipe")
    (src / "one.png").symlink_to(tmp_path / "pipe")
    (src / "two.png").symlink_to(tmp_path / "pipe")
    (src / "notes.txt").write_text("not an input")
    with pytest.raises(NoInputError) as caught:
        first_input(str(src))
    assert str(caught.value) == (
        f"No input matched {str(src)!r}: skipped 2 non-regular files (FIFO): one.png, two.png; only regular "
        "files (or links to them) are read, and none is an image file (.bmp, .gif, .jpeg, .jpg, .png, .tif, "
        ".tiff, .webp), a Parquet file or a .tar shard.")
    with pytest.raises(NoInputError, match="skipped 2 non-regular files"):
        list_inputs(str(src))
    with pytest.raises(LabelError, match=r"^No input matched .*skipped 2 non-regular files \(FIFO\)"):
        label(str(src), str(tmp_path / "out"), **TINY)
    assert main(["label", str(src), str(tmp_path / "out2"), "--model", "tiny-random"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 2 non-regular files (FIFO): one.png, two.png" in err[0]
    # Nothing skipped: the sentence is the one it always was.
    (src / "one.png").unlink()
    (src / "two.png").unlink()
    with pytest.raises(NoInputError, match=r"^No input matched .*: expected image files \(.*\), Parquet files or "
                                           r"\.tar shards\.$"):
        first_input(str(src))


# ------------------------------------------------------------------------------ a real run


def test_a_hub_snapshot_with_links_is_labelled_and_its_dangling_link_is_an_error_row(ray_session, tmp_path):
    snap, _ = _snapshot(tmp_path)
    blobs = snap.parent.parent / "blobs"
    os.mkfifo(blobs / "fifo")
    (snap / "images" / "pipe.png").symlink_to("../../../blobs/fifo")  # a decode task would block on it
    (snap / "images" / "broken.png").symlink_to("../../../blobs/deadbeef")  # an unfinished download
    (snap / "more").symlink_to("images")  # the same real folder again: walked once
    out = tmp_path / "out"

    summary = label(str(snap), str(out), **TINY)
    ids = ["images/broken.png", "images/real.png", "images/x.png", "images/y.jpg", "shards/train.parquet/p0",
           "shards/train.parquet/p1", "shards/train.tar/m/k0", "shards/train.tar/m/k1"]
    assert summary["complete"] and summary["images"] == len(ids)
    assert summary["labelled"] == len(ids) - 1 and summary["errors_by_kind"] == {"read error": 1}
    assert summary["skipped_inputs"]["count"] == 1 and summary["skipped_inputs"]["kinds"] == {"FIFO": 1}
    assert "skipped 1 non-regular file (FIFO): images/pipe.png" in format_summary(summary).splitlines()
    table = read_output(str(out))
    assert sorted(table.column("image_id").to_pylist()) == ids
    errors = {i: e for i, e in zip(table.column("image_id").to_pylist(), table.column("error").to_pylist()) if e}
    assert list(errors) == ["images/broken.png"]
    assert errors["images/broken.png"] == ("read error: DanglingLinkError: dangling symbolic link -> "
                                           f"../../../blobs/deadbeef: {blobs}/deadbeef does not exist")
