"""The vocabulary options of a labeling run: read, judged, and recorded.

``--vocabulary "person,dog,grass"`` (or a preset, ``coco-stuff-27`` /
``cityscapes``) and ``--vocabulary-file classes.txt`` (any fsspec URL; one
class a line, ``#`` comments) become one `Vocabulary`. Every check that needs
no model runs before any work (empty, duplicate names, an unknown preset, a
missing file, two sources at once); the one that needs the model's tokenizer (a
name longer than one prompt, names it cannot tell apart) loads the tokenizer
alone, also before any work. The mechanism itself is ``diffseg_core.vocabulary``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from diffseg_core.vocabulary import Vocabulary, VocabularyError, check_voting

if TYPE_CHECKING:  # pragma: no cover
    from diffseg_core.model_check import ModelCheck

__all__ = ["read_vocabulary", "check_against_model", "vocabulary_parameters"]


def read_vocabulary(
    vocabulary: str | Sequence[str] | None,
    vocabulary_file: str | None,
    storage_options: dict[str, Any] | None = None,
) -> Vocabulary | None:
    """The run's vocabulary, or None without one. Raises ValueError (one sentence) when unusable."""
    if vocabulary is not None and vocabulary_file is not None:
        raise ValueError("give --vocabulary or --vocabulary-file, not both")
    if vocabulary_file is not None:
        from pipeline.data.sources import open_fs

        try:
            fs, path = open_fs(vocabulary_file, storage_options)
            with fs.open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except FileNotFoundError:
            raise ValueError(f"vocabulary file {vocabulary_file!r} does not exist") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"cannot read vocabulary file {vocabulary_file!r}: {type(exc).__name__}: {exc}") from None
        try:
            return Vocabulary.from_lines(text)
        except VocabularyError as exc:
            raise ValueError(f"vocabulary file {vocabulary_file!r}: {exc}") from None
    if vocabulary is None:
        return None
    return Vocabulary.parse(vocabulary)


def check_against_model(vocab: Vocabulary, model: "ModelCheck") -> None:
    """Judge the vocabulary with the checked model's tokenizer(s) alone (no weights, no torch):
    ValueError when a name does not fit one prompt or two names are the same tokens;
    `ModelLoadError` when a tokenizer cannot be read. A single-file checkpoint holds no
    tokenizer: its vocabulary is judged when it loads."""
    from diffseg_core.model_check import load_tokenizers
    from diffseg_core.vocabulary import check_vocabulary

    tokenizers = load_tokenizers(model)
    if tokenizers:
        check_vocabulary(vocab, tokenizers)


def vocabulary_parameters(vocab: Vocabulary | None, voting: str, threshold: float) -> dict[str, Any]:
    """What a run with this vocabulary records among its label parameters: nothing without one,
    so outputs made without a vocabulary stay resumable."""
    if vocab is None:
        return {}
    check_voting(voting, threshold)
    return {"vocabulary_sha256": vocab.sha256, "class_voting": voting, "class_threshold": float(threshold)}
