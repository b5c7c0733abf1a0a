"""What a command shows on stderr while it labels: our own progress, and Ray's output only with --verbose.

A labelling command (``diffseg label``, the job entrypoint ``python -m jobs.run``) runs inside
:func:`command_console`. Inside it, by default, Ray's console output is turned down with Ray's
own switches, never by filtering its text:

* the driver's ``ray`` logger runs at WARNING (``ray.init(logging_level=...)``: no "Started a
  local Ray instance" INFO line; pipeline/ray_connect.py asks :func:`ray_logging_level`);
* Ray Data's progress is off for our dataset (its ``DataContext.enable_progress_bars``: no
  progress bars on a terminal, no 10-line progress block every 10 s off one), and the
  ``ray.data`` logger's console handler shows WARNING and up (its log file under the Ray
  session's ``logs/ray-data/`` still gets everything): :func:`quiet_ray_data`.

In their place pipeline/job/progress.py shows one progress bar on a terminal, or a plain
line every ``every_s`` seconds off one (CI, ``nohup``, job logs).

With ``verbose`` Ray speaks as it would on its own (its progress, its INFO lines); our bar
then stays off a terminal (Ray's bars own it), our plain lines stay off one.

Outside a command (``pipeline.label`` called from Python) nothing here changes Ray's output.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

__all__ = ["Console", "command_console", "current", "plain_every_s", "quiet_ray_data", "ray_logging_level",
           "PLAIN_EVERY_S", "EVERY_ENV"]

PLAIN_EVERY_S = 30.0  # off a terminal: a progress line this often
EVERY_ENV = "DIFFSEG_PROGRESS_EVERY_S"  # overrides PLAIN_EVERY_S (e.g. 300 for long jobs' logs)
# Ray Data's module that says how it shows progress (and, with progress off, that it is off)
_RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"


@dataclass(frozen=True)
class Console:
    """This command's console: ``verbose`` lets Ray speak; ``every_s`` paces the off-terminal lines."""

    verbose: bool = False
    every_s: float = PLAIN_EVERY_S


_current: list[Console] = []


def current() -> Console | None:
    """The console of the command running now, or None (a library call: Ray is left as it is)."""
    return _current[-1] if _current else None


def plain_every_s(environ: Any = None) -> float:
    """Seconds between progress lines off a terminal: ``$DIFFSEG_PROGRESS_EVERY_S`` or 30.

    ValueError (one sentence) for a value that is not a number of seconds > 0."""
    text = (os.environ if environ is None else environ).get(EVERY_ENV, "").strip()
    if not text:
        return PLAIN_EVERY_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{EVERY_ENV} must be a number of seconds > 0 (e.g. 30), not {text!r}.")
    return value


@contextmanager
def command_console(verbose: bool = False, every_s: float | None = None) -> Iterator[Console]:
    """For the length of one command: Ray quiet unless ``verbose``, our progress on stderr."""
    console = Console(verbose=bool(verbose), every_s=plain_every_s() if every_s is None else float(every_s))
    _current.append(console)
    try:
        yield console
    finally:
        _current.remove(console)


def ray_logging_level() -> int | None:
    """What ``ray.init`` gets as ``logging_level`` in this command (None: Ray's default, INFO)."""
    console = current()
    return logging.WARNING if console is not None and not console.verbose else None


@contextmanager
def quiet_ray_data(dataset: Any) -> Iterator[None]:
    """While ``dataset`` runs in a quiet command: Ray Data's progress off, its INFO lines only in its log file.

    Ray Data reads ``enable_progress_bars`` from the dataset's own context (copied when the
    dataset was made) as its execution starts, so this must be entered before the first batch
    is asked for. Its handler levels and logger are put back afterwards.
    """
    console = current()
    if console is None or console.verbose:
        yield
        return
    context = dataset.context
    saved_bars = context.enable_progress_bars
    context.enable_progress_bars = False
    handlers = [h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console"]
    saved_levels = [h.level for h in handlers]
    for handler in handlers:
        handler.setLevel(max(handler.level, logging.WARNING))
    progress_logger = logging.getLogger(_RAY_DATA_PROGRESS_LOGGER)
    saved_progress_level = progress_logger.level
    progress_logger.setLevel(logging.ERROR)  # its one WARNING says that progress bars are off: we turned them off
    try:
        yield
    finally:
        context.enable_progress_bars = saved_bars
        for handler, level in zip(handlers, saved_levels):
            handler.setLevel(level)
        progress_logger.setLevel(saved_progress_level)
