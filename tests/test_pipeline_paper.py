"""--paper-preprocess: centre-crop to a square after EXIF orientation, label at S x S, recorded as a parameter."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pipeline_helpers import FAST, encoded, photos, read_output

from pipeline import LabelError, label
from pipeline.cli import build_parser
from pipeline.data.decode import center_crop_square, decode_image


def _banded(h: int, w: int) -> np.ndarray:
    """Red outside, one green centred square of side min(h, w)."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[...] = (255, 0, 0)
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    arr[top : top + side, left : left + side] = (0, 255, 0)
    return arr


def test_crop_keeps_exactly_the_centred_square():
    for h, w in ((40, 100), (100, 40), (41, 100)):
        crop = np.asarray(center_crop_square(Image.fromarray(_banded(h, w))))
        side = min(h, w)
        assert crop.shape == (side, side, 3)
        assert (crop == (0, 255, 0)).all()
    square = Image.fromarray(_banded(30, 30))
    assert center_crop_square(square) is square


def test_decode_crops_after_exif_orientation():
    # Stored 100 wide x 40 tall, EXIF 6 (rotate 90): displayed 40 wide x 100 tall.
    stored = _banded(40, 100)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="PNG", exif=exif)
    plain = decode_image(buf.getvalue(), 40)
    assert (plain.width, plain.height) == (40, 100)
    paper = decode_image(buf.getvalue(), 40, paper_preprocess=True)
    assert paper.error is None and (paper.width, paper.height) == (40, 40)
    assert (paper.pixels == (0, 255, 0)).all()  # 40 -> 40: the green square exactly


def test_cli_flag_reaches_label_options():
    args = build_parser().parse_args(["label", "in", "out", "--paper-preprocess"])
    assert args.paper_preprocess is True
    assert build_parser().parse_args(["label", "in", "out"]).paper_preprocess is False


def _landscape_and_portrait(root: Path) -> None:
    root.mkdir(parents=True)
    astronaut = photos()["astronaut"]  # 512 x 512
    landscape = np.asarray(Image.fromarray(photos()["coffee"]).resize((150, 100)))  # 150 wide x 100 tall
    portrait = np.ascontiguousarray(astronaut[:, 128:384])  # 256 wide x 512 tall
    portrait = np.asarray(Image.fromarray(portrait).resize((60, 120)))
    (root / "landscape.jpg").write_bytes(encoded(landscape, "JPEG"))
    (root / "portrait.png").write_bytes(encoded(portrait, "PNG"))


def test_paper_preprocess_labels_at_the_square_size_and_refuses_a_rerun_without_it(ray_session, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _landscape_and_portrait(src)
    summary = label(str(src), str(out), paper_preprocess=True, **FAST)
    assert summary["complete"] and summary["labelled"] == 2

    table = read_output(str(out))
    assert sorted(table.column("image_id").to_pylist()) == ["landscape.jpg", "portrait.png"]
    for row in table.to_pylist():
        assert row["error"] is None
        assert row["width"] == row["height"] == 64
        assert np.asarray(Image.open(io.BytesIO(row["label_map"]))).shape == (64, 64)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["parameters"]["paper_preprocess"] is True
    for part in out.glob("*.parquet"):
        assert json.loads(pq.read_schema(part).metadata[b"diffseg"])["parameters"]["paper_preprocess"] is True

    with pytest.raises(LabelError, match="paper_preprocess True -> off"):
        label(str(src), str(out), **FAST)


def test_job_spec_method_section_takes_paper_preprocess(tmp_path):
    from jobs.spec import SpecError, load_spec

    spec_file = tmp_path / "paper.yaml"
    spec_file.write_text(f"input: {tmp_path}/in\noutput: {tmp_path}/out\nmethod: {{paper_preprocess: true}}\n")
    assert load_spec(spec_file).options["paper_preprocess"] is True
    spec_file.write_text(f"input: {tmp_path}/in\noutput: {tmp_path}/out\nmethod: {{paper_preprocess: yes-please}}\n")
    with pytest.raises(SpecError, match="method.paper_preprocess"):
        load_spec(spec_file)
