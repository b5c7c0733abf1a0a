"""The argparse parser of every ``diffseg`` command: a usage error is one sentence on stderr, exit 2.

Plain argparse prints the whole usage first (28 lines for ``label``), names a bad value by its
type function ("invalid _kl_threshold value: 'abc'"), and reports a misspelt option of a
subcommand from the top-level parser, with that parser's usage. ``CommandParser`` instead says,
in one line under the subcommand's own name, which option refused what and what it takes
(``pipeline.arg_types``), and for an unknown option the closest one ("did you mean
--boundaries?"). Subparsers made with ``add_subparsers`` are ``CommandParser`` too.
"""
from __future__ import annotations

import argparse
import difflib
from typing import Any, NoReturn, Sequence

from pipeline.arg_types import accepts_of


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one sentence (see the module's text)."""

    def error(self, message: str) -> NoReturn:
        # The sentences made here end with "." or "?"; argparse's own ("the following arguments
        # are required: output") end with neither, and get a pointer to the command's help.
        if not message.endswith((".", "?")):
            message += f"; `{self.prog} --help` shows how to call it."
        self.exit(2, f"{self.prog}: error: {message}\n")

    def add_subparsers(self, **kwargs: Any) -> Any:
        self._commands = super().add_subparsers(**kwargs)
        return self._commands

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:  # reported by the subcommand that was given them, with its options' names
            chosen = self.chosen_command(namespace)
            chosen.error(unknown_arguments(chosen, extras))
        return namespace

    def chosen_command(self, namespace: argparse.Namespace) -> CommandParser:
        """The (sub)parser of the command ``namespace`` was parsed for: this one without subcommands."""
        commands = getattr(self, "_commands", None)
        if commands is None or commands.dest == argparse.SUPPRESS:
            return self
        chosen = commands.choices.get(getattr(namespace, commands.dest, None))
        return chosen.chosen_command(namespace) if isinstance(chosen, CommandParser) else self

    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        convert = self._registry_get("type", action.type, action.type)
        if not callable(convert):
            return super()._get_value(action, arg_string)  # argparse's own "is not callable"
        try:
            return convert(arg_string)
        except argparse.ArgumentTypeError as exc:
            reason = str(exc)
        except (TypeError, ValueError):
            reason = ""
        raise argparse.ArgumentError(None, bad_value(action, arg_string, reason))

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            raise argparse.ArgumentError(None, bad_choice(action, value))


def option_name(action: argparse.Action) -> str:
    """How a user writes the option: its long form (``--kl-threshold``), or a positional's name."""
    if action.option_strings:
        return max(action.option_strings, key=len)
    return str(action.metavar or action.dest)


def bad_value(action: argparse.Action, text: str, reason: str = "") -> str:
    """"--kl-threshold takes a number, ..., not 'abc'." (the value left out when it may be a secret)."""
    accepts = accepts_of(action.type)
    name = option_name(action)
    if accepts is None:  # a type with no description: still one sentence, but it cannot say more
        sentence = f"{name} cannot take {text!r}"
    elif accepts.secret:
        sentence = f"{name} takes {accepts.what}"
    else:
        sentence = f"{name} takes {accepts.what}, not {text!r}"
    return f"{sentence}: {reason.rstrip('.')}." if reason else f"{sentence}."


def bad_choice(action: argparse.Action, value: Any) -> str:
    """"--dtype takes fp32, fp16 or bf16, not 'fp64'." with the closest choice, when one is close."""
    choices = [str(c) for c in action.choices]  # type: ignore[union-attr]
    listed = choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"
    if action.option_strings:
        sentence = f"{option_name(action)} takes {listed}, not {value!r}"
    else:
        sentence = f"the {option_name(action)} is {listed}, not {value!r}"
    return sentence + _did_you_mean(str(value), choices, ".")


def unknown_arguments(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """What ``parser`` was given and does not take: its unknown options, each with the closest
    known one, else the arguments left over."""
    known = [s for a in parser._actions for s in a.option_strings if a.help != argparse.SUPPRESS]
    unknown = [e.split("=", 1)[0] for e in extras
               if len(e) > 1 and e[0] in parser.prefix_chars and not _is_number(e)]
    if not unknown:
        return f"unexpected argument{'s' if len(extras) > 1 else ''} {' '.join(map(repr, extras))}"
    if len(unknown) == 1:
        return f"unknown option {unknown[0]}" + _did_you_mean(unknown[0], known, "")
    listed = ", ".join(f"{u} (did you mean {' or '.join(m)}?)" if (m := _close(u, known)) else u for u in unknown)
    return f"unknown options {listed}"


def _close(word: str, candidates: list[str]) -> list[str]:
    return difflib.get_close_matches(word, candidates, n=2, cutoff=0.7)


def _did_you_mean(word: str, candidates: list[str], otherwise: str) -> str:
    matches = _close(word, candidates)
    return f"; did you mean {' or '.join(matches)}?" if matches else otherwise


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
