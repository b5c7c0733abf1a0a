"""Class vocabularies for naming segments, and their encoding by the model's text encoder.

A vocabulary is an ordered list of class names ("person", "traffic light", ...).
It is checked without a model (`Vocabulary`: empty, duplicate, too many names;
presets ``coco-stuff-27`` and ``cityscapes``) and encoded once per model
(`encode_vocabulary`):

* the names are packed, in order, into prompts of at most the tokenizer's length
  (``<bos> name, name, ... <eos> <pad>...``); a vocabulary that does not fit one
  prompt is split over several, never splitting one name's tokens;
* each prompt goes through the text encoder(s) exactly as the empty prompt the
  UNet is conditioned on (SD 1.x: the last hidden state; SDXL family: both
  encoders' penultimate states, concatenated);
* a class's embedding is the mean of its tokens' hidden states (one vector per
  class, however many tokens its name has).

The result, (C, D) vectors in the UNet's cross-attention space, is what the
cross-attention probe (`diffseg_core.class_probe`) puts through each ``attn2``
layer's ``to_k``.  The tokenizer and text encoder are passed in; torch is
imported only to encode, so checking a vocabulary (and the voting parameters,
`check_voting`) costs no torch import.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "DEFAULT_CLASS_THRESHOLD",
    "PRESETS",
    "MAX_CLASSES",
    "VOTING",
    "check_voting",
    "EncodedVocabulary",
    "Vocabulary",
    "VocabularyError",
    "check_vocabulary",
    "encode_vocabulary",
    "pack_prompts",
]

#: Class maps are 8-bit PNGs and 255 means "unknown".
MAX_CLASSES = 255
#: How a segment's class is chosen from its pixels' votes (diffseg_core.class_vote).
VOTING = ("majority", "mean")
#: At least half of a segment's pixels must agree on its class, or it is unknown.
DEFAULT_CLASS_THRESHOLD = 0.5

# COCO-Stuff-27 in STEGO's coarse-class order (things 0..11, stuff 12..26), the order
# `diffseg eval --format coco-stuff-27` scores in: class i of the preset is coarse class i.
# The names are the coarse classes (COCO supercategories) said as a prompt would say them.
_COCO_STUFF_27 = (
    "electronic device", "appliance", "food", "furniture", "indoor object", "kitchenware",
    "accessory", "animal", "outdoor object", "person", "sports equipment", "vehicle",
    "ceiling", "floor", "fruit and vegetables", "cabinet", "raw material", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "rock", "fence", "water",
)
# Cityscapes label ids 7..33 in order (`diffseg eval --format cityscapes`): class i is id 7 + i.
_CITYSCAPES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
    "tunnel", "pole", "pole group", "traffic light", "traffic sign", "vegetation", "terrain", "sky",
    "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)
PRESETS: dict[str, tuple[str, ...]] = {"coco-stuff-27": _COCO_STUFF_27, "cityscapes": _CITYSCAPES}


class VocabularyError(ValueError):
    """A vocabulary that cannot be used; the message is one sentence saying why."""


def check_voting(voting: str, threshold: float) -> None:
    """Raise ValueError for a voting rule or threshold no run can use."""
    if voting not in VOTING:
        raise ValueError(f"class voting must be one of {', '.join(VOTING)}, not {voting!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"the class threshold is a share of a segment's pixels, in [0, 1], not {threshold!r}")


def _key(name: str) -> str:
    """What two names must differ in: CLIP tokenizers lower-case and collapse spaces."""
    return " ".join(name.split()).lower()


@dataclass(frozen=True)
class Vocabulary:
    """An ordered, checked list of class names (index i = class i of the class maps).

    Build with `Vocabulary.parse` (a preset name, a comma-separated string or a
    list of names) or `Vocabulary.from_lines` (the text of a vocabulary file).
    """

    names: tuple[str, ...]
    preset: str | None = None

    def __post_init__(self) -> None:
        names = tuple(" ".join(str(n).split()) for n in self.names)
        object.__setattr__(self, "names", names)
        if not names:
            raise VocabularyError("the vocabulary is empty: give at least two class names")
        for i, name in enumerate(names):
            if not name:
                raise VocabularyError(f"class {i + 1} of the vocabulary is an empty name")
        seen: dict[str, str] = {}
        for name in names:
            if _key(name) in seen:
                raise VocabularyError(
                    f"the vocabulary names {seen[_key(name)]!r} and {name!r}, the same class "
                    "(names are compared ignoring case and spaces)"
                )
            seen[_key(name)] = name
        if len(names) < 2:
            raise VocabularyError(
                f"a vocabulary needs at least two class names (got only {names[0]!r}; "
                f"a single name must be a preset: {', '.join(PRESETS)})"
            )
        if len(names) > MAX_CLASSES:
            raise VocabularyError(
                f"the vocabulary has {len(names)} classes; at most {MAX_CLASSES} fit an 8-bit class map"
            )

    @classmethod
    def parse(cls, spec: "str | Sequence[str] | Vocabulary") -> "Vocabulary":
        """A preset name (``"coco-stuff-27"``, ``"cityscapes"``), ``"person,dog,grass"``, or a list of names."""
        if isinstance(spec, Vocabulary):
            return spec
        if isinstance(spec, str):
            text = spec.strip()
            if "," not in text:
                if text in PRESETS:
                    return cls(PRESETS[text], preset=text)
                if not text:
                    raise VocabularyError("the vocabulary is empty: give at least two class names")
                raise VocabularyError(
                    f"unknown vocabulary preset {text!r} (presets: {', '.join(PRESETS)}); "
                    "a vocabulary of your own lists at least two names separated by commas"
                )
            return cls(tuple(text.split(",")))
        if isinstance(spec, Iterable):
            names = list(spec)
            if not all(isinstance(n, str) for n in names):
                raise VocabularyError("vocabulary names must be strings")
            return cls(tuple(names))
        raise VocabularyError(f"a vocabulary is a preset name, a comma-separated string or a list, not {type(spec).__name__}")

    @classmethod
    def from_lines(cls, text: str) -> "Vocabulary":
        """The text of a vocabulary file: one class a line; blank lines and ``#`` comments skipped."""
        names = []
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                names.append(line)
        return cls(tuple(names))

    @property
    def sha256(self) -> str:
        """Hash of the names in order: two runs name classes alike exactly when it matches."""
        return hashlib.sha256(json.dumps(list(self.names), ensure_ascii=False).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        """What a manifest records."""
        out: dict[str, Any] = {"names": list(self.names), "sha256": self.sha256}
        if self.preset:
            out["preset"] = self.preset
        return out

    def __len__(self) -> int:
        return len(self.names)


# ----------------------------------------------------------------------------- prompts


@dataclass
class PromptLayout:
    """Where each class's tokens sit: ``spans[c] = (prompt, start, stop)`` (token positions, BOS = 0)."""

    prompts: list[list[int]]  # content token ids of each prompt (no BOS/EOS/padding)
    spans: list[tuple[int, int, int]]


def pack_prompts(class_tokens: Sequence[Sequence[int]], max_content: int, separator: Sequence[int] = ()) -> PromptLayout:
    """Pack classes, in order, into prompts of at most ``max_content`` tokens (BOS/EOS excluded).

    Classes are separated by ``separator`` (e.g. the tokens of ","); a class's
    tokens are never split between prompts.  Raises VocabularyError for a class
    longer than one prompt.
    """
    prompts: list[list[int]] = [[]]
    spans: list[tuple[int, int, int]] = []
    for c, tokens in enumerate(class_tokens):
        tokens = list(tokens)
        if len(tokens) > max_content:
            raise VocabularyError(f"class {c + 1} has {len(tokens)} tokens, more than one prompt holds ({max_content})")
        current = prompts[-1]
        sep = list(separator) if current else []
        if len(current) + len(sep) + len(tokens) > max_content:
            prompts.append([])
            current, sep = prompts[-1], []
        current.extend(sep)
        start = 1 + len(current)  # position 0 is BOS
        current.extend(tokens)
        spans.append((len(prompts) - 1, start, start + len(tokens)))
    return PromptLayout(prompts=prompts, spans=spans)


# ----------------------------------------------------------------------------- encoding


@dataclass
class EncodedVocabulary:
    """A vocabulary in the UNet's cross-attention space.

    ``embeddings``: float32 (C, D) on CPU, the mean of each class's token hidden
    states; ``prompts``: the prompts' text as the tokenizer reads it back;
    ``spans``: each class's (prompt, start, stop) token positions.
    """

    vocabulary: Vocabulary
    embeddings: torch.Tensor
    prompts: list[str] = field(default_factory=list)
    spans: list[tuple[int, int, int]] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)

    @property
    def names(self) -> tuple[str, ...]:
        return self.vocabulary.names


