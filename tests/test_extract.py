"""AttentionExtractor on tiny SD1- and SDXL-shaped models with RANDOM weights.

The reference in these tests is independent of the extractor: diffusers'
own pipeline (its VAE, its ``encode_prompt``, its ``_get_add_time_ids``, its
default SDPA attention processors) with forward pre-hooks on every ``attn1``
layer that recompute softmax(QK^T/sqrt(d)) from the layer's own to_q/to_k on
the layer's input.
"""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg_core.extract import AttentionExtractor, preprocess_images
from diffseg_core.model_loading import ModelLoadError
from tests.reference_unet import head_mean_softmax, run_unet_with_hooks
from tests.tolerances import ATTENTION, assert_same_attention

VARIANTS = ["sd1", "sdxl"]


@pytest.fixture(scope="module")
def model_paths(tiny_model_path, tiny_sdxl_model_path):
    return {"sd1": tiny_model_path, "sdxl": tiny_sdxl_model_path}


@pytest.fixture(scope="module")
def extractors(model_paths):
    return {v: AttentionExtractor.from_pretrained(model_paths[v]) for v in VARIANTS}


def _images(n=2, size=64, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3), dtype=np.uint8)


def _reference_layers(path, variant: str, pixels: torch.Tensor, timestep: int = 300):
    """Per-layer head-mean softmax(QK^T/sqrt(d)) of every attn1 layer, via diffusers' pipeline."""
    ref: dict[str, torch.Tensor] = {}

    def hook(name, module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        assert kwargs.get("encoder_hidden_states") is None
        ref[name] = head_mean_softmax(module, h, h)

    run_unet_with_hooks(path, variant, pixels, "attn1", hook, timestep)
    return ref


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_independent_softmax_for_every_attn1_layer(variant, model_paths, extractors):
    ex = extractors[variant]
    pixels = ex.to_pixels(_images())
    ref = _reference_layers(model_paths[variant], variant, pixels)

    ex.keep_layers = True
    try:
        maps = ex(pixels)
        layers = ex.last_layers
    finally:
        ex.keep_layers = False

    assert set(layers) == set(ref) == set(ex.layer_names)
    by_res: dict[int, list[torch.Tensor]] = {}
    for name, expected in ref.items():
        torch.testing.assert_close(layers[name], expected, atol=1e-5, rtol=0)
        by_res.setdefault(math.isqrt(expected.shape[-1]), []).append(expected)
    # resolutions come from sequence lengths; each is the mean over its layers
    assert sorted(maps) == sorted(by_res)
    for r, group in by_res.items():
        assert maps[r].shape == (2, r * r, r * r) and maps[r].dtype == torch.float32
        torch.testing.assert_close(maps[r], torch.stack(group).mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(maps[r].sum(-1), torch.ones(2, r * r), atol=1e-5, rtol=0)


def test_resolutions_follow_the_architecture(extractors):
    # tiny SD1: attention in 2 down blocks, mid, 2 up blocks -> 16, 8, 4 at 128 px
    assert sorted(extractors["sd1"](_images(1))) == [4, 8, 16]
    # tiny SDXL: no attention in the first down block / last up block -> 8, 4
    assert sorted(extractors["sdxl"](_images(1))) == [4, 8]
    assert len(extractors["sd1"].layer_names) == 11
    assert len(extractors["sdxl"].layer_names) == 16


def test_resolutions_scale_with_image_size(model_paths):
    ex = AttentionExtractor.from_pretrained(model_paths["sd1"], image_size=64)
    maps = ex(_images(1, size=50))
    assert {r: tuple(m.shape) for r, m in maps.items()} == {
        2: (1, 4, 4), 4: (1, 16, 16), 8: (1, 64, 64),
    }


#: Chunk sizes that split every layer's attention unevenly (a batch of 2, fp32): sd1 (2 heads) one
#: head and 10 queries a chunk at 16 x 16 (256 = 25 x 10 + 6) and 40 at 8 x 8 (64 = 40 + 24);
#: sdxl (4 heads) 12 queries at 8 x 8 (64 = 5 x 12 + 4) and 3 heads of 4 at 4 x 4. (3 queries a
#: chunk at 16 x 16 made the same kinds of split, in three times as many chunks.)
SPLITTING_CHUNK_BYTES = {"sd1": 2 * 4 * 256 * 10, "sdxl": 2 * 4 * 256 * 3}


@pytest.mark.parametrize("variant", VARIANTS)
def test_early_stop_and_chunking_do_not_change_the_maps(variant, extractors):
    ex = extractors[variant]
    pixels = ex.to_pixels(_images())
    maps = ex(pixels)
    chunk_bytes = ex._state.chunk_bytes
    try:
        ex.early_stop = False
        full = ex(pixels)
        ex._state.chunk_bytes = SPLITTING_CHUNK_BYTES[variant]
        chunked = ex(pixels)
    finally:
        ex.early_stop = True
        ex._state.chunk_bytes = chunk_bytes
    assert_same_attention(maps, full)
    assert_same_attention(chunked, maps)


def test_deterministic_and_batch_independent(model_paths, extractors):
    ex = extractors["sd1"]
    images = _images(3, seed=1)
    a, b = ex(images), ex(images)
    again = AttentionExtractor.from_pretrained(model_paths["sd1"])(images)
    single = ex(images[1:2])
    assert_same_attention(a, b)  # no noise, no sampling: the same maps up to float rounding
    assert_same_attention(a, again)
    for r in a:
        torch.testing.assert_close(single[r][0], a[r][1], atol=1e-5, rtol=0)


def test_odd_sizes_and_modes(extractors):
    ex = extractors["sd1"]
    rng = np.random.RandomState(2)
    gray = rng.randint(0, 256, (40, 30), dtype=np.uint8)
    images = [
        rng.randint(0, 256, (1, 1, 3), dtype=np.uint8),
        rng.randint(0, 256, (3, 700, 3), dtype=np.uint8),
        rng.randint(0, 256, (700, 3, 3), dtype=np.uint8),
        gray,  # grayscale (H, W)
        gray[:, :, None],  # grayscale (H, W, 1)
        rng.randint(0, 256, (31, 17, 2), dtype=np.uint8),  # grey + alpha
        rng.randint(0, 256, (64, 64, 4), dtype=np.uint8),  # RGBA
        Image.fromarray(rng.randint(0, 256, (20, 90), dtype=np.uint8), mode="L"),
    ]
    maps = ex(images)
    for r, m in maps.items():
        assert m.shape == (len(images), r * r, r * r)
        assert torch.isfinite(m).all()
        torch.testing.assert_close(m.sum(-1), torch.ones(len(images), r * r), atol=1e-5, rtol=0)
    # grayscale as (H, W) and (H, W, 1) and as a 3-channel copy are the same image
    for r, m in maps.items():
        torch.testing.assert_close(m[3], m[4], atol=1e-6, rtol=0)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    for r, m in ex([rgb]).items():
        torch.testing.assert_close(m[0], maps[r][3], atol=1e-6, rtol=0)


def test_preprocess_is_pil_bicubic_to_minus_one_one():
    img = np.random.RandomState(3).randint(0, 256, (37, 53, 4), dtype=np.uint8)
    x = preprocess_images([img], 64)
    expected = np.array(Image.fromarray(img).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC))
    expected = torch.from_numpy(expected).permute(2, 0, 1).float() / 127.5 - 1
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], expected, atol=1e-6, rtol=0)
    assert x.min() >= -1 and x.max() <= 1


