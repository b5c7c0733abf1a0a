"""The labeling job's one systemic error type, and the one-line form of an exception its sentences
quote (their own module, so every part of the job can use them without importing the run)."""
from __future__ import annotations


class LabelError(RuntimeError):
    """A systemic failure: the run cannot start or cannot finish. The message is one sentence."""


def one_line(exc: BaseException) -> str:
    """An exception's text on one line, cut at 400 characters (it goes into a sentence)."""
    text = " ".join(str(exc).split())
    return text if len(text) < 400 else text[:400] + "..."
