"""tiny-demo: the shipped learned demo model, its model card, its training script and its scenes."""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg_core.demo_model.scenes import HELD_OUT_SEEDS, MAX_REGIONS, MIN_AREA, TRAIN_SEEDS, make_scene
from diffseg_core.tiny_model import TINY_DEMO, resolve_model, tiny_demo_path

ROOT = Path(__file__).resolve().parents[1]
MIN_OWN_LIFT = 2.8  # measured on the shipped model (region-balanced): 3.5x at 8, 3.6x at 16, 3.15x at 32


@pytest.fixture(scope="module")
def demo_extractor():
    from diffseg_core.extract import AttentionExtractor

    return AttentionExtractor.from_pretrained(TINY_DEMO)


def test_name_resolves_to_the_shipped_diffusers_folder():
    folder = Path(resolve_model(TINY_DEMO))
    assert folder == tiny_demo_path() and (folder / "model_index.json").is_file()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir()
    weights = sorted(folder.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder"}
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) <= 15 * 2**20


def test_model_card_says_it_is_a_demo(demo_extractor):
    card = json.loads((tiny_demo_path() / "diffseg.json").read_text())
    assert card["demo_model"] is True and "not Stable Diffusion" in card["description"]
    info = demo_extractor.model_info
    assert info["model"] == TINY_DEMO and info["demo_model"] is True and info["random_weights"] is False
    assert "trained for minutes on synthetic scenes" in info["description"]
    assert info["weights_sha256"] and all(len(h) == 64 for h in info["weights_sha256"].values())


def test_it_is_sd_shaped_with_self_attention_at_three_resolutions(demo_extractor):
    assert demo_extractor.image_size == 256
    assert demo_extractor.attention_resolutions == [32, 16, 8]
    assert demo_extractor.vae_scale_factor == 8


def _own_region_attention(extractor, scenes) -> dict[int, tuple[float, float]]:
    """Per resolution: a query's attention mass on its own region, and that region's share of the
    picture (what uniform attention would give), each averaged over the regions of the scenes."""
    maps = extractor(np.stack([s.image for s in scenes]))
    out = {}
    for r, batch in maps.items():
        own, share = [], []
        for scene, m in zip(scenes, batch):
            m = m.mean(0) if m.dim() == 3 else m  # heads, where kept
            small = Image.fromarray(scene.regions).resize((r, r), Image.Resampling.NEAREST)
            regions = torch.from_numpy(np.asarray(small).astype(np.int64).ravel())
            for k in regions.unique():
                inside = regions == k
                own.append(float(m[inside][:, inside].sum(1).mean()))
                share.append(float(inside.float().mean()))
        out[r] = (float(np.mean(own)), float(np.mean(share)))
    return out


def test_learned_attention_groups_pixels_of_the_same_region(demo_extractor, tiny_model_path):
    """At every resolution a query puts far more of its attention on its own region than the
    region's share of the picture; tiny-random's attention does not (it sits at the share)."""
    from diffseg_core.extract import AttentionExtractor

    scenes = [make_scene(HELD_OUT_SEEDS[k], 256) for k in range(3)]
    demo = _own_region_attention(demo_extractor, scenes)
    rand = _own_region_attention(AttentionExtractor.from_pretrained(tiny_model_path, image_size=256), scenes)
    assert sorted(demo) == [8, 16, 32]
    for r, (own, share) in demo.items():
        assert own > MIN_OWN_LIFT * share, (r, own, share)
    for r, (own, share) in rand.items():
        assert own < 1.3 * share, (r, own, share)


