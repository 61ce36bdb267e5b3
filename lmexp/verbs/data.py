"""``lmexp data``: work on a config's corpus without training; ``lmexp data prepare`` builds its token cache.

Tokenizing a large corpus can take longer than a scheduler allows one job, and a fit that starts
with a cold cache holds its accelerators idle meanwhile. ``prepare`` builds, on CPUs, the very
cache entry ``lmexp fit`` with the same config would build (the config is parsed as fit parses
it, lmexp.runs.configure), so the fit starts with a cache hit. ``--shard k/N`` builds only every
N-th shard of the entry, starting at shard k, so N jobs on several machines fill one shared
``data.cache_dir`` together.
"""

from __future__ import annotations

import argparse
import functools
import re
from typing import TYPE_CHECKING, Any

from lmexp.arguments import OneLineArgumentParser
from lmexp.errors import ConfigError, check_positive

if TYPE_CHECKING:
    from lmexp.data.cache import PrepareReport

__all__ = ["parse_part", "prepare", "run"]

SHARD_FORM = "k/N with 0 <= k < N, e.g. --shard 0/4 for the first of 4 parts"


def parse_part(value: str) -> tuple[int, int]:
    """``k/N`` -> ``(k, N)``: which part of the shards this call builds."""
    match = re.fullmatch(r"([0-9]+)/([0-9]+)", value.strip())
    if match and int(match[1]) < int(match[2]):
        return int(match[1]), int(match[2])
    raise argparse.ArgumentTypeError(f"{value!r} is not {SHARD_FORM}")


def prepare(fit_args: list[str], part: tuple[int, int] | None = None, workers: int | None = None) -> PrepareReport:
    """Build the token cache of the data ``lmexp fit FIT_ARGS`` would train on (``part``: only
    its share of the shards); return the report of what was built."""
    from lmexp.data.datamodule import TextDataModule
    from lmexp.runs import configure

    configured = configure("fit", args=fit_args)  # as lmexp fit parses it: no trainer, nothing written
    data = configured.data
    if not isinstance(data, TextDataModule):
        kind = "no data" if data is None else type(data).__name__
        raise ConfigError(
            f"lmexp data prepare builds the token cache of a text corpus (lmexp.TextDataModule), and this "
            f"config has {kind}: run lmexp fit directly, its data needs no preparing"
        )
    if hasattr(configured.model, "data_contract"):
        data.accept(configured.model.data_contract())  # task, context, a pretrained tokenizer: as fit binds them
    # Flushed line by line: under a pipe (a scheduler's log file) progress shows as it happens.
    return data.prepare_cache(part=part, workers=workers, log=functools.partial(print, flush=True))


def _add_prepare(actions: Any) -> None:
    description = (
        "Build the token cache lmexp fit would build for a config (clean, split, train the tokenizer, "
        "encode), so the fit starts with a cache hit. Takes the options of lmexp fit (--config, --data.*; "
        "see lmexp fit --help); --shard k/N builds every N-th shard starting at k, so N jobs fill one "
        "shared data.cache_dir."
    )
    parser = actions.add_parser("prepare", help="build a config's token cache ahead of training",
                                description=description, allow_abbrev=False)
    parser.add_argument("--shard", type=parse_part, default=None, metavar="k/N",
                        help=f"build only this part of the shards: {SHARD_FORM}; default: all of them")
    parser.add_argument("--workers", type=int, default=None, metavar="W",
                        help="processes that build shards at once (default: data.workers, else all cores)")


def _run_prepare(options: argparse.Namespace, fit_args: list[str]) -> PrepareReport:
    if options.workers is not None:
        check_positive("--workers", options.workers)
    report = prepare(fit_args, part=options.shard, workers=options.workers)
    print(report.summary(), flush=True)
    return report


ACTIONS = {"prepare": (_add_prepare, _run_prepare)}  # sub-verb -> (add its parser, run it)


def run(argv: list[str]) -> Any:
    """``lmexp data prepare --config X.yaml [fit options] [--shard k/N] [--workers W]``."""
    parser = OneLineArgumentParser(
        prog="lmexp data", allow_abbrev=False,
        description="Work on a config's corpus without training (lmexp data prepare --help).",
    )
    actions = parser.add_subparsers(dest="action", metavar="{" + ",".join(ACTIONS) + "}", required=True)
    for add_parser, _ in ACTIONS.values():
        add_parser(actions)
    # "--shard -1/2" would read as an unknown flag with no value: keep the value with its flag.
    words = list(argv)
    for i in range(len(words) - 1):
        if words[i] == "--shard":
            words[i:i + 2] = [f"--shard={words[i + 1]}"]
            break
    options, rest = parser.parse_known_args(words)  # the rest: lmexp fit's options, checked there
    return ACTIONS[options.action][1](options, rest)

