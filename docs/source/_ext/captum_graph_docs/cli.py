"""The command-line reference: ``captum-graph --help`` and each subcommand's, from the parser itself."""
import argparse
import contextlib
import os
from pathlib import Path
from typing import Dict, Iterator, Set

from .files import write_if_changed

WIDTH = "100"  # argparse wraps help at $COLUMNS


def subcommands(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    """The parser's subcommands by name, in the order they were added."""
    # reason: argparse exposes subparsers only through its private _SubParsersAction
    # (fragile coupling, checked by tests/docs: every subcommand must be found)
    found: Dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


@contextlib.contextmanager
def _columns(width: str) -> Iterator[None]:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = width
    try:
        yield
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def help_texts() -> Dict[str, str]:
    """``""`` for the main help, then each subcommand's name, mapped to its ``--help`` text."""
    from captum_graph.cli import _parser  # the parser main() runs; private, so the coupling is tested

    with _columns(WIDTH):
        parser = _parser()
        texts = {"": parser.format_help()}
        texts.update({name: sub.format_help() for name, sub in subcommands(parser).items()})
    return texts


def page() -> str:
    """Markdown: one section per command with its help text."""
    lines = []
    for name, text in help_texts().items():
        command = f"captum-graph {name}".strip()
        lines += [f"## `{command}`", "", "```text", f"$ {command} --help", text.rstrip(), "```", ""]
    return "\n".join(lines)


def write_page(path: Path) -> Set[Path]:
    return {write_if_changed(path, page())}