def test_package_data_ships_every_file_of_the_model():
    """A non-editable install has the weights: pyproject's package-data patterns match every file."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["diffseg_core.demo_model"]
    package = ROOT / "diffseg_core" / "demo_model"
    files = [p.relative_to(package).as_posix() for p in (package / TINY_DEMO).rglob("*") if p.is_file()]
    assert files
    missed = [f for f in files if not any(fnmatch.fnmatch(f, pat) and f.count("/") == pat.count("/")
                                          for pat in patterns)]
    assert not missed


def test_scenes_are_deterministic_and_held_out_seeds_are_disjoint():
    a, b = make_scene(HELD_OUT_SEEDS[3], 64), make_scene(HELD_OUT_SEEDS[3], 64)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.regions, b.regions)
    assert set(range(TRAIN_SEEDS.start, TRAIN_SEEDS.stop)).isdisjoint(range(HELD_OUT_SEEDS.start, HELD_OUT_SEEDS.start + 10))
    for k in range(20):
        s = make_scene(HELD_OUT_SEEDS[k], 64)
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert 2 <= s.num_regions <= MAX_REGIONS
        areas = np.bincount(s.regions.ravel()) / s.regions.size
        assert areas.min() >= MIN_AREA * 0.5  # rendered at 64 px the layout's areas move a little


def test_a_scene_renders_the_same_layout_at_any_size():
    small, big = make_scene(HELD_OUT_SEEDS[0], 64), make_scene(HELD_OUT_SEEDS[0], 128)
    down = big.regions.reshape(64, 2, 64, 2)[:, 0, :, 0]
    assert (down == small.regions).mean() > 0.97
    wide = make_scene(HELD_OUT_SEEDS[0], (32, 96))
    assert wide.image.shape == (32, 96, 3)
    with pytest.raises(ValueError, match="at least 8 x 8"):
        make_scene(0, 4)


def test_training_is_deterministic_and_writes_a_loadable_demo_folder(tmp_path):
    """The training script at toy size, twice: the same weights, loadable through from_pretrained."""
    from safetensors.torch import load_file

    from diffseg_core.demo_model.train import TrainConfig, train
    from diffseg_core.extract import AttentionExtractor

    cfg = TrainConfig(image_size=64, vae_scenes=4, scenes=4, photo_crops=1, vae_steps=2, vae_batch=2, vae_crop=32,
                      unet_steps=2, unet_batch=2, unet_crop=8)
    logs: list[str] = []
    train(tmp_path / "a", cfg, log=logs.append)
    train(tmp_path / "b", cfg, log=lambda s: None)
    assert any(line.startswith("total:") for line in logs)
    for sub in ("unet", "vae"):
        a = load_file(tmp_path / "a" / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / "b" / sub / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert set(record["stages"]) >= {"vae", "encode", "unet", "write"} and record["total"]["cpu_s"] >= 0
    ex = AttentionExtractor.from_pretrained(tmp_path / "a")
    assert ex.model_info["demo_model"] is True and ex.image_size == 64
    assert torch.get_num_threads() >= 1 and not torch.are_deterministic_algorithms_enabled()


def test_the_shipped_card_holds_the_trainers_defaults():
    """What ``python -m diffseg_core.demo_model.train`` writes is what ships: the card's DiffSeg
    defaults and the recorded training settings are the script's own."""
    from diffseg_core.demo_model.train import DEMO_DEFAULTS, TrainConfig
    from diffseg_core.tiny_model import tiny_demo_path

    folder = tiny_demo_path()
    card = json.loads((folder / "diffseg.json").read_text())
    assert card["defaults"] == DEMO_DEFAULTS
    assert json.loads((folder / "training.json").read_text())["config"] == dataclasses.asdict(TrainConfig())


def test_training_options_for_a_4x_vae_and_decoder_attention(tmp_path):
    """The experiment options (BENCHMARKS.md, tiny-demo): a 3-block VAE (4x, latents twice as fine)
    and self-attention in the UNet's last up block; the folder loads at the factor it was built with."""
    from diffseg_core.demo_model.train import TrainConfig, train
    from diffseg_core.extract import AttentionExtractor

    cfg = TrainConfig(image_size=64, vae_blocks=3, decoder_attention=True, vae_scenes=4, scenes=4, photo_crops=1,
                      vae_steps=2, vae_batch=2, vae_crop=32, unet_steps=2, unet_batch=2, unet_crop=8)
    train(tmp_path, cfg, log=lambda s: None)
    ex = AttentionExtractor.from_pretrained(tmp_path)
    assert ex.vae_scale_factor == 4 and ex.image_size == 64
    assert any(name.startswith("up_blocks.2.attentions") for name in ex.layer_names)
    maps = ex(np.zeros((1, 64, 64, 3), dtype=np.uint8))
    assert sorted(maps) == [4, 8, 16]
    with pytest.raises(ValueError, match="vae_blocks must be 3 or 4"):
        train(tmp_path / "bad", TrainConfig(vae_blocks=5))


