"""`diffseg label --params FILE` and `--weights` (what `diffseg tune` chooses), and the job spec's method.weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.spec import SpecError, parse_spec
from pipeline.cli import main
from pipeline_helpers import make_photo_folder

FAST = ["--model", "tiny-random", "--image-size", "64"]  # 8 x 8, 4 x 4 and 2 x 2 attention


def _params(tmp_path: Path, body: dict, wrapped: bool = True) -> str:
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"label_params": body, "best": {"setting": "..."}} if wrapped else body))
    return str(path)


@pytest.mark.slow
def test_label_takes_the_file_and_flags_on_the_command_line_win(ray_session, tmp_path, capsys):
    make_photo_folder(tmp_path / "in")
    params = _params(tmp_path, {"kl_threshold": [1.0, 0.9], "iterations": 2, "num_points": 8, "refine": False,
                                "weights": [1.0, 1.0, 0.0]})
    code = main(["label", str(tmp_path / "in"), str(tmp_path / "out"), *FAST, "--params", params,
                 "--num-points", "4", "--batch-size", "4"])
    assert code == 0
    err = capsys.readouterr().err
    assert f"--num-points on the command line overrides {params}'s value 8" in err and "ERROR" not in err
    parameters = json.loads((tmp_path / "out" / "_manifest.json").read_text())["parameters"]
    assert parameters["kl_threshold"] == [1.0, 0.9] and parameters["iterations"] == 2
    assert parameters["num_points"] == 4 and parameters["refine"] is False
    assert parameters["weights"] == [1.0, 1.0, 0.0]


def test_weights_that_do_not_fit_the_model_stop_before_labelling(ray_session, tmp_path, capsys):
    make_photo_folder(tmp_path / "in")
    code = main(["label", str(tmp_path / "in"), str(tmp_path / "out"), *FAST, "--num-points", "4",
                 "--weights", "2,1"])
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == ("diffseg label: error: --weights: 2 weights given, but model 'tiny-random' has 3 attention "
                    "resolutions [8, 4, 2] (one weight each, finest first).")


@pytest.mark.parametrize("body, wrapped, message", [
    ({"kl_threshold": 1.0, "tau": 2}, True, "unknown key(s) ['tau']; it may hold kl_threshold, iterations, "
                                            "num_points, refine, weights, boundaries, pamr_iterations, "
                                            "pamr_dilations, grouping, ncut_threshold, ncut_affinity."),
    ({"num_points": "16"}, False, "num_points must be an integer, not '16'."),
    ({"weights": [1, "a"]}, True, "weights must be null or a list of numbers (one per attention resolution, "
                                  "finest first), not [1, 'a']."),
    ([1, 2], False, "expected a JSON object with kl_threshold, iterations, num_points, refine, weights, "
                    "boundaries, pamr_iterations, pamr_dilations, grouping, ncut_threshold, ncut_affinity."),
])
def test_a_params_file_that_cannot_be_used_is_one_sentence(tmp_path, capsys, body, wrapped, message):
    params = _params(tmp_path, body, wrapped)
    assert main(["label", str(tmp_path / "in"), str(tmp_path / "out"), "--params", params]) == 2
    assert capsys.readouterr().err.strip() == f"diffseg label: error: --params {params}: {message}"


def test_a_missing_or_broken_params_file(tmp_path, capsys):
    assert main(["label", str(tmp_path), str(tmp_path / "out"), "--params", str(tmp_path / "nope.json")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"diffseg label: error: --params {tmp_path / 'nope.json'}: "
                                                      "cannot read it")
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["label", str(tmp_path), str(tmp_path / "out"), "--params", str(tmp_path / "bad.json")]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_job_spec_method_weights():
    base = "input: /data/in\noutput: /data/out\nmodel: tiny-random\n"
    spec = parse_spec(base + "method: {kl_threshold: 0.9, weights: [4096, 1024, 256, 64]}\n", source="t.yaml")
    assert spec.options["weights"] == [4096.0, 1024.0, 256.0, 64.0]
    assert parse_spec(base + "method: {weights: null}\n", source="t.yaml").options["weights"] is None
    with pytest.raises(SpecError, match=r"method.weights: must be a number >= 0, not -1"):
        parse_spec(base + "method: {weights: [1, -1]}\n", source="t.yaml")
    with pytest.raises(SpecError, match=r"method.weights: must be weights that are not all zero"):
        parse_spec(base + "method: {weights: [0, 0]}\n", source="t.yaml")


def _counts(per_fold_iou):
    """(settings, folds, 3, 1) TP/FP/FN of one class whose IoU on each fold is the given value."""
    import numpy as np

    out = np.zeros((len(per_fold_iou), len(per_fold_iou[0]), 3, 1), dtype=np.int64)
    for s, folds in enumerate(per_fold_iou):
        for f, iou in enumerate(folds):
            out[s, f, 0, 0] = round(100 * iou)
            out[s, f, 2, 0] = 100 - round(100 * iou)
    return out


def test_a_search_that_does_not_carry_over_keeps_the_default():
    """Settings 1 and 2 each win on one fold only: the best in-sample (1) is chance, the k-fold
    estimate (each fold scored by the other fold's pick) falls below the default, which is kept."""
    import numpy as np

    from pipeline.tune.select import select

    images = np.array([1, 1])
    sel = select(_counts([[0.6, 0.6], [1.0, 0.3], [0.3, 0.95]]), images, default=0)
    assert sel.ranking[0][0] == 1 and abs(sel.held_out.miou - 0.3) < 1e-9
    assert sel.kept_default and sel.best == 0
    # a setting that is better on both folds is chosen: its choice carries over
    sel = select(_counts([[0.6, 0.6], [0.8, 0.7], [0.3, 0.65]]), images, default=0)
    assert not sel.kept_default and sel.best == 1 and sel.held_out.miou > sel.default_score.miou
