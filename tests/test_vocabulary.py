"""Vocabularies: parsing and checks without a model, packing into prompts, encoding.

The encoding reference is independent of our code: diffusers' own pipeline
``encode_prompt`` on the prompt text, averaged over each class's token positions.
The tiny models' tokenizer knows single letters, digits, "cat" and "dog" (no
punctuation), so class names are spelt letter by letter and no "," separates them.
"""
from __future__ import annotations

import pytest
import torch

from diffseg_core.vocabulary import (
    MAX_CLASSES,
    PRESETS,
    Vocabulary,
    VocabularyError,
    encode_vocabulary,
    pack_prompts,
    prompt_layout,
)


# ----------------------------------------------------------------------------- parsing


def test_parse_string_list_and_presets():
    v = Vocabulary.parse(" person, dog ,grass  field,sky")
    assert v.names == ("person", "dog", "grass field", "sky")
    assert Vocabulary.parse(["person", "dog"]).names == ("person", "dog")
    coco = Vocabulary.parse("coco-stuff-27")
    assert coco.preset == "coco-stuff-27" and len(coco) == 27 and coco.names == PRESETS["coco-stuff-27"]
    city = Vocabulary.parse("cityscapes")
    assert len(city) == 27 and city.names[0] == "road" and city.names[-1] == "bicycle"
    assert Vocabulary.parse(v) is v


def test_from_lines_skips_blanks_and_comments():
    text = "# my classes\nperson\n\n  traffic light  \n# end\ndog\n"
    assert Vocabulary.from_lines(text).names == ("person", "traffic light", "dog")


def test_hash_follows_names_and_order():
    a, b = Vocabulary.parse("dog,cat"), Vocabulary.parse(["dog", "cat"])
    assert a.sha256 == b.sha256 and len(a.sha256) == 64
    assert Vocabulary.parse("cat,dog").sha256 != a.sha256
    assert a.to_json() == {"names": ["dog", "cat"], "sha256": a.sha256}
    assert Vocabulary.parse("cityscapes").to_json()["preset"] == "cityscapes"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ([], "empty"),
        ("  ", "empty"),
        ("person,,dog", "class 2 of the vocabulary is an empty name"),
        ("dog,cat,Dog", "'dog' and 'Dog', the same class"),
        ("traffic light,traffic  light", "the same class"),
        ("coco-stuff-28", "unknown vocabulary preset 'coco-stuff-28'"),
        (["dog"], "at least two class names"),
        ([1, 2], "must be strings"),
        (",".join(f"c{i}" for i in range(MAX_CLASSES + 1)), "at most 255"),
    ],
)
def test_bad_vocabularies_are_one_sentence(spec, message):
    with pytest.raises(VocabularyError, match=message) as info:
        Vocabulary.parse(spec)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- packing


def test_pack_prompts_by_hand():
    # lengths 3, 2, 4 into prompts of 6 content tokens, separator [9]
    layout = pack_prompts([[1, 1, 1], [2, 2], [3, 3, 3, 3]], 6, separator=[9])
    assert layout.prompts == [[1, 1, 1, 9, 2, 2], [3, 3, 3, 3]]
    assert layout.spans == [(0, 1, 4), (0, 5, 7), (1, 1, 5)]  # BOS at 0
    # a class that exactly fills a prompt; no separator
    layout = pack_prompts([[1] * 6, [2]], 6)
    assert layout.prompts == [[1] * 6, [2]] and layout.spans == [(0, 1, 7), (1, 1, 2)]
    with pytest.raises(VocabularyError, match="class 2 has 7 tokens"):
        pack_prompts([[1], [2] * 7], 6)


# ----------------------------------------------------------------------------- with a tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tiny_model_path, subfolder="tokenizer")


def test_prompt_layout_errors_need_only_the_tokenizer(tokenizer):
    with pytest.raises(VocabularyError, match=r"is 80 tokens long, more than one prompt of this model holds \(75\)"):
        prompt_layout(tokenizer, Vocabulary.parse(["dog", "x" * 80]))
    # the tiny tokenizer knows no punctuation: both names read as t <unk> shirt
    with pytest.raises(VocabularyError, match="'t-shirt' and 't/shirt' are the same tokens"):
        prompt_layout(tokenizer, Vocabulary.parse(["t-shirt", "t/shirt"]))
    with pytest.raises(VocabularyError, match="'---' has no token"):
        prompt_layout(tokenizer, Vocabulary.parse(["dog", "---"]))


