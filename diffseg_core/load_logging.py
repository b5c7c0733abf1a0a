"""How much loading a model says: `quiet_loading` silences progress bars and diffseg's notes.

Torch-free: diffusers' and transformers' logging helpers are imported when a load is
quieted, so building tiny-random (`diffseg_core.tiny_model`) and loading a model
(`diffseg_core.model_loading`) share it without importing each other.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["quiet_loading"]

_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: tuple[int, list[tuple[Any, bool]]] | None = None


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Load without progress bars and without diffseg's own notes (e.g. "RANDOM weights").

    For model actors: the driver has already said what the model is, once; N actors
    repeating it (with a progress bar each) is noise in the run's output.  Safe to nest
    and to enter from several threads at once (an actor with concurrent calls, workers
    building tiny-random together): the first to enter saves the levels, the last to
    leave restores them, so no interleaving leaves the loggers silenced.
    """
    global _quiet_depth, _quiet_saved
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    ours = logging.getLogger("diffseg_core")
    with _quiet_lock:
        if _quiet_depth == 0:
            bars = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
            _quiet_saved = (ours.level, bars)
            ours.setLevel(logging.ERROR)
            for module, _ in bars:
                module.disable_progress_bar()
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_saved is not None:
                level, bars = _quiet_saved
                _quiet_saved = None
                ours.setLevel(level)
                for module, was_on in bars:
                    if was_on:
                        module.enable_progress_bar()
