"""Ctrl-C and SIGTERM (what Kubernetes, Slurm and ``ray job stop`` send) end a run cleanly.

While `stop_signals` is active, SIGINT and SIGTERM raise `RunInterrupted` in the main
thread, wherever the driver is (waiting for Ray, in the data loop): the run stops
taking rows, shards not yet committed are dropped (a rerun redoes them; committed
shards are kept), the manifest is written with status ``interrupted`` and the
command exits 130 (SIGINT) or 143 (SIGTERM) with one sentence that says how to
resume.

A block that must not be cut in the middle (e.g. a commit: rename parts, then
write the marker) runs inside ``stop.deferred()``: a signal that arrives there is
raised when the block ends. A second signal while the run is already stopping
ends the process at once with the same exit code.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from pipeline.job.stderr_filter import silence_ray

__all__ = ["RunInterrupted", "StopSignals", "stop_signals"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by a signal. A KeyboardInterrupt, so no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as shells report them
        self.committed: int | None = None  # filled in by label(): shards committed in the output
        self.total: int | None = None  # shards in the plan
        super().__init__(self.signal_name)


class StopSignals:
    """The installed handlers and their state; see the module docstring."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._depth = 0  # nesting of deferred() blocks
        self._pending: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """(Re)install the handlers: ``ray.init`` puts its own SIGTERM handler in place."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread; a library caller on another thread keeps its own
        for signum in _SIGNALS:
            current = signal.getsignal(signum)
            if current is not self._handle:
                self._previous.setdefault(signum, current)
                signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous.clear()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold a signal that arrives inside this block until the block ends."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._pending is not None:
                signum, self._pending = self._pending, None
                raise RunInterrupted(signum)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # the second signal: the user does not want to wait
            sys.stderr.write(f"\n{signal.Signals(signum).name} again: stopping now.\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.received = signum
        silence_ray()  # what Ray prints while it tears down is not for the user
        if self._depth:
            self._pending = signum
            return
        raise RunInterrupted(signum)


@contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """SIGINT and SIGTERM raise RunInterrupted inside this block; the old handlers come back after it."""
    stop = StopSignals()
    stop.install()
    try:
        yield stop
    finally:
        stop.restore()