def test_float_tensor_input_is_used_as_given(extractors):
    ex = extractors["sd1"]
    images = _images(2, seed=4)
    pixels = preprocess_images(images, 128)
    assert_same_attention(ex(images), ex(pixels))
    with pytest.raises(ValueError, match=r"\(B, 3, S, S\)"):
        ex(torch.zeros(1, 3, 128, 64))


def test_bad_pixels_are_clear_errors(extractors):
    ex = extractors["sd1"]
    with pytest.raises(TypeError, match="uint8"):
        ex([np.zeros((8, 8, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="empty image"):
        ex([np.zeros((0, 8, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="no images"):
        ex([])


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_info(variant, model_paths, extractors):
    info = extractors[variant].model_info
    assert info["model"] == str(model_paths[variant])
    assert info["resolved"] == str(model_paths[variant].resolve())
    assert info["architecture"] == ("sdxl" if variant == "sdxl" else "sd")
    assert info["dtype"] == "float32" and info["timestep"] == 300 and info["image_size"] == 128
    assert "unet/diffusion_pytorch_model.safetensors" in info["weights_sha256"]
    assert all(len(h) == 64 for h in info["weights_sha256"].values())
    assert extractors[variant].device == torch.device("cpu")
    assert extractors[variant].dtype == torch.float32


def test_timestep_changes_the_maps(model_paths, extractors):
    images = _images(1)
    a = extractors["sd1"](images)
    b = AttentionExtractor.from_pretrained(model_paths["sd1"], timestep=900)(images)
    assert b.keys() == a.keys()
    assert float((a[16] - b[16]).abs().max()) > 100 * ATTENTION["atol"]  # a real change, not rounding


# ----------------------------------------------------------------------------- loading errors


def test_missing_model_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model.*no such file or folder"):
        AttentionExtractor.from_pretrained(missing)
    with pytest.raises(OSError, match="not-a-user/not-a-model.*Hugging Face cache"):
        AttentionExtractor.from_pretrained("not-a-user/not-a-model")


def test_folder_without_unet_is_a_clear_error(tmp_path, tiny_model_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_path, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelLoadError, match=r"broken.*no 'unet' subfolder"):
        AttentionExtractor.from_pretrained(broken)


def test_pickle_only_weights_need_the_flag(tmp_path, tiny_model_path):
    from diffusers import UNet2DConditionModel

    bin_only = tmp_path / "bin-only"
    shutil.copytree(tiny_model_path, bin_only)
    unet = UNet2DConditionModel.from_pretrained(bin_only, subfolder="unet")
    shutil.rmtree(bin_only / "unet")
    unet.save_pretrained(bin_only / "unet", safe_serialization=False)
    assert not list((bin_only / "unet").glob("*.safetensors"))
    with pytest.raises(ModelLoadError, match=r"'unet' has only pickle weights.*allow_unsafe_weights=True.*"
                                             r"--allow-unsafe-weights.*allow_unsafe_weights: true` under `model:`"):
        AttentionExtractor.from_pretrained(bin_only)
    ex = AttentionExtractor.from_pretrained(bin_only, allow_unsafe_weights=True)
    ref = AttentionExtractor.from_pretrained(tiny_model_path)
    # the same stored weights, bit for bit (data read from two files, not computed) ...
    got, want = ex.unet.state_dict(), ref.unet.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # ... give the same maps up to float rounding: the kernels may round the two copies
    # differently (other memory alignment; seen: up to 9e-8 apart)
    images = _images(1)
    assert_same_attention(ex(images), ref(images))


def test_single_file_errors(tmp_path):
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ModelLoadError, match="not a readable .safetensors file"):
        AttentionExtractor.from_pretrained(garbage)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelLoadError, match="pickle files.*allow_unsafe_weights=True.*--allow-unsafe-weights"):
        AttentionExtractor.from_pretrained(ckpt)


def test_bad_dtype_is_rejected(tiny_model_path):
    with pytest.raises(ValueError, match="unknown dtype"):
        AttentionExtractor.from_pretrained(tiny_model_path, dtype="fp8")
