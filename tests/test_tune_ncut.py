"""diffseg tune searches the grouping: the normalized cut's rows are scored exactly as label cuts,
chosen where they win (tiny-demo's textured scenes), carried by best.json into `diffseg label
--params`, and a cache made before the encoder's features were kept still works."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from after_helpers import write_png
from diffseg_core.boundaries import DEFAULT_DILATIONS
from diffseg_core.demo_model.scenes import make_scene
from diffseg_core.metrics import SegmentationMetrics
from diffseg_core.segmentor import DiffSeg
from pipeline.cli import main
from pipeline.tune import tune
from pipeline.tune.cache import CACHE_DIR, AttentionCache, load_features, load_maps, load_pixels
from pipeline.tune.grid import Grid, GridError, check_values
from pipeline.tune.report import format_report
from pipeline.tune.score import Group, score_chunk
from safetensors import safe_open

SEEDS = list(range(500, 508))  # tiny-demo's textured scenes: close colours, distinct textures
CARD_WEIGHTS = [1.0, 2.0, 0.0]  # tiny-demo's card (finest first)
GRID = dict(taus=[1.5], iterations=[2], tau_steps=[0.0], num_points=[8], weights=["1,2,0"],
            boundaries=["off", "pamr"], pamr_iterations=[10], boundary_candidates=1,
            ncut_thresholds=["auto", 0.5], ncut_affinities=["attention", "features"])


def write_textured(root: Path) -> None:
    for seed in SEEDS:
        scene = make_scene(seed, 256, textured=True)
        write_png(root / "images" / f"scene{seed}.png", scene.image)
        write_png(root / "gt" / f"scene{seed}.png", scene.regions)


def _tune(root: Path, out: Path, **grid) -> dict:
    return tune(str(root / "images"), str(root / "gt"), "masks", num_classes=6, model="tiny-demo", out=str(out),
                folds=2, grid=Grid(**dict(GRID, **grid)), progress=False)


@pytest.fixture(scope="module")
def textured(tmp_path_factory, ray_session) -> dict:
    root = tmp_path_factory.mktemp("tune-ncut")
    write_textured(root)
    return {"root": root, "report": _tune(root, root / "out")}


def test_ncut_rows_are_scored_beside_the_kl_merge(textured):
    rows = textured["report"]["ranking"]
    cuts = {(r["ncut_threshold"], r["ncut_affinity"], r["boundaries"]) for r in rows if r["grouping"] == "ncut"}
    assert {(t, a, "off") for t in ("auto", 0.5) for a in ("attention", "features")} <= cuts
    assert any(b == "pamr" for _, _, b in cuts)  # the cut's best plain setting got its PAMR variant
    assert any(r["grouping"] == "kl-merge" for r in rows)
    assert all(0 <= r["miou"] <= 1 for r in rows)
    table = format_report(textured["report"])
    assert "grouping=ncut ncut_tau=auto affinity=attention weights=1,2,0 boundaries=off" in table
    cached = next((textured["root"] / "out" / CACHE_DIR).glob("*.safetensors"))
    assert load_features(cached).shape[:2] == (1, 64)  # tiny-demo's encoder features, kept beside the maps


def test_tune_chooses_ncut_on_textured_scenes_and_label_cuts_with_it(textured, tmp_path, capsys):
    report = textured["report"]
    best, default = report["best"], report["default"]
    assert best["grouping"] == "ncut" and not best["kept_default"], best
    assert best["in_sample"]["miou"] > default["score"]["miou"] + 0.1, (best, default)
    params = report["label_params"]
    assert params["grouping"] == "ncut" and params["ncut_threshold"] == best["ncut_threshold"]
    assert "kl_threshold" not in params and "iterations" not in params
    assert "--grouping ncut --ncut-threshold" in report["label_flags"]
    assert "  grouping: ncut\n" in report["method_block"]
    best_json = textured["root"] / "out" / "best.json"
    assert json.loads(best_json.read_text())["label_params"] == params
    capsys.readouterr()
    out = tmp_path / "labels"
    code = main(["label", str(textured["root"] / "images"), str(out), "--params", str(best_json),
                 "--batch-size", "4"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert f"method: grouping ncut (threshold {_tau(params['ncut_threshold'])}, " in printed.out  # the run's summary
    parameters = json.loads((out / "_manifest.json").read_text())["parameters"]
    assert parameters["grouping"] == "ncut" and parameters["ncut_threshold"] == params["ncut_threshold"]
    assert parameters["ncut_affinity"] == params["ncut_affinity"]


def test_tune_scores_the_cut_exactly_as_diffseg_labels_with_it(textured):
    """score_chunk's TP/FP/FN of each cut (plain and with PAMR) equal those of
    DiffSeg(grouping="ncut").label_maps on the same cached maps, features and pixels."""
    paths = sorted(str(p) for p in (textured["root"] / "out" / CACHE_DIR).glob("*.safetensors"))[:2]
    pamr = (10, DEFAULT_DILATIONS)
    members = [("auto", "attention", None), (0.5, "features", None), ("auto", "features", pamr)]
    expected = np.zeros((len(members), 3, 6), dtype=np.int64)
    targets = []
    for path in paths:
        maps, features, pixels = load_maps(path), load_features(path), load_pixels(path)
        target = make_scene(int(Path(_image_id(path)).stem.removeprefix("scene")), 256, textured=True).regions
        targets.append(target.astype(np.int16))
        for i, (threshold, affinity, spec) in enumerate(members):
            d = DiffSeg(weights=CARD_WEIGHTS, grouping="ncut", ncut_threshold=threshold, ncut_affinity=affinity,
                        boundaries="pamr" if spec else "off")
            labels = d.label_maps(d.proposals(maps, features), [target.shape], pixels)[0]
            one = SegmentationMetrics(6).update(labels.numpy(), target.astype(np.int16))
            expected[i] += np.stack([one["tp"], one["fp"], one["fn"]])
    got = score_chunk(paths, targets, [0] * len(paths), Group(tuple(CARD_WEIGHTS), 0, tuple(members), "ncut"), 6, 1)
    np.testing.assert_array_equal(got["counts"][:, 0], expected)


def _tau(v: float | str) -> str:
    return v if isinstance(v, str) else f"{v:g}"


def _image_id(path: str) -> str:
    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["diffseg"])["image_id"]


def test_a_cache_made_before_the_features_were_kept_still_works(textured, tmp_path):
    cache = AttentionCache(tmp_path / "out" / CACHE_DIR)
    for path in sorted((textured["root"] / "out" / CACHE_DIR).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            meta = {k: v for k, v in json.loads(f.metadata()["diffseg"]).items() if k not in ("resolutions", "features")}
            pixels = f.get_tensor("pixels").numpy()
        cache.put(path.stem, {r: m[0] for r, m in load_maps(path).items()}, meta, pixels=pixels)  # no features
    report = _tune(textured["root"], tmp_path / "out")
    assert report["cache"]["extracted"] == 0 and report["cache"]["cached"] == len(SEEDS)
    assert not any(r["ncut_affinity"] == "features" for r in report["ranking"])
    assert any("features affinity left out: 8 of the 8 cached images hold no encoder features" in n
               for n in report["notes"]), report["notes"]
    before = {r["setting"]: r["miou"] for r in textured["report"]["ranking"]}
    for r in report["ranking"]:
        if r["grouping"] == "ncut" and r["boundaries"] == "off":
            assert r["miou"] == pytest.approx(before[r["setting"]], abs=1e-9)  # the same cut on the same maps
    with pytest.raises(Exception, match="no setting of the grid can be scored: ncut's features affinity needs"):
        _tune(textured["root"], tmp_path / "out", groupings=["ncut"], ncut_affinities=["features"])


def test_grouping_kl_merge_leaves_the_cut_out(textured, tmp_path):
    shutil.copytree(textured["root"] / "out" / CACHE_DIR, tmp_path / "out" / CACHE_DIR)
    report = _tune(textured["root"], tmp_path / "out", groupings=["kl-merge"])
    assert {r["grouping"] for r in report["ranking"]} == {"kl-merge"}
    assert "grouping" not in report["label_params"]  # best.json as before the cut


def test_bad_grouping_grids_are_one_sentence(capsys):
    with pytest.raises(GridError, match="--grouping takes kl-merge, ncut"):
        check_values(Grid(groupings=["watershed"]))
    with pytest.raises(GridError, match="--ncut-threshold: ncut_threshold must be auto or a number in"):
        check_values(Grid(ncut_thresholds=[3.0]))
    with pytest.raises(GridError, match="--ncut-affinity takes attention, features"):
        check_values(Grid(ncut_affinities=["pixels"]))
    check_values(Grid(groupings=["kl-merge"], ncut_thresholds=[]))  # the cut's grid is unused without it
    for flag, value in (("--grouping", "watershed"), ("--ncut-threshold", "3"), ("--ncut-affinity", "pixels")):
        with pytest.raises(SystemExit) as exit_:
            main(["tune", "images", "gt", "--format", "masks", "--num-classes", "2", flag, value])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"diffseg tune: error: {flag} takes ") and err.endswith(f"not {value!r}."), err
        assert "\n" not in err
