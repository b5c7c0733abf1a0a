"""The value types of diffseg's options, each saying in words what it accepts.

A type function carries an ``Accepts`` (``described`` attaches one); argparse's plain ``int``,
``float`` and ``json.loads`` have theirs here. ``pipeline.arg_parser`` turns a value an option
refuses into one sentence from it ("--kl-threshold takes a number, ..., not 'abc'."), and the
tests parse every example of every typed option of every command, so a new typed option without
a description (or with examples it refuses) fails them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Accepts:
    """What an option's type takes: ``what`` completes "--OPTION takes ..."."""

    what: str
    examples: tuple[str, ...]  # values it takes (the tests parse each one)
    secret: bool = False  # the value may hold credentials: a refusal never repeats it


_BUILTINS: tuple[tuple[Any, Accepts], ...] = (
    (int, Accepts("a whole number", ("3",))),
    (float, Accepts("a number", ("0.5", "2"))),
    (json.loads, Accepts("JSON", ('{"a": 1}',))),
)


def accepts_of(convert: Any) -> Accepts | None:
    """The description of an argparse ``type``; None when it has none (a refusal then cannot say
    what the option takes, which the tests catch)."""
    found = getattr(convert, "accepts", None)
    if isinstance(found, Accepts):
        return found
    return next((a for known, a in _BUILTINS if known is convert), None)


def described(convert: Callable[[str], Any], what: str, *examples: str,
              secret: bool = False) -> Callable[[str], Any]:
    """``convert`` as an argparse type that says what it accepts (``what``, ``examples``)."""

    def typed(text: str) -> Any:
        return convert(text)

    typed.__name__ = typed.__qualname__ = getattr(convert, "__name__", "value")
    typed.__doc__ = convert.__doc__
    typed.accepts = Accepts(what, tuple(examples), secret)  # type: ignore[attr-defined]
    return typed


def comma_floats(text: str) -> list[float]:
    """"8,4,2,1" -> [8.0, 4.0, 2.0, 1.0]."""
    return [float(v) for v in text.split(",")]


def comma_ints(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]."""
    return [int(v) for v in text.split(",")]
