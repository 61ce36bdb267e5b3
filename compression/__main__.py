"""``python -m compression prune|quantize|distill|report``: one command per method, one report."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lmexp.arguments import OneLineArgumentParser
from lmexp.errors import find_user_error

# Each method's module adds its own sub-command (``add_command(subparsers)``).
COMMANDS = ("compression.pruning", "compression.quantize", "compression.distill", "compression.report")


def parser() -> argparse.ArgumentParser:
    main = OneLineArgumentParser(
        prog="python -m compression",
        description="Prune, quantize or distill a trained lmexp network, and weigh the results in one report.",
    )
    subparsers = main.add_subparsers(dest="command", required=True, metavar="{prune,quantize,distill,report}")
    for module in COMMANDS:
        importlib.import_module(module).add_command(subparsers)
    return main


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
