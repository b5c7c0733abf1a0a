"""diffseg tune: finds a tau known by construction, reports the held-out score, reuses its attention
cache (a second run never calls the extractor), and refuses bad input with one sentence."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.tune import tune
from pipeline.tune.report import format_report
from pipeline.tune.cache import CACHE_DIR, AttentionCache, extraction_key, model_identity
from pipeline.tune.grid import Grid
from after_helpers import write_png
from tests.synthetic_attention import paired_block_attention

R = 16
# A hub-shaped id that is in no cache: every image's attention is planted in the tune cache,
# so tune never needs (and could not load) the model.
PLANTED_MODEL = "test-only/planted-attention"
SPLITS = [(5, 7), (8, 8), (11, 5), (6, 10), (9, 4), (7, 12), (4, 6), (12, 9), (10, 11), (6, 5)]
GRID = dict(taus=[0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3], iterations=[1, 2, 3], tau_steps=[0.0, -0.1],
            num_points=[8], weights=["proportional"], refine=[False], boundaries=["off"])


def plant(root: Path) -> dict[str, Path]:
    """Images (R x R PNGs), their ground truth, and their attention planted in ``out``'s cache.

    Each image's attention is paired_block_attention: the right labels come exactly
    for 0.85 <= tau < 0.95, so of the grid's taus 0.9 alone is best.
    """
    rng = np.random.default_rng(0)
    cache = AttentionCache(root / "out" / CACHE_DIR)
    identity = model_identity(PLANTED_MODEL)
    for i, split in enumerate(SPLITS):
        image_id = f"scene{i // 5}/img{i}.png"
        write_png(root / "images" / image_id, rng.integers(0, 256, (R, R, 3), dtype=np.uint8))
        maps, _, classes = paired_block_attention(R, split)
        write_png(root / "gt" / image_id, classes.numpy().astype(np.uint8))
        sha = hashlib.sha256((root / "images" / image_id).read_bytes()).hexdigest()
        key = extraction_key(identity, sha, image_size=None, timestep=300, dtype="fp32", paper_preprocess=False)
        cache.put(key, {R: maps[0]}, {"image_id": image_id, "height": R, "width": R, "image_size": 8 * R})
    return {"images": root / "images", "gt": root / "gt", "out": root / "out"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, Path]:
    return plant(tmp_path_factory.mktemp("tune-planted"))


@pytest.fixture(scope="module")
def planted_report(planted, ray_session) -> dict:
    return tune(str(planted["images"]), str(planted["gt"]), "masks", num_classes=3, model=PLANTED_MODEL,
                dtype="fp32", out=str(planted["out"]), grid=Grid(**GRID), progress=False)


def test_finds_the_tau_planted_in_the_attention(planted_report):
    r = planted_report
    best = r["best"]
    assert best["kl_threshold"][0] == 0.9 and best["num_points"] == 8
    assert best["in_sample"]["miou"] == pytest.approx(1.0) and best["in_sample"]["pixel_accuracy"] == pytest.approx(1.0)
    assert r["label_params"]["kl_threshold"] == 0.9 and r["label_params"]["weights"] is None
    # every setting that starts anywhere but 0.9 is imperfect
    for row in r["ranking"]:
        if row["miou"] == pytest.approx(1.0):
            assert row["kl_threshold"].split(",")[0] == "0.9", row
    assert r["default"]["score"]["miou"] < 0.9  # tau 1.1 joins C and D


def test_reports_the_held_out_score_of_the_k_fold_choice(planted_report):
    r = planted_report
    assert len(r["folds"]) == 5 and r["sample"]["folds"] == 5
    assert all(f["setting"].startswith("tau=0.9") for f in r["folds"])
    assert all(f["test"]["images"] == 2 for f in r["folds"])  # 10 images, 5 folds
    assert r["best"]["held_out"]["miou"] == pytest.approx(1.0)
    assert r["best"]["held_out"]["images"] == 10


def test_writes_best_json_results_and_the_tau_plot(planted_report, planted):
    out = planted["out"]
    best = json.loads((out / "best.json").read_text())
    assert best["label_params"] == planted_report["label_params"] and "ranking" not in best
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == planted_report["settings"] and float(rows[0]["miou"]) >= float(rows[-1]["miou"])
    assert sum(row["is_default"] == "True" for row in rows) == 1
    assert (out / "tau.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "--kl-threshold 0.9 --iterations" in planted_report["label_flags"]
    assert planted_report["method_block"].startswith("method:\n  kl_threshold: 0.9\n")
    assert planted_report["cache"] == {"dir": str(out / CACHE_DIR), "cached": 10, "extracted": 0}


def test_label_params_from_best_json_and_command_line_flags_win(planted_report, planted, capsys):
    from pipeline.cli import _method_options

    best = str(planted["out"] / "best.json")
    options = _method_options({"kl_threshold": None, "num_points": None, "iterations": None, "refine": None,
                               "weights": None, "batch_size": 8, "model": None, "timestep": 300}, best)
    assert options == {"kl_threshold": 0.9, "num_points": 8, "iterations": planted_report["label_params"]["iterations"],
                       "refine": False, "batch_size": 8, "model": PLANTED_MODEL, "timestep": 300,
                       "boundaries": "off"}  # said even when off: a model card may turn PAMR on
    assert f"using model {PLANTED_MODEL} from {best}" in capsys.readouterr().err
    options = _method_options({"kl_threshold": 1.2, "num_points": None, "iterations": None, "refine": None,
                               "weights": None, "model": PLANTED_MODEL}, best)
    assert options["kl_threshold"] == 1.2 and options["num_points"] == 8
    err = capsys.readouterr().err
    assert "--kl-threshold on the command line overrides" in err and "warning" not in err
    options = _method_options({"model": "tiny-demo"}, best)
    assert options["model"] == "tiny-demo"
    assert (f"warning: {best}'s parameters were tuned on model {PLANTED_MODEL}, not tiny-demo"
            in capsys.readouterr().err)
    plain = planted["out"] / "plain.json"  # a plain parameters file names no model: the default stays
    plain.write_text(json.dumps(planted_report["label_params"]))
    assert _method_options({"model": None}, str(plain))["model"] == "CompVis/stable-diffusion-v1-4"


# --- the cache, with a real extractor ------------------------------------------------------------


def test_a_second_run_reads_the_cache_and_never_calls_the_extractor(ray_session, tmp_path, monkeypatch, capsys):
    from diffseg_core.extract import AttentionExtractor

    calls = []
    real_extract = AttentionExtractor.extract

    def counted(self, images):
        calls.append(len(images))
        return real_extract(self, images)

    monkeypatch.setattr(AttentionExtractor, "extract", counted)  # maps and features, one pass
    rng = np.random.default_rng(1)
    for i in range(3):
        write_png(tmp_path / "images" / f"im{i}.png", rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8))
        gt = np.zeros((40 + 8 * i, 48), dtype=np.uint8)
        gt[:, 24:] = 1
        write_png(tmp_path / "gt" / f"im{i}.png", gt)
    args = dict(num_classes=2, model="tiny-random", image_size=64, out=str(tmp_path / "out"), batch_size=2,
                folds=3, grid=Grid(taus=[0.5, 1.0], iterations=[1, 2], tau_steps=[0.0], num_points=[4],
                                   weights=["proportional", "finest"]), progress=False)
    first = tune(str(tmp_path / "images"), str(tmp_path / "gt"), "masks", **args)
    assert sum(calls) == 3 and len(calls) == 2  # batches of 2 and 1
    assert first["cache"]["extracted"] == 3 and first["cache"]["cached"] == 0
    assert len(list((tmp_path / "out" / CACHE_DIR).glob("*.safetensors"))) == 3
    entry = next((tmp_path / "out" / CACHE_DIR).glob("*.safetensors"))
    from pipeline.tune.cache import load_maps

    assert {r: m.dtype for r, m in load_maps(entry).items()} == {8: torch.float16, 4: torch.float16, 2: torch.float16}
    from pipeline.tune.cache import load_features

    assert load_features(entry).ndim == 4  # the encoder's features beside the maps, for --ncut-affinity features
    assert {r["ncut_affinity"] for r in first["ranking"] if r["grouping"] == "ncut"} == {"attention", "features"}
    assert any("RANDOM weights" in note for note in first["notes"])

    calls.clear()
    second = tune(str(tmp_path / "images"), str(tmp_path / "gt"), "masks", **args)
    assert calls == []
    assert second["cache"]["extracted"] == 0 and second["cache"]["cached"] == 3
    assert [(r["setting"], r["miou"]) for r in second["ranking"]] == [(r["setting"], r["miou"]) for r in first["ranking"]]

    # another timestep is other attention: extracted again
    third = tune(str(tmp_path / "images"), str(tmp_path / "gt"), "masks", **dict(args, timestep=200))
    assert third["cache"]["extracted"] == 3 and sum(calls) == 3

    # the printed copy-paste line labels with the model and frame it was tuned on, not the hub default
    line = next(l.strip() for l in format_report(third).splitlines() if "--params" in l)
    assert line == f"diffseg label INPUT OUTPUT --params {tmp_path / 'out' / 'best.json'}"
    argv = line.split()[1:]
    argv[1:3] = [str(tmp_path / "images"), str(tmp_path / "labels")]
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"using model tiny-random from {tmp_path / 'out' / 'best.json'}" in err and "ERROR" not in err
    manifest = json.loads((tmp_path / "labels" / "_manifest.json").read_text())
    assert manifest["model"]["model"] == "tiny-random"
    assert manifest["parameters"]["timestep"] == 200 and manifest["parameters"]["image_size"] == 64
    grouping = third["label_params"].get("grouping", "kl-merge")  # random weights: either may win
    assert manifest["parameters"].get("grouping", "kl-merge") == grouping
    if grouping == "kl-merge":
        assert manifest["parameters"]["kl_threshold"] == third["label_params"]["kl_threshold"]
    else:
        assert manifest["parameters"]["ncut_threshold"] == third["label_params"]["ncut_threshold"]


# --- bad input: one sentence, exit 2 --------------------------------------------------------------


def _tune_cli(capsys, *argv: str) -> str:
    assert main(["tune", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("diffseg tune: error: ")
    return err.removeprefix("diffseg tune: error: ")


def test_no_ground_truth_matched(planted, tmp_path, capsys):
    write_png(tmp_path / "gt" / "unrelated.png", np.zeros((4, 4), dtype=np.uint8))
    err = _tune_cli(capsys, str(planted["images"]), str(tmp_path / "gt"), "--format", "masks", "--num-classes", "3",
                    "--model", PLANTED_MODEL, "--out", str(tmp_path / "out"))
    assert err.startswith("none of the 10 images under") and "has ground truth under" in err


def test_an_empty_sample(planted, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _tune_cli(capsys, str(tmp_path / "empty"), str(planted["gt"]), "--format", "masks", "--num-classes", "3",
                    "--out", str(tmp_path / "out"))
    assert "No input matched" in err or "no image" in err
    err = _tune_cli(capsys, str(planted["images"]), str(planted["gt"]), "--format", "masks", "--num-classes", "3",
                    "--n", "0", "--out", str(tmp_path / "out"))
    assert err == "--n must be at least 1, got 0"
    err = _tune_cli(capsys, str(planted["images"]), str(planted["gt"]), "--format", "masks", "--num-classes", "3",
                    "--n", "1", "--out", str(tmp_path / "out"))
    assert err == "k-fold selection needs at least 2 images with ground truth, found 1"


def test_a_grid_the_model_cannot_run(planted, capsys):
    common = [str(planted["images"]), str(planted["gt"]), "--format", "masks", "--num-classes", "3",
              "--model", PLANTED_MODEL, "--dtype", "fp32", "--out", str(planted["out"])]
    err = _tune_cli(capsys, *common, "--num-points", "8,32")
    assert err.startswith("the grid cannot run on this model: num_points=32 needs self-attention maps of at least "
                          "32 x 32") and "gives 16 x 16" in err
    err = _tune_cli(capsys, *common, "--weights", "proportional", "2,1")
    assert err == ("the grid cannot run on this model: --weights 2,1: 2 weights given, but the model has 1 "
                   "attention resolutions [16] (one weight each, finest first)")
    err = _tune_cli(capsys, *common, "--tau", "0.5,-1")
    assert err == "tau must be positive, got -1.0"


def test_a_model_that_cannot_load_when_attention_is_missing(planted, tmp_path, capsys):
    err = _tune_cli(capsys, str(planted["images"]), str(planted["gt"]), "--format", "masks", "--num-classes", "3",
                    "--model", PLANTED_MODEL, "--dtype", "fp32", "--timestep", "100", "--out", str(planted["out"]))
    assert err.startswith(f"cannot load model '{PLANTED_MODEL}'")


# --- refusals cost a second: no Ray, no torch ------------------------------------------------------

PROBE = """
import json, sys
from pipeline.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "ray": "ray" in sys.modules, "torch": "torch" in sys.modules}))
"""


def _probe(*argv: str) -> tuple[dict, str]:
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", PROBE, "tune", *argv], capture_output=True, text=True, timeout=300,
                          cwd=repo, env={**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr.strip().splitlines()[-1]


def test_tunes_own_checks_fail_before_ray_and_torch_are_imported(planted, tmp_path):
    from diffseg_core.tiny_model import resolve_model

    resolve_model("tiny-random")  # built once (that needs torch); the probe below only reads its configs
    (tmp_path / "empty").mkdir()
    write_png(tmp_path / "gt" / "unrelated.png", np.zeros((4, 4), dtype=np.uint8))
    masks = ["--format", "masks", "--num-classes", "3"]
    cases = [
        ([str(tmp_path / "empty"), str(planted["gt"]), *masks], "No input matched"),
        ([str(planted["images"]), str(tmp_path / "gt"), *masks], "none of the 10 images under"),
        # no attention cached for tiny-random: the grid is judged from the model's configs, before any weight
        ([str(planted["images"]), str(planted["gt"]), *masks, "--model", "tiny-random", "--image-size", "64",
          "--num-points", "16"], "the grid cannot run on this model: num_points=16 needs"),
    ]
    for argv, sentence in cases:
        result, last = _probe(*argv, "--out", str(tmp_path / "out"))
        assert result == {"rc": 2, "ray": False, "torch": False}, (argv, last)
        assert last.startswith("diffseg tune: error: ") and sentence in last, last
    assert not (tmp_path / "out").exists()


# --- quality with a learned model (tiny-demo, shipped in the repo) ------------------------------------


def write_scenes(root: Path, seeds: list[int], size: int = 128) -> None:
    """Scenes of 2-4 flat-coloured, noisy rectangles and ellipses on a gradient, with their class maps."""
    ys, xs = np.mgrid[0:size, 0:size] / size
    for seed in seeds:
        rng = np.random.default_rng(seed)
        image = (rng.uniform(0, 255, 3) * (0.6 + 0.4 * ys[..., None])).astype(np.float64)
        classes = np.zeros((size, size), dtype=np.uint8)
        for k in range(1, int(rng.integers(2, 5)) + 1):
            cy, cx = rng.uniform(0.2, 0.8, 2)
            hy, hx = rng.uniform(0.12, 0.3, 2)
            if rng.random() < 0.5:
                inside = (abs(ys - cy) < hy) & (abs(xs - cx) < hx)
            else:
                inside = ((ys - cy) / hy) ** 2 + ((xs - cx) / hx) ** 2 < 1
            image[inside] = rng.uniform(0, 255, 3)
            classes[inside] = k
        image += rng.normal(0, 8, image.shape)
        write_png(root / "images" / f"scene{seed}.png", np.clip(image, 0, 255).astype(np.uint8))
        write_png(root / "gt" / f"scene{seed}.png", classes)


def test_tiny_demo_tuned_setting_scores_at_least_the_default_on_held_out_scenes(ray_session, tmp_path):
    """Tune on 24 scenes, then score the chosen setting and the default on 24 other scenes."""
    write_scenes(tmp_path / "tune", list(range(24)))
    write_scenes(tmp_path / "held", list(range(100, 124)))
    grid = Grid(taus=[0.6, 0.8, 1.0, 1.2, 1.4], iterations=[1, 2, 3], tau_steps=[0.0],
                weights=["proportional", "equal"])
    tuned = tune(str(tmp_path / "tune" / "images"), str(tmp_path / "tune" / "gt"), "masks", num_classes=5,
                 model="tiny-demo", out=str(tmp_path / "out-tune"), folds=4, grid=grid, progress=False)
    assert tuned["best"]["held_out"]["images"] == 24 and 0 <= tuned["best"]["held_out"]["miou"] <= 1
    best = tuned["best"]
    # the default grid scores PAMR too, and tiny-demo's card turns it on: the held-out run scores the
    # tuned setting exactly (both plain candidates' PAMR variants, so the tuned one is among them)
    # (the grouping searched too: a cut chosen is scored again as it was, at the default's weights)
    cut = best["grouping"] == "ncut"
    only_best = Grid(taus=[best["kl_threshold"][0]] if not cut else [1.0], iterations=[1], tau_steps=[0.0],
                     schedules=[tuple(best["kl_threshold"])] if not cut else [],
                     num_points=[best["num_points"]] if not cut else None,
                     weights=[best["weights"]], refine=[best["refine"]], boundaries=[best["boundaries"]],
                     pamr_iterations=[best["pamr_iterations"] or 10], boundary_candidates=2,
                     groupings=[best["grouping"]], ncut_thresholds=[best["ncut_threshold"] or "auto"],
                     ncut_affinities=[best["ncut_affinity"] or "attention"])
    held = tune(str(tmp_path / "held" / "images"), str(tmp_path / "held" / "gt"), "masks", num_classes=5,
                model="tiny-demo", out=str(tmp_path / "out-held"), folds=2, grid=only_best, progress=False)
    rows = {r["setting"]: r for r in held["ranking"]}
    default = next((r for r in held["ranking"] if r["is_default"]), None)
    # tune's default is LabelOptions' (tau 1.1, 3 iterations, 16 x 16 anchors): if tiny-demo ships
    # defaults of its own, tune's default_setting() must follow them for this comparison to mean anything
    assert default is not None, held["notes"]
    # on scenes the search never saw, the tuned setting is at least as good (0.02: 24 scenes' noise)
    assert rows[best["setting"]]["miou"] >= default["miou"] - 0.02, (best["setting"], rows[best["setting"]], default)
