"""`ModelLoadError`: a model could not be found or read (one sentence that names it).

Its own module so that what finds models (`model_check`, `tiny_model`) and what loads them
(`model_loading`) raise the same error without importing each other; those modules
re-export it.
"""
from __future__ import annotations

__all__ = ["ModelLoadError"]


class ModelLoadError(OSError):
    """A model could not be found or read; the message names the model and what is missing."""

    def __init__(self, model: str, what: str):
        self.model = model
        self.what = what
        super().__init__(f"Cannot load Stable Diffusion model {model!r}: {what}")

    def __reduce__(self):  # pickles (e.g. across Ray) with both of its arguments
        return type(self), (self.model, self.what)