def test_model_card_defaults_fill_only_what_the_caller_left_out(tmp_path, tiny_model_path):
    import shutil

    from diffseg_core import DiffSeg
    from diffseg_core.method_defaults import PAPER_DEFAULTS, model_method_defaults
    from pipeline.job.options import LabelOptions

    folder = tmp_path / "with-card"
    shutil.copytree(tiny_model_path, folder)
    (folder / "diffseg.json").write_text(json.dumps({"defaults": {"kl_threshold": 0.7, "num_points": 8}}))
    lab = DiffSeg.from_pretrained(folder)
    assert list(lab.diffseg.thresholds) == [0.7] * 3 and lab.diffseg.num_points == 8
    lab = DiffSeg.from_pretrained(folder, kl_threshold=[1.0, 0.9])  # what the caller sets wins
    assert list(lab.diffseg.thresholds) == [1.0, 0.9] and lab.diffseg.num_points == 8
    opts = LabelOptions(model=str(folder)).with_model_defaults()
    assert (opts.kl_threshold, opts.num_points, opts.iterations) == (0.7, 8, 3)
    opts = LabelOptions(model=str(folder), num_points=4, kl_threshold=[1.2, 1.0]).with_model_defaults()
    assert (opts.kl_threshold, opts.num_points, opts.iterations) == ([1.2, 1.0], 4, 2)
    assert opts.weights is None and lab.diffseg.weights is None  # no weights in the card: proportional to r
    # Aggregation weights in the card: used by the library, the job and tune's baseline; the caller's win.
    (folder / "diffseg.json").write_text(json.dumps({"defaults": {"kl_threshold": 0.7, "weights": [1, 1]}}))
    assert DiffSeg.from_pretrained(folder).diffseg.weights == [1, 1]
    assert DiffSeg.from_pretrained(folder, weights=[2, 1]).diffseg.weights == [2, 1]
    opts = LabelOptions(model=str(folder)).with_model_defaults()
    assert opts.weights == [1, 1] and opts.label_parameters(64, "fp32")["weights"] == [1.0, 1.0]
    assert LabelOptions(model=str(folder), weights=[3, 1]).with_model_defaults().weights == [3, 1]
    from pipeline.tune.grid import default_setting

    assert default_setting(str(folder)).weights == "equal"  # the grid's preset: scored once, not twice
    (folder / "diffseg.json").write_text(json.dumps({"defaults": {"weights": [2, 1]}}))
    assert default_setting(str(folder)).weights == "2,1"
    # No card, or a hub id: the paper's defaults (nothing is loaded or built to know that).
    assert model_method_defaults(tiny_model_path) == PAPER_DEFAULTS
    assert model_method_defaults("CompVis/stable-diffusion-v1-4") == PAPER_DEFAULTS
    assert model_method_defaults("tiny-random") == PAPER_DEFAULTS
    card = json.loads((tiny_demo_path() / "diffseg.json").read_text())
    assert model_method_defaults(TINY_DEMO) == {**PAPER_DEFAULTS, **card["defaults"]}


def test_a_bad_model_card_is_one_clear_error(tmp_path, tiny_model_path):
    import shutil

    from diffseg_core.model_loading import ModelLoadError
    from pipeline.errors import LabelError
    from pipeline.job.options import LabelOptions

    folder = tmp_path / "bad-card"
    shutil.copytree(tiny_model_path, folder)
    (folder / "diffseg.json").write_text(json.dumps({"defaults": {"tau": 0.7}}))
    with pytest.raises(ModelLoadError, match="'defaults' has keys DiffSeg does not take: tau"):
        from diffseg_core import DiffSeg

        DiffSeg.from_pretrained(folder)
    (folder / "diffseg.json").write_text(json.dumps({"defaults": {"weights": [1, -1]}}))
    with pytest.raises(LabelError, match="'defaults': weights must be non-negative numbers"):
        LabelOptions(model=str(folder)).with_model_defaults()
    (folder / "diffseg.json").write_text("[1, 2]")
    with pytest.raises(LabelError, match="must hold a JSON object"):
        LabelOptions(model=str(folder)).with_model_defaults()


def test_job_specs_accept_tiny_demo(tmp_path):
    from jobs.spec import load_spec

    path = tmp_path / "demo.yaml"
    path.write_text("input: /data/in\noutput: /data/out\nmodel: tiny-demo\n")
    spec = load_spec(path)
    assert spec.options["model"] == TINY_DEMO and "kl_threshold" not in spec.options  # the model's default applies


def test_diffseg_from_pretrained_takes_tiny_demo_with_its_card_defaults():
    from diffseg_core import DiffSeg

    card = json.loads((tiny_demo_path() / "diffseg.json").read_text())
    labeler = DiffSeg.from_pretrained(TINY_DEMO)
    assert list(labeler.diffseg.thresholds) == [card["defaults"]["kl_threshold"]] * card["defaults"]["iterations"]
    scene = make_scene(HELD_OUT_SEEDS[7], (96, 160))
    (labels,) = labeler([scene.image])
    assert labels.shape == (96, 160) and 2 <= int(labels.max()) + 1 <= 12
