"""``lmexp runs``: list tracked runs, send a journal kept during a tracking outage, clean up."""

from __future__ import annotations

import sys
from typing import Any

from lmexp.arguments import json_parser

__all__ = ["list_tracked_runs", "run", "run_runs", "sync_journal_file"]


def list_tracked_runs(experiment: str | None = None, limit: int = 20, tracking_uri: str | None = None) -> list[dict]:
    """List the newest tracked runs with their key metrics and checkpoints.

    Args:
        experiment: Only this experiment's runs (default: all).
        limit: How many runs, newest first.
        tracking_uri: The tracking store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db).
    """
    from lmexp.mlflow_store import list_runs

    return list_runs(tracking_uri, experiment, limit)


def sync_journal_file(journal: str, tracking_uri: str | None = None) -> str:
    """Send the records a run kept while its tracking store was unreachable.

    Args:
        journal: The ``tracking-journal.jsonl`` file the run's warning named.
        tracking_uri: Send them to this store instead of the one the journal names.
    """
    from lmexp.mlflow_store import sync_journal

    return sync_journal(journal, tracking_uri)


def run(argv: list[str]) -> None:
    """``lmexp runs`` (a table of the newest runs), ``lmexp runs sync JOURNAL``, ``lmexp runs clean``."""
    if argv and argv[0] == "clean":
        from lmexp.verbs.clean import run as run_clean

        run_clean(argv[1:])
        return
    if argv and argv[0] == "sync":
        parser = json_parser(prog="lmexp runs sync", description=sync_journal_file.__doc__.splitlines()[0])
        parser.add_function_arguments(sync_journal_file, as_positional=True)
        config = parser.parse_args(argv[1:])
        run_id = sync_journal_file(config.journal, config.tracking_uri)
        print(f"sent {config.journal} to MLflow run {run_id}")
        return
    parser = json_parser(prog="lmexp runs", description=list_tracked_runs.__doc__.splitlines()[0]
                         + " (lmexp runs sync JOURNAL: send records kept during a tracking outage)")
    parser.add_function_arguments(list_tracked_runs, as_positional=False)
    config = parser.parse_args(argv)
    rows = list_tracked_runs(**{k: v for k, v in config.as_dict().items() if k != "config"})
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    columns = ["run", "experiment", "status", "started", "minutes", "steps", "train/loss", "val/loss", "test/loss",
               "checkpoint"]
    for column in columns:
        table.add_column(column, no_wrap=column == "checkpoint")
    for row in rows:
        table.add_row(*[_cell(row.get(column)) for column in columns])
    console = Console(width=None if sys.stdout.isatty() else 400)
    if rows:
        console.print(table)
    else:
        print("no tracked runs yet: train one with lmexp fit --config CONFIG")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


run_runs = run  # the verb's entry point under its descriptive name