def _reference_embeddings(pipe, variant, encoded):
    """Each class: the mean over its token positions of diffusers' encode_prompt(prompt text)."""
    rows = []
    for p, start, stop in encoded.spans:
        if variant == "sd1":
            emb, _ = pipe.encode_prompt(encoded.prompts[p], "cpu", 1, False)
        else:
            emb = pipe.encode_prompt(encoded.prompts[p], device="cpu", num_images_per_prompt=1,
                                     do_classifier_free_guidance=False)[0]
        rows.append(emb[0, start:stop].mean(0))
    return torch.stack(rows)


@pytest.mark.parametrize("variant", ["sd1", "sdxl"])
def test_encoding_matches_diffusers_encode_prompt(variant, tiny_model_path, tiny_sdxl_model_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from diffseg_core.model_loading import load_model

    path = tiny_model_path if variant == "sd1" else tiny_sdxl_model_path
    # multi-token names ("person" is 6 letter tokens, "grass field" 10) and single-token ones ("dog")
    vocab = Vocabulary.parse("person,dog,grass field,cat")
    encoded = load_model(path, vocabulary=vocab).vocabulary
    assert encoded.token_counts == [6, 1, 10, 1]
    assert encoded.spans == [(0, 1, 7), (0, 7, 8), (0, 8, 18), (0, 18, 19)]
    cls = StableDiffusionPipeline if variant == "sd1" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(path)
    with torch.no_grad():
        expected = _reference_embeddings(pipe, variant, encoded)
    width = 32 if variant == "sd1" else 64  # SDXL: both encoders' states, concatenated
    assert encoded.embeddings.shape == (4, width)
    torch.testing.assert_close(encoded.embeddings, expected, atol=1e-5, rtol=0)


def test_a_long_vocabulary_is_split_over_prompts_keeping_each_class_whole(tiny_model_path):
    from diffusers import StableDiffusionPipeline

    from diffseg_core.model_loading import load_model

    # 11 names of 7 letters (77 tokens) do not fit one prompt of 75: 10 in the first, 1 in the second
    names = [letter * 7 for letter in "abcdefghijk"]
    encoded = load_model(tiny_model_path, vocabulary=Vocabulary.parse(names)).vocabulary
    assert [p for p, _, _ in encoded.spans] == [0] * 10 + [1]
    assert encoded.spans[9] == (0, 64, 71) and encoded.spans[10] == (1, 1, 8)
    assert all(stop - start == 7 for _, start, stop in encoded.spans)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path)
    with torch.no_grad():
        expected = _reference_embeddings(pipe, "sd1", encoded)
    torch.testing.assert_close(encoded.embeddings, expected, atol=1e-5, rtol=0)
    # a class's embedding depends on the prompt up to it (causal text encoder): the name that
    # opens the second prompt is encoded as if it opened a vocabulary of its own
    alone = load_model(tiny_model_path, vocabulary=Vocabulary.parse([names[10], names[0]])).vocabulary
    torch.testing.assert_close(alone.embeddings[0], encoded.embeddings[10], atol=1e-5, rtol=0)


def test_tokenizers_alone_check_a_vocabulary(tiny_model_path, tiny_sdxl_model_path):
    from diffseg_core.model_check import ModelCheck, check_model, load_tokenizers
    from diffseg_core.vocabulary import check_vocabulary

    assert len(load_tokenizers(check_model(tiny_model_path))) == 1
    sdxl = load_tokenizers(check_model(tiny_sdxl_model_path))
    assert len(sdxl) == 2
    layout = check_vocabulary(Vocabulary.parse("person,dog"), sdxl)
    assert layout.spans == [(0, 1, 7), (0, 7, 8)]
    with pytest.raises(VocabularyError, match="more than one prompt"):
        check_vocabulary(Vocabulary.parse(["dog", "y" * 76]), sdxl)
    # a checkpoint holds no tokenizer: its vocabulary is judged when it loads
    assert load_tokenizers(ModelCheck(model="x.safetensors", resolved="x.safetensors", source="single_file")) == []