#: (tokenizer, text encoder) pairs -> hidden states (P, L, D) of the given token id rows.
EncodeIds = Callable[[list["torch.Tensor"]], "torch.Tensor"]


def class_token_ids(tokenizer: Any, vocabulary: Vocabulary) -> list[list[int]]:
    """Each name's token ids, without BOS/EOS. Raises VocabularyError for names the tokenizer
    cannot tell apart or does not know at all."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out: list[list[int]] = []
    first_with: dict[tuple[int, ...], str] = {}
    for name in vocabulary.names:
        ids = list(tokenizer(name, add_special_tokens=False, verbose=False).input_ids)  # long: our error
        if not ids or all(i == unk for i in ids):
            raise VocabularyError(f"class {name!r} has no token this model's tokenizer knows")
        key = tuple(ids)
        if key in first_with:
            raise VocabularyError(
                f"classes {first_with[key]!r} and {name!r} are the same tokens to this model's tokenizer"
            )
        first_with[key] = name
        out.append(ids)
    return out


def separator_ids(tokenizer: Any) -> list[int]:
    """The tokens of "," between class names, or none when the tokenizer does not know ","."""
    ids = list(tokenizer(",", add_special_tokens=False).input_ids)
    unk = getattr(tokenizer, "unk_token_id", None)
    return [] if not ids or unk in ids else ids


def prompt_layout(tokenizer: Any, vocabulary: Vocabulary) -> PromptLayout:
    """How `encode_vocabulary` packs ``vocabulary`` for this tokenizer; raises VocabularyError
    for a name longer than one prompt or names the tokenizer cannot tell apart.  Needs only
    the tokenizer: the cheap check to run before any work."""
    tokens = class_token_ids(tokenizer, vocabulary)
    max_content = int(tokenizer.model_max_length) - 2  # BOS and EOS
    for name, ids in zip(vocabulary.names, tokens):
        if len(ids) > max_content:
            raise VocabularyError(
                f"class {name!r} is {len(ids)} tokens long, more than one prompt of this model holds ({max_content})"
            )
    return pack_prompts(tokens, max_content, separator_ids(tokenizer))


def prompt_ids(tokenizer: Any, content: Sequence[int]) -> torch.Tensor:
    """(1, model_max_length) ids: BOS, the content, EOS, padding (as the SD pipelines pad)."""
    import torch

    length = int(tokenizer.model_max_length)
    ids = [tokenizer.bos_token_id, *content, tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (length - len(ids))
    return torch.tensor([ids], dtype=torch.long)


def check_vocabulary(vocabulary: Vocabulary, tokenizers: Sequence[Any]) -> PromptLayout:
    """The prompt layout for these tokenizer(s), or VocabularyError: a name longer than one
    prompt, names a tokenizer cannot tell apart or does not know, tokenizers that disagree.
    Needs only the tokenizers (see ``model_loading.load_tokenizers``): the check before any work."""
    layout = prompt_layout(tokenizers[0], vocabulary)
    lengths = [stop - start for _, start, stop in layout.spans]
    for tokenizer in tokenizers[1:]:
        if [len(t) for t in class_token_ids(tokenizer, vocabulary)] != lengths or len(
            separator_ids(tokenizer)
        ) != len(separator_ids(tokenizers[0])):
            raise VocabularyError("the model's tokenizers split the class names differently")
    return layout


def encode_vocabulary(
    vocabulary: Vocabulary, tokenizers: Sequence[Any], encode_ids: EncodeIds
) -> EncodedVocabulary:
    """Encode ``vocabulary`` with the model's tokenizer(s) and text encoder(s).

    ``tokenizers``: one per text encoder (SDXL: two); the first decides the
    packing, the others must split every name into as many tokens.
    ``encode_ids(rows)``: given one (P, L) id tensor per tokenizer, the hidden
    states (P, L, D) the UNet would be conditioned on (see
    ``model_loading.encode_token_ids``).
    """
    import torch

    layout = check_vocabulary(vocabulary, tokenizers)
    lengths = [stop - start for _, start, stop in layout.spans]
    rows = []
    for tokenizer in tokenizers:
        tokens = class_token_ids(tokenizer, vocabulary)
        sep = separator_ids(tokenizer)
        content = [[] for _ in layout.prompts]
        for (p, _, _), ids in zip(layout.spans, tokens):
            content[p].extend((sep if content[p] else []) + ids)
        rows.append(torch.cat([prompt_ids(tokenizer, c) for c in content]))
    hidden = encode_ids(rows).float()  # (P, L, D)
    embeddings = torch.stack([hidden[p, start:stop].mean(0) for p, start, stop in layout.spans])
    text = [tokenizers[0].decode(r, skip_special_tokens=True) for r in layout.prompts]
    return EncodedVocabulary(
        vocabulary=vocabulary, embeddings=embeddings.contiguous(), prompts=text, spans=list(layout.spans),
        token_counts=lengths,
    )
