"""MkDocs hook: the command-line reference page, made from taxoclip's argparse parser itself."""

from __future__ import annotations

import argparse

MARKER = "<!-- cli-reference -->"


def walk(parser: argparse.ArgumentParser, name: str) -> list[str]:
    """``name --help`` for the parser and, depth first, every subcommand's."""
    parser.prog = name
    out = [f"## `{name}`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                out += walk(subparser, f"{name} {sub}")
    return out


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    from taxoclip.apps.cli import build_parser
    from taxoclip.apps.data_commands import build_verify_parser

    lines = walk(build_parser(), "taxoclip") + walk(build_verify_parser(), "taxoclip shards verify")
    return markdown.replace(MARKER, "\n".join(lines))
