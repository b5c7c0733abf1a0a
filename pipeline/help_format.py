"""The ``--help`` formatter of every ``diffseg`` command: each option's default shown once, where it says something."""
from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``argparse.ArgumentDefaultsHelpFormatter`` without its noise.

    It appends "(default: X)" to every option, also when the help text already
    states the default in words ("default: fp16 on GPU, fp32 on CPU (default:
    None)") and when the default is None or False (an unset option, a flag that
    is off). This one appends it only when neither is the case.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text.lower()
            or action.default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return super()._get_help_string(action)
