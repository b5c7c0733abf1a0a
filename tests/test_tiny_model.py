"""The tiny random-weight test model and the "tiny-random" model name."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from diffseg_core import tiny_model
from diffseg_core.tiny_model import build_tiny_model, resolve_model


def test_sd1_folder_is_a_loadable_diffusers_pipeline(tiny_model_path):
    from diffusers import StableDiffusionPipeline

    index = json.loads((tiny_model_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for sub in ("unet", "vae", "text_encoder", "tokenizer"):
        assert (tiny_model_path / sub).is_dir()
    assert list((tiny_model_path / "unet").glob("*.safetensors"))
    assert "RANDOM weights" in (tiny_model_path / "README.md").read_text()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path)
    assert pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer("", padding="max_length", max_length=77).input_ids
    assert ids[:3] == [pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id, pipe.tokenizer.pad_token_id]
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 128


def test_sdxl_folder_is_a_loadable_sdxl_pipeline(tiny_sdxl_model_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_path)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert pipe.tokenizer_2.pad_token == "!"


def test_build_is_deterministic_for_a_seed(tmp_path, tiny_model_path):
    from safetensors.torch import load_file

    other = build_tiny_model(tmp_path / "again", variant="sd1", seed=0)
    a = load_file(tiny_model_path / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(other / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        build_tiny_model("/nonexistent", variant="sd3")


def test_resolve_model_passes_other_names_through():
    assert resolve_model("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"
    assert resolve_model("/some/folder") == "/some/folder"


def test_resolve_tiny_random_builds_once_without_races(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path))
    calls = []
    real_build = tiny_model.build_tiny_model

    def counting_build(*args, **kwargs):
        calls.append(args)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "build_tiny_model", counting_build)
    results, errors = [], []
    barrier = threading.Barrier(2)

    def worker():
        try:
            barrier.wait()
            results.append(resolve_model("tiny-random"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    path = results[0]
    assert path.startswith(str(tmp_path / "tiny-random"))
    # only the published folder remains: no temporary build folders left behind
    assert [p.name for p in (tmp_path / "tiny-random").iterdir()] == [path.rsplit("/", 1)[1]]
    n = len(calls)
    assert resolve_model("tiny-random") == path
    assert len(calls) == n  # cached: not built again


def test_tiny_random_name_loads_through_the_extractor(tmp_path, monkeypatch, caplog):
    from diffseg_core.extract import AttentionExtractor

    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path))
    with caplog.at_level("WARNING"):
        ex = AttentionExtractor.from_pretrained("tiny-random")
    assert "RANDOM weights" in caplog.text
    info = ex.model_info
    assert info["model"] == "tiny-random" and info["random_weights"] is True
    assert ex.image_size == 128


def test_a_stale_cache_from_another_builder_is_not_reused(tmp_path, monkeypatch):
    """The cache folder is named by the builder's fingerprint: an older build
    (other configs) left in the cache must not be picked up."""
    from diffseg_core.tiny_model import tiny_model_cache_dir, tiny_random_path

    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path))
    stale = tiny_model_cache_dir() / "sd1-v1"
    stale.mkdir(parents=True)
    (stale / "model_index.json").write_text("{}")
    assert tiny_random_path() != stale
    assert tiny_random_path().name.startswith("sd1-") and len(tiny_random_path().name) == 16


def test_quiet_loading_from_overlapping_threads_leaves_the_loggers_as_found():
    """Two model loads that overlap (an actor's concurrent calls, workers building
    tiny-random together) must not leave diffseg's notes silenced afterwards."""
    import logging
    import threading

    from diffseg_core.model_loading import quiet_loading

    ours = logging.getLogger("diffseg_core")
    before = ours.level
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with quiet_loading():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def second():
        a_in.wait(5)
        with quiet_loading():
            b_in.set()
            a_out.wait(5)  # the first leaves while the second is still inside
            assert ours.level == logging.ERROR

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ours.level == before
