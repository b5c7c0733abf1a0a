"""The labeling job's one systemic error type (its own module, so every part of the job can raise it)."""
from __future__ import annotations


class LabelError(RuntimeError):
    """A systemic failure: the run cannot start or cannot finish. The message is one sentence."""
