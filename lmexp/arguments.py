"""One-line argument errors for every command line of lmexp and its clients.

A bad flag or value prints ``error: ... (see PROG --help)`` in one line and exits 2, instead of
a usage text or jsonargparse's nested explanation of every type a value was tried as: the fix is
in ``--help``. ``OneLineErrors`` serves jsonargparse parsers (LightningCLI's, and the verbs' made by
``json_parser``),
``OneLineArgumentParser`` plain ``argparse`` ones (``compression``, ``sweeps``, ``chaos``).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser

__all__ = ["OneLineArgumentParser", "OneLineErrors", "json_parser", "one_line", "summarize_parse_error"]


def one_line(message: str, max_lines: int | None = None) -> str:
    """A multi-line message joined into one line (its first ``max_lines`` non-empty lines)."""
    return " ".join([line.strip() for line in message.splitlines() if line.strip()][:max_lines])


def summarize_parse_error(message: str) -> str:
    """jsonargparse's nested explanation of a bad value as one line: key, value, expected type.

    ``--model.lr abc`` yields a dozen lines (one per class the value was tried against); what
    the user needs is which key, what was given and what it should be.
    """
    keys = re.findall(r'Parser key "([^"]+)"', message)
    lines = message.splitlines()
    unknown = re.search(r"Problem with given class_path '([^']+)':\s+Option '([^']+)' is not accepted", message)
    if unknown and keys:  # --model.lrx: a misspelt option of the chosen class
        class_path, option = unknown.groups()
        return f"--{keys[0]}.{option}: {class_path} has no option {option!r}"
    # A class given to a plain (dict or Any) setting stays a dict inside the parsed Namespace (a
    # class setting would be a Namespace): the error otherwise prints the whole group's Namespace.
    given_value = re.search(r"Given value: (.*)", message)
    nested = given_value and re.search(r"'class_path': '([^']+)'", given_value.group(1))
    fields = nested and re.findall(r"(\w+)=\{", given_value.group(1)[: nested.start()])
    if keys and nested and fields:
        return (f"--{keys[0]}.{fields[-1]}: takes a plain value, not a class (got class_path "
                f"{nested.group(1)!r}): write its fields directly, without class_path and init_args")
    if keys:
        # What the innermost key expected: the lines indented under its "Parser key" line (the
        # outer ones list the classes the whole group was tried as).
        start = max(i for i, line in enumerate(lines) if 'Parser key "' in line)
        depth = len(lines[start]) - len(lines[start].lstrip())
        inner = [lines[start]]
        for line in lines[start + 1:]:
            if line.strip() and len(line) - len(line.lstrip()) <= depth:
                break
            inner.append(line)
        section = "\n".join(inner)
        expected = []
        for class_name, choices in re.findall(r"Expected a (?:<class '([^']+)'>|typing\.Literal\[(.*?)\])(?=\.|\s*$)", section, re.MULTILINE):
            if choices:
                expected.append(f"one of {choices}")
            else:
                expected.append("null" if class_name == "NoneType" else class_name.rsplit(".", 1)[-1])
        given = re.search(r"(?:Got|Given) value: (.*)", section)
        if expected and given:
            key = ".".join(dict.fromkeys(keys))
            types = " or ".join(dict.fromkeys(expected))
            return f"--{key}: expected {types}, got {given.group(1).strip()!r}"
    return one_line(message, max_lines=3)


def exit_with_usage_error(message: str, command: str) -> NoReturn:
    print(f"error: {message} (see {command} --help)", file=sys.stderr)
    raise SystemExit(2)


class OneLineErrors:
    """jsonargparse parser mixin (``class Parser(OneLineErrors, ArgumentParser)``)."""

    prog: str
    exit_on_error: bool

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)  # type: ignore[misc]  # raises for callers that catch it
        parser = getattr(ex, "subcommand_parser", None) or self
        exit_with_usage_error(summarize_parse_error(message), parser.prog.replace(" [options]", ""))


def json_parser(prog: str, description: str) -> ArgumentParser:
    """A jsonargparse parser with one-line errors, for a verb that takes a function's arguments.

    jsonargparse is imported on the first call, so a module that defines a verb starts without it.
    """
    return _json_parser_class()(prog=prog, description=description)


@functools.cache
def _json_parser_class() -> type[ArgumentParser]:
    from jsonargparse import ArgumentParser

    class OneLineJsonParser(OneLineErrors, ArgumentParser):
        pass

    return OneLineJsonParser


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors are one line; sub-commands made with
    ``add_subparsers().add_parser`` are of the same class, so theirs are too."""

    def error(self, message: str) -> NoReturn:
        exit_with_usage_error(message, self.prog)
