"""The help layout every ``voidprompt`` command's parser uses: each option's help ends with its default."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help, unless the help already says its default or there
    is none worth saying (a switch that is off, an empty text, None: the help explains what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        quiet = default is None or default is False or default == "" or default == []
        if "default" in text or not action.option_strings or quiet or default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def use_help_format(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give ``parser`` and its subcommands' parsers, nested, :class:`HelpFormatter`."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                use_help_format(child)
    return parser
