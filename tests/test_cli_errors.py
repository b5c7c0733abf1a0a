"""Usage errors of every `diffseg` command are one sentence, exit 2, under the command's own name.

The cases are built from the parsers themselves: every typed option (a ``type`` or ``choices``) of
every subcommand gets a bad value, and every example value its type says it takes; every option
gets a misspelling. A new option whose type does not say what it accepts fails here.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import build_parser, main
from pipeline.arg_types import accepts_of
from test_cli_help import _subparsers

REPO = Path(__file__).resolve().parents[1]
BAD = "abc"  # refused by every typed option (numbers, lists, JSON, choices, switch lists)
PARSERS = _subparsers(build_parser())


def _typed_options() -> list[tuple[str, argparse.Action]]:
    return [(command, action) for command, sub in sorted(PARSERS.items()) for action in sub._actions
            if action.option_strings and (action.type is not None or action.choices is not None)]


def _long(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def _valid_argv(command: str) -> list[str]:
    """The command with its positionals and required options, each a value it takes."""
    argv = [command]
    for action in PARSERS[command]._actions:
        if action.option_strings and not action.required:
            continue
        count = action.nargs if isinstance(action.nargs, int) else 1
        value = str(next(iter(action.choices))) if action.choices else "x"
        argv += [*action.option_strings[:1], *([value] * count)]
    return argv


def _examples(action: argparse.Action) -> list[str]:
    if action.type is None:
        return [str(c) for c in action.choices]
    accepts = accepts_of(action.type)
    assert accepts is not None and accepts.examples, f"{_long(action)}'s type says nothing of what it accepts"
    return list(accepts.examples)


TYPED = _typed_options()
CASE_IDS = [f"{command} {_long(action)}" for command, action in TYPED]


def test_every_command_and_its_typed_options_are_checked():
    assert {"label", "eval", "export", "show", "tune", "submit", "status", "logs", "stop", "list"} <= set(PARSERS)
    assert {"label --kl-threshold", "label --dtype", "label --storage-options", "submit --parts",
            "tune --tau", "eval --format", "export --layout", "show --n"} <= set(CASE_IDS)


def _refusal(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and "usage:" not in err, err
    return err.strip()


@pytest.mark.parametrize("command, action", TYPED, ids=CASE_IDS)
def test_a_bad_value_is_one_sentence_naming_the_option_and_what_it_takes(command, action, capsys):
    err = _refusal([command, _long(action), BAD], capsys)
    assert err.startswith(f"diffseg {command}: error: {_long(action)} takes "), err
    assert err.endswith((".", "?")) and "invalid" not in err and "argument " not in err, err
    secret = action.type is not None and accepts_of(action.type).secret
    assert (repr(BAD) in err) != secret, err  # a value that may hold credentials is never repeated


@pytest.mark.parametrize("command, action", TYPED, ids=CASE_IDS)
def test_every_value_a_typed_option_says_it_takes_is_taken(command, action):
    for example in _examples(action):
        args = build_parser().parse_args([*_valid_argv(command), _long(action), example])
        assert getattr(args, action.dest) is not None, (command, _long(action), example)


def test_a_kl_threshold_is_one_number_or_one_per_iteration():
    parse = build_parser().parse_args
    assert parse(["label", "in", "out", "--kl-threshold", "1.1"]).kl_threshold == pytest.approx(1.1)
    assert parse(["label", "in", "out", "--kl-threshold", "1.0,1.1,1.2"]).kl_threshold == pytest.approx([1.0, 1.1, 1.2])
    assert parse(["tune", "in", "gt", "--format", "masks", "--tau", "0.6:1.0:0.2"]).tau == pytest.approx([0.6, 0.8, 1.0])


def _misspelt(option: str) -> str:
    """The option with two letters of its name swapped (``--boundaries`` -> ``--bounadries``)."""
    name = option.lstrip("-")
    i = len(name) // 2
    while i < len(name) - 1 and name[i] == name[i + 1]:
        i += 1
    return option[: len(option) - len(name)] + name[:i] + name[i + 1] + name[i] + name[i + 2:]


MISSPELT = [(command, option) for command, sub in sorted(PARSERS.items()) for action in sub._actions
            for option in action.option_strings if option.startswith("--") and len(option) > 5]


@pytest.mark.parametrize("command, option", MISSPELT, ids=[f"{c} {o}" for c, o in MISSPELT])
def test_a_misspelt_option_gets_the_commands_sentence_and_the_option_it_meant(command, option, capsys):
    wrong = _misspelt(option)
    assert wrong not in PARSERS[command]._option_string_actions
    err = _refusal([*_valid_argv(command), wrong], capsys)
    assert err.startswith(f"diffseg {command}: error: unknown option {wrong}; did you mean "), err
    assert option in err.partition("did you mean ")[2], err


def test_an_unknown_option_with_nothing_close_points_at_the_help(capsys):
    err = _refusal(["label", "in", "out", "--xyzzy"], capsys)
    assert err == "diffseg label: error: unknown option --xyzzy; `diffseg label --help` shows how to call it."
    err = _refusal(["label", "in", "out", "--bondaries=pamr"], capsys)
    assert err == "diffseg label: error: unknown option --bondaries; did you mean --boundaries?"


def test_a_misspelt_command_is_one_sentence_listing_every_command(capsys):
    err = _refusal(["sumbit", "spec.yaml"], capsys)
    assert err.startswith("diffseg: error: the command is label, eval, ") and "list, not 'sumbit'" in err
    assert err.endswith("did you mean submit?"), err


def _diffseg(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed `diffseg` script (the package's entry point), running this checkout's code."""
    script = Path(sys.executable).with_name("diffseg")
    found = str(script) if script.exists() else shutil.which("diffseg")
    assert found, "no `diffseg` script: install the package (pip install -e .)"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([found, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_entry_point_refuses_a_bad_number_in_one_sentence(tmp_path):
    done = _diffseg(tmp_path, "label", str(REPO / "examples/images"), "o", "--model", "tiny-demo",
                    "--kl-threshold", "abc")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("diffseg label: error: --kl-threshold takes a number, or one per iteration separated "
                           "by commas (1.1 or 1.1,1.0,0.9), not 'abc'.\n")
    assert not (tmp_path / "o").exists()


def test_the_entry_point_suggests_the_option_a_misspelling_meant(tmp_path):
    done = _diffseg(tmp_path, "label", str(REPO / "examples/images"), "o", "--bondaries", "pamr")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "diffseg label: error: unknown option --bondaries; did you mean --boundaries?\n"
