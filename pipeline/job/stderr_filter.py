"""Drop the known false alarms that Ray's C++ core writes straight to the process's stderr.

Ray Data hands every actor pool its map function as an object-store reference and
gives the actors ``max_restarts=-1``; Ray's core worker then logs, at ERROR level,
that the actor "has constructor arguments in the object store and max_restarts > 0"
(ray-project/ray#57733). The reference is owned by this driver for the whole run,
so a restarted actor finds it: the line is noise, but an ERROR line on a successful
run reads as a failure. It is written by C++ to file descriptor 2, past Python's
logging, so the CLI runs with fd 2 routed through a pump that drops such lines and
passes everything else through as it comes (a pseudo-terminal when stderr is one,
so progress bars still see a terminal).
"""
from __future__ import annotations

import os
import re
import select
import sys
import threading
from contextlib import contextmanager
from typing import Iterator, Pattern

__all__ = ["HARMLESS", "RAY_CHATTER", "filtered_stderr", "silence_ray"]

HARMLESS: tuple[Pattern[bytes], ...] = (
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store "
               rb"and max_restarts > 0"),
)
_HOLD_S = 0.05  # a partial line waits this long for its end before it is passed on

# What Ray prints on its own: lines its log monitor forwards from workers and the raylet
# ("(raylet) ...", "(MapWorker(...) pid=12, ip=...) ..."), its Python loggers' lines and its
# C++ core's. After Ctrl-C or SIGTERM (silence_ray), they are the teardown's chatter ("Task
# ... killed by ray.kill") and are dropped, so a clean stop shows only its one sentence.
RAY_CHATTER: tuple[Pattern[bytes], ...] = (
    re.compile(rb"^(\x1b\[[0-9;]*m)*\((raylet|gcs_server|[^()\s]+(\([^\n]*?\))*,? pid=)"),
    re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s"),
    re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\]"),
)
_silenced = threading.Event()
_filtering = threading.Event()  # a filtered_stderr block is routing fd 2 through the pump
_real_stdout: list = []  # sys.stdout while a stop sends Python's stdout to stderr (see silence_ray)


def silence_ray() -> None:
    """From now on, inside filtered_stderr, drop Ray's own lines (the run is stopping).

    Ray prints what its workers and the raylet write to stdout on this process's ``sys.stdout``
    ("(raylet) Task ... killed by ray.kill" while it tears down), past the filter on fd 2. A stop
    prints nothing of ours on stdout, so until the block ends ``sys.stdout`` is stderr, where
    the filter drops those lines like the rest of Ray's chatter.
    """
    _silenced.set()
    if _filtering.is_set() and not _real_stdout:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        _real_stdout.append(sys.stdout)
        sys.stdout = sys.stderr


def _dropped(line: bytes, patterns: tuple[Pattern[bytes], ...]) -> bool:
    if any(p.search(line) for p in patterns):
        return True
    return _silenced.is_set() and any(p.search(line) for p in RAY_CHATTER)


@contextmanager
def filtered_stderr(patterns: tuple[Pattern[bytes], ...] = HARMLESS) -> Iterator[None]:
    """Inside this block, lines on fd 2 matching ``patterns`` are dropped; the rest pass unchanged.
    After silence_ray(), Ray's own lines are dropped too."""
    _silenced.clear()
    try:
        sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (e.g. captured by a test runner)
        yield
        return
    if os.isatty(real):
        import pty
        import termios

        reader, writer = pty.openpty()
        try:
            import fcntl

            fcntl.ioctl(writer, termios.TIOCSWINSZ, fcntl.ioctl(real, termios.TIOCGWINSZ, b"\0" * 8))
        except OSError:
            pass
        attrs = termios.tcgetattr(writer)
        attrs[1] &= ~termios.ONLCR  # pass "\n" through as it is, no "\r\n"
        termios.tcsetattr(writer, termios.TCSANOW, attrs)
    else:
        reader, writer = os.pipe()
    os.dup2(writer, 2)
    os.close(writer)
    _filtering.set()
    stop = threading.Event()
    pump = threading.Thread(target=_pump, args=(reader, real, patterns, stop), daemon=True, name="stderr-filter")
    pump.start()
    try:
        yield
    finally:
        _filtering.clear()
        if _real_stdout:
            sys.stdout = _real_stdout.pop()
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(real, 2)  # the pipe's last writer goes: the pump sees the end
        stop.set()
        pump.join(timeout=2)
        os.close(real)


def _pump(reader: int, out: int, patterns: tuple[Pattern[bytes], ...], stop: threading.Event) -> None:
    pending = b""
    try:
        while True:
            ready, _, _ = select.select([reader], [], [], _HOLD_S)
            if not ready:
                if pending:  # a partial line (a progress bar, a prompt): show it now
                    _write(out, pending)
                    pending = b""
                if stop.is_set():
                    return
                continue
            try:
                chunk = os.read(reader, 65536)
            except OSError:  # a pty reports EIO once its last writer is gone
                chunk = b""
            if not chunk:
                break
            pending += chunk
            *lines, pending = re.split(rb"(?<=[\n\r])", pending)
            kept = b"".join(line for line in lines if not _dropped(line, patterns))
            if kept:
                _write(out, kept)
        if pending:
            _write(out, pending)
    finally:
        os.close(reader)


def _write(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except OSError:
            return
