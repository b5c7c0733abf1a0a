"""The `diffseg label` command: happy path, and systemic failures that stop early with one sentence."""
from __future__ import annotations

import json

from pipeline.cli import main
from pipeline_helpers import make_photo_folder, read_output

FAST_ARGS = ["--model", "tiny-random", "--image-size", "64", "--num-points", "4"]


def test_cli_labels_a_folder_and_prints_the_summary(ray_session, tmp_path, capsys):
    ids = make_photo_folder(tmp_path / "in")
    code = main(["label", str(tmp_path / "in"), str(tmp_path / "out"), *FAST_ARGS, "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labelled"] == 3 and summary["errors"] == 0 and summary["images_per_s"] > 0
    assert {"checks", "ray start", "list+plan", "pipeline", "model (worker s)", "encode (worker s)"} <= set(
        summary["stage_seconds"])
    assert sorted(read_output(str(tmp_path / "out")).column("image_id").to_pylist()) == ids


def test_no_input_matched_exits_non_zero_with_one_sentence(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert main(["label", str(tmp_path / "in"), str(tmp_path / "out"), *FAST_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffseg label: error: No input matched") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_unwritable_output_exits_before_any_model_work(tmp_path, capsys):
    make_photo_folder(tmp_path / "in")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert main(["label", str(tmp_path / "in"), str(blocker / "out"), *FAST_ARGS]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_model_that_cannot_load_exits_non_zero(ray_session, tmp_path, capsys):
    make_photo_folder(tmp_path / "in")
    code = main(["label", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tmp_path / "no-such-model")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffseg label: error: Cannot load model") and "\n" not in err
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_overwrite_with_a_model_that_cannot_load_keeps_the_earlier_labels(ray_session, tmp_path, capsys):
    make_photo_folder(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "_manifest.json").write_text("{}")
    (out / "labels-000000-000.parquet").write_bytes(b"earlier labels")
    code = main(["label", str(tmp_path / "in"), str(out), "--model", str(tmp_path / "missing"), "--overwrite"])
    assert code == 2 and "Cannot load model" in capsys.readouterr().err
    assert (out / "labels-000000-000.parquet").read_bytes() == b"earlier labels"


def test_anchor_grid_larger_than_the_attention_stops_before_labelling(ray_session, tmp_path, capsys):
    # tiny-random at 64 px gives 8 x 8 attention: the default 16 x 16 anchor grid cannot run.
    make_photo_folder(tmp_path / "in")
    code = main(["label", str(tmp_path / "in"), str(tmp_path / "out"), "--model", "tiny-random", "--image-size", "64"])
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("diffseg label: error: DiffSeg cannot run on this model: num_points=16 needs")
    assert "at least 16 x 16" in last and "gives 8 x 8" in last
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_diffseg_parameters_no_run_can_use_stop_before_the_model_loads(tmp_path, capsys):
    make_photo_folder(tmp_path / "in")
    code = main(["label", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(tmp_path / "no-model"),
                 "--num-points", "1"])
    assert code == 2  # refused for num_points, not for the (missing) model: checked first
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "diffseg label: error: DiffSeg parameters: num_points must be an integer >= 2, got 1."
