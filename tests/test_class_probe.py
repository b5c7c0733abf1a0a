"""The vocabulary probe inside the UNet pass, on tiny SD1- and SDXL-shaped models (RANDOM weights).

The reference is independent of the probe: diffusers' own pipeline (its VAE,
its ``encode_prompt``, its time ids, its default attention processors) with
forward pre-hooks on every ``attn2`` layer that recompute
softmax(Q K_vocab^T / sqrt(d)) from the layer's own ``to_q`` on the layer's
input and its own ``to_k`` on the encoded vocabulary.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffseg_core.extract import AttentionExtractor
from tests.reference_unet import head_mean_softmax, run_unet_with_hooks

VARIANTS = ["sd1", "sdxl"]
VOCAB = "person,dog,grass field,sky,cat"


@pytest.fixture(scope="module")
def model_paths(tiny_model_path, tiny_sdxl_model_path):
    return {"sd1": tiny_model_path, "sdxl": tiny_sdxl_model_path}


@pytest.fixture(scope="module")
def probing(model_paths):
    return {v: AttentionExtractor.from_pretrained(model_paths[v], vocabulary=VOCAB) for v in VARIANTS}


@pytest.fixture(scope="module")
def plain(model_paths):
    return {v: AttentionExtractor.from_pretrained(model_paths[v]) for v in VARIANTS}


def _images(n=2, size=64, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3), dtype=np.uint8)


def _reference_probe(path, variant: str, pixels: torch.Tensor, vocabulary: torch.Tensor, timestep: int = 300):
    """Per-layer head-mean softmax(Q K_vocab^T / sqrt(d)) of every attn2 layer, via diffusers' pipeline."""
    ref: dict[str, torch.Tensor] = {}

    def hook(name, module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        assert kwargs.get("encoder_hidden_states") is not None  # a real cross-attention call
        ref[name] = head_mean_softmax(module, h, vocabulary[None])

    run_unet_with_hooks(path, variant, pixels, "attn2", hook, timestep)
    return ref


@pytest.mark.parametrize("variant", VARIANTS)
def test_probe_equals_independent_softmax_for_every_attn2_layer(variant, model_paths, probing):
    ex = probing[variant]
    pixels = ex.to_pixels(_images())
    ref = _reference_probe(model_paths[variant], variant, pixels, ex.vocabulary.embeddings)
    ex.keep_layers = True
    try:
        result = ex.extract(pixels)
        layers = ex.last_layers
    finally:
        ex.keep_layers = False

    assert set(ref) == set(ex.probe_layer_names)
    by_res: dict[int, list[torch.Tensor]] = {}
    for name, expected in ref.items():
        assert expected.shape[-1] == 5  # one map per class, multi-token names included
        torch.testing.assert_close(layers[name], expected, atol=1e-5, rtol=0)
        by_res.setdefault(math.isqrt(expected.shape[1]), []).append(expected)
    assert sorted(result.class_attention) == sorted(by_res)
    for r, group in by_res.items():
        got = result.class_attention[r]
        assert got.shape == (2, r * r, 5) and got.dtype == torch.float32
        torch.testing.assert_close(got, torch.stack(group).mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(got.sum(-1), torch.ones(2, r * r), atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_self_attention_is_bit_identical_with_and_without_a_vocabulary(variant, probing, plain):
    # Exact, not approximately equal: every attn2 layer's output is computed by the very same
    # processor call (diffusers' AttnProcessor2_0 on the empty prompt) with or without the probe,
    # and the attn1 capture code is the same, so the same operations run on the same numbers.
    images = _images(3, seed=5)
    without = plain[variant](images)
    with_vocab = probing[variant].extract(images)
    assert with_vocab.class_attention is not None
    assert sorted(with_vocab.self_attention) == sorted(without)
    for r in without:
        assert torch.equal(with_vocab.self_attention[r], without[r])
    # and a plain call on the probing extractor skips the probe altogether
    again = probing[variant](images)
    for r in without:
        assert torch.equal(again[r], without[r])


def test_a_vocabulary_split_over_prompts_keeps_its_order(model_paths):
    # 11 names of 7 letter-tokens do not fit one prompt of 75 tokens: 10 in the first, 1 in the second
    names = [letter * 7 for letter in "abcdefghijk"]
    ex = AttentionExtractor.from_pretrained(model_paths["sd1"], vocabulary=names)
    assert [p for p, _, _ in ex.vocabulary.spans] == [0] * 10 + [1]
    pixels = ex.to_pixels(_images(1, seed=8))
    ref = _reference_probe(model_paths["sd1"], "sd1", pixels, ex.vocabulary.embeddings)
    ex.keep_layers = True
    result = ex.extract(pixels)
    for name, expected in ref.items():
        assert expected.shape[-1] == 11
        torch.testing.assert_close(ex.last_layers[name], expected, atol=1e-5, rtol=0)
    assert all(m.shape[-1] == 11 for m in result.class_attention.values())


def test_early_stop_after_the_last_attn2_does_not_change_the_probe(probing):
    ex = probing["sd1"]
    images = _images(2, seed=6)
    stopped = ex.extract(images)
    try:
        ex.early_stop = False
        full = ex.extract(images)
    finally:
        ex.early_stop = True
    for r in full.class_attention:
        assert torch.equal(stopped.class_attention[r], full.class_attention[r])
        assert torch.equal(stopped.self_attention[r], full.self_attention[r])


def test_chunked_heads_match(probing):
    ex = probing["sdxl"]
    images = _images(2, seed=7)
    whole = ex.extract(images).class_attention
    try:
        ex._probe.chunk_bytes = 1  # one head at a time
        chunked = ex.extract(images).class_attention
    finally:
        ex._probe.chunk_bytes = 256 * 1024 * 1024
    for r in whole:
        torch.testing.assert_close(chunked[r], whole[r], atol=1e-6, rtol=0)


def test_the_encoded_vocabulary_is_kept_and_model_info_stays_the_models(probing, plain):
    encoded = probing["sd1"].vocabulary
    assert encoded.names == ("person", "dog", "grass field", "sky", "cat")
    assert encoded.prompts == ["person dog grass field sky cat"]  # the tiny tokenizer has no ","
    # provenance is the model's alone, equal to what the driver derives from its configs
    assert probing["sd1"].model_info == plain["sd1"].model_info


def test_bad_vocabulary_fails_before_loading(tmp_path):
    from diffseg_core.vocabulary import VocabularyError

    # the model path does not exist: the vocabulary is judged first
    with pytest.raises(VocabularyError, match="unknown vocabulary preset"):
        AttentionExtractor.from_pretrained(tmp_path / "missing", vocabulary="coco-stuf-27")
