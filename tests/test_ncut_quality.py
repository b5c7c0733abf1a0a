"""The normalized cut against DiffSeg's KL merge, end to end, on held-out synthetic scenes: files ->
``label(model="tiny-demo", grouping=...)`` -> Parquet -> ``diffseg eval --format masks``.

Two kinds of scene (diffseg_core.demo_model.scenes): plain (each region its own colour) and
textured (close colours, distinct textures). tiny-demo is a small demo model, not Stable
Diffusion: these figures show the grouping's gain on its attention, not SD's.
"""
from __future__ import annotations

import contextlib
import io
import json

import pytest
from PIL import Image

from diffseg_core.demo_model.scenes import MAX_REGIONS, make_scene
from tests.scene_sets import held_out_seeds, write_image_list

pytestmark = pytest.mark.slow

N_SCENES = 8  # of each kind
SIZE = 256  # tiny-demo's native size
KINDS = ("plain", "textured")
# label() options per run; the card's own PAMR unless "boundaries" says otherwise
RUNS = {
    "kl-merge": {},
    "ncut": {"grouping": "ncut"},
    "kl-merge off": {"boundaries": "off"},
    "ncut off": {"grouping": "ncut", "boundaries": "off"},
    "ncut 0.5": {"grouping": "ncut", "ncut_threshold": 0.5},
    "ncut 0.7": {"grouping": "ncut", "ncut_threshold": 0.7},
}
# Floors, set under what these 8 + 8 scenes measured (mIoU, plain / textured):
#   kl-merge 0.755 / 0.297, ncut 0.856 / 0.484 (card's PAMR); kl-merge off 0.633 / 0.281, ncut off 0.747 / 0.416;
#   ncut tau 0.5: 0.903 / 0.470, tau 0.7: 0.914 / 0.472.
# BENCHMARKS.md ("Grouping") has 200 of each kind. Floors to keep, not targets: the issue's goals
# (+0.20 textured / +0.05 plain with PAMR, +0.18 textured without, auto within 0.02 of the best
# fixed tau) are judged there. Here auto is 0.058 under tau 0.7 on the plain scenes (and best on
# the textured ones): the slack keeps that floor, it does not reach the goal.
GAIN_PAMR = {"plain": 0.06, "textured": 0.15}  # ncut over kl-merge, both with PAMR (measured +0.101 / +0.187)
GAIN_OFF = {"textured": 0.10}  # ncut over kl-merge, both without boundaries (measured +0.135)
AUTO_SLACK = 0.08  # auto below the best fixed threshold, at most (measured 0.058 plain; textured auto is best)


@pytest.fixture(scope="module")
def scored(ray_session, tmp_path_factory):
    """Write both kinds of scene, label them once per run of RUNS, eval each run per kind."""
    from pipeline.cli import main
    from pipeline.job.run import label

    root = tmp_path_factory.mktemp("ncut-scenes")
    ids: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for k, seed in enumerate(held_out_seeds(N_SCENES, offset=300)):
        for kind in KINDS:
            scene = make_scene(seed, SIZE, textured=kind == "textured")
            rel = f"{kind}/scene-{k}.png"
            for folder, array in (("images", scene.image), ("gt", scene.regions)):
                (root / folder / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / folder / rel)
            ids[kind].append(rel)
    scores: dict[str, dict[str, dict]] = {}
    for name, options in RUNS.items():
        out = root / f"labels-{name.replace(' ', '-')}"
        summary = label(str(root / "images"), str(out), model="tiny-demo", batch_size=8, **options)
        assert summary["complete"] and summary["errors"] == 0, (name, summary)
        manifest = json.loads((out / "_manifest.json").read_text())
        assert manifest["parameters"].get("grouping", "kl-merge") == options.get("grouping", "kl-merge")
        scores[name] = {}
        for kind in KINDS:
            listing = write_image_list(root / f"{kind}.txt", ids[kind])
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                code = main(["eval", str(out), str(root / "gt"), "--format", "masks", "--num-classes",
                             str(MAX_REGIONS), "--no-ray", "--json", "--image-list", listing])
            assert code == 0, printed.getvalue()
            scores[name][kind] = json.loads(printed.getvalue())
    print("\n" + "\n".join(f"{name:14s} " + "  ".join(f"{kind} {scores[name][kind]['miou']:.3f}" for kind in KINDS)
                            for name in RUNS))
    return scores


def _miou(scored, name: str, kind: str) -> float:
    assert scored[name][kind]["num_images"] == N_SCENES
    return scored[name][kind]["miou"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_cut_beats_the_kl_merge_with_pamr(scored, kind):
    assert _miou(scored, "ncut", kind) >= _miou(scored, "kl-merge", kind) + GAIN_PAMR[kind]


def test_the_cut_beats_the_kl_merge_on_textured_scenes_without_boundaries(scored):
    assert _miou(scored, "ncut off", "textured") >= _miou(scored, "kl-merge off", "textured") + GAIN_OFF["textured"]


@pytest.mark.parametrize("kind", KINDS)
def test_auto_is_close_to_the_best_fixed_threshold(scored, kind):
    best = max(_miou(scored, name, kind) for name in ("ncut 0.5", "ncut 0.7"))
    assert _miou(scored, "ncut", kind) >= best - AUTO_SLACK
