"""`diffseg ... --help`: every option has a text, and its default shows once (never "(default: None)")."""
from __future__ import annotations

import argparse
import re

import pytest

from jobs.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


COMMANDS = sorted(_subparsers(build_parser()))


def test_every_command_is_checked():
    assert {"label", "eval", "export", "show", "submit"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_option_has_help_and_one_default(command):
    sub = _subparsers(build_parser())[command]
    text = sub.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in sub._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"diffseg {command} {action.option_strings[0]} has no help text"
        shown = sub._get_formatter()._expand_help(action)
        assert len(re.findall(r"default", shown, flags=re.I)) <= 1, shown


def test_label_help_explains_timestep_and_iterations(capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["label", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--timestep TIMESTEP timestep the one UNet call is conditioned on" in text
    assert "(no noise is added) (default: 300)" in text
    # the method's defaults are the model's (tiny-demo's card has its own): said once, in words
    assert ("--iterations ITERATIONS merging iterations (default: the model's; 3 for SD; a --kl-threshold list "
            "sets its own: one per iteration) --" in text)
    assert "(default: the model's; 16 for SD) --" in text and "(default: None)" not in text
    # a default of None is not shown: the help text says what happens instead
    assert "--dtype {fp32,fp16,bf16} default: fp16 on GPU, fp32 on CPU --" in text
    assert "--rle add COCO RLE per segment --rows-per-file" in text  # a flag: no "(default: False)"


def test_version(capsys):
    from importlib.metadata import version

    from jobs.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"diffseg-labeler {version('diffseg-labeler')}"
