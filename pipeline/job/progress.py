"""This run's progress on stderr: one bar refreshed in place on a terminal, a plain line every N s off one.

The count is the driver's: the rows the writers reported to the committer so far
(``Committer.rows_in``), out of the rows it expects (``Committer.expected_rows``: exact once
every shard's size is known, an estimate before, shown as ``~N``). The driver loop hands its
batches through :func:`show_progress` (one line in ``drive``); a thread redraws the bar
twice a second, or writes a line every ``every_s`` seconds, so the display moves on while
the loop waits for a slow batch. Only in a labelling command (pipeline/console.py); a
library call shows nothing.

The rate is the steady one, from the first rows in (model start-up left out), and the ETA
is what is left at that rate.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable, Iterator, TextIO

from tqdm import tqdm

from pipeline.console import current, quiet_ray_data

__all__ = ["ProgressReporter", "show_progress", "BAR_REFRESH_S"]

BAR_REFRESH_S = 0.5  # a terminal's bar is redrawn this often
Source = Callable[[], "tuple[int, int | None, bool]"]  # -> (rows done, rows expected or None, exact)


def show_progress(dataset: Any, committer: Any, **iter_batches: Any) -> Iterator[Any]:
    """``dataset.iter_batches(**iter_batches)``, with Ray Data quiet and this run's progress shown
    meanwhile (in a labelling command; see the module doc). The display ends with the stream, or
    when the loop stops early (the generator is closed)."""
    console = current()
    if console is None or (console.verbose and _is_terminal(sys.stderr)):  # verbose: Ray's bars own a terminal
        yield from dataset.iter_batches(**iter_batches)
        return

    def source() -> tuple[int, int | None, bool]:
        total, exact = committer.expected_rows()
        return committer.rows_in, total, exact

    reporter = ProgressReporter(source, every_s=console.every_s)
    with quiet_ray_data(dataset), reporter:  # before the first batch is asked for: execution starts then
        yield from dataset.iter_batches(**iter_batches)
        reporter.finished()


class ProgressReporter:
    """Shows ``source()``'s (done, total, exact) on ``stream`` while it runs (a context manager).

    ``bar``: a bar refreshed in place (None: when ``stream`` is a terminal); else a plain line
    every ``every_s`` seconds. ``clock`` gives seconds (tests pass their own).
    """

    def __init__(self, source: Source, stream: TextIO | None = None, every_s: float = 30.0,
                 bar: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self.source = source
        self.stream = stream
        self.every_s = float(every_s)
        self.bar = bar
        self.clock = clock
        self._started = clock()
        self._first: tuple[float, int] | None = None  # when rows were first seen, and how many
        self._width = 0  # the bar's last length, to blank what a shorter redraw leaves
        self._line = ""  # the bar as last drawn
        self._final = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "ProgressReporter":
        if self.stream is None:
            self.stream = sys.stderr
        if self.bar is None:
            self.bar = _is_terminal(self.stream)
        self._started = self.clock()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="diffseg-progress")
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.bar and self._width:
            self.refresh()  # the last count, then the bar stays above what comes next
            self._write("\n")

    def finished(self) -> None:
        """The stream ended: every row is in, the count is the total (an estimate becomes exact)."""
        self._final = True

    def _loop(self) -> None:
        period = BAR_REFRESH_S if self.bar else self.every_s
        while not self._stop.wait(period):
            self.refresh()

    # ------------------------------------------------------------------ drawing
    def refresh(self) -> None:
        """Draw the bar again (terminal) or write one line (off a terminal) with the counts now."""
        done, total, exact = self.source()
        if self._final:
            total, exact = done, True
        now = self.clock()
        if self._first is None and done > 0:
            self._first = (now, done)
        rate = self._rate(done, now)
        left = (max(total - done, 0) / rate) if (rate and total is not None) else None
        if self.bar:
            line = self._bar_line(done, total, exact, rate, left)
            if line != self._line:  # an unchanged bar is not drawn again
                self._write("\r" + line.ljust(self._width))
                self._width, self._line = len(line), line
        else:
            self._write(plain_line(done, total, exact, rate, left, now - self._started) + "\n")

    def _rate(self, done: int, now: float) -> float | None:
        """Rows/s since the first rows came in; before two counts apart, since the start."""
        if self._first is not None and now > self._first[0] and done > self._first[1]:
            return (done - self._first[1]) / (now - self._first[0])
        if done > 0 and now > self._started:
            return done / (now - self._started)
        return None

    def _bar_line(self, done: int, total: int | None, exact: bool, rate: float | None, left: float | None) -> str:
        text = (f"diffseg: {done}/{_total(total, exact)} images |{{bar}}| {_rate_text(rate)} images/s, "
                f"ETA {_eta(left)}")
        return tqdm.format_meter(min(done, total) if total else done, total or None, self.clock() - self._started,
                                 ncols=_columns(self.stream), bar_format=text)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: progress is not worth a failed run
            pass


def plain_line(done: int, total: int | None, exact: bool, rate: float | None, left: float | None,
               elapsed: float) -> str:
    """The off-terminal line: ``diffseg: progress at 05:00: 120 of ~4000 images (3%), 1.2 images/s, ETA 54:00``."""
    head = f"diffseg: progress at {tqdm.format_interval(elapsed)}: "
    if total is None:
        return head + f"{done} images so far (the total is known once a shard reports)"
    share = f" ({100 * done / total:.0f}%)" if total else ""
    return head + (f"{done} of {_total(total, exact)} images{share}, {_rate_text(rate)} images/s, "
                   f"ETA {_eta(left)}")


def _total(total: int | None, exact: bool) -> str:
    return "?" if total is None else (str(total) if exact else f"~{total}")


def _rate_text(rate: float | None) -> str:
    if rate is None:
        return "?"
    return f"{rate:.3g}" if rate < 100 else f"{rate:.0f}"


def _eta(left: float | None) -> str:
    return "?" if left is None else tqdm.format_interval(left)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 100
