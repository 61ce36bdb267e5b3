"""``lmexp runs``: list tracked runs, send a journal kept during a tracking outage, register a
run's best model, clean up."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from lmexp.arguments import json_parser

__all__ = ["format_runs", "list_tracked_runs", "register_model", "run", "run_runs", "sync_journal_file"]


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


def register_model(run: str, name: str, tracking_uri: str | None = None) -> str:
    """Put a run's best model in the MLflow model registry as a new version of NAME.

    Args:
        run: The run: its folder (runs/<experiment>/<run>), its MLflow run id, or its name as lmexp runs lists it.
        name: The registered model's name; each registration adds a version (models:/NAME/1, 2, ...).
        tracking_uri: The tracking store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db).
    """
    from lmexp.mlflow_models import register_run

    return register_run(run, name, tracking_uri)


def run(argv: list[str]) -> None:
    """``lmexp runs`` (a table of the newest runs), ``lmexp runs sync JOURNAL``, ``lmexp runs register
    RUN NAME``, ``lmexp runs clean``."""
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
    if argv and argv[0] == "register":
        parser = json_parser(prog="lmexp runs register", description=register_model.__doc__.splitlines()[0])
        parser.add_function_arguments(register_model, as_positional=True)
        config = parser.parse_args(argv[1:])
        uri = register_model(config.run, config.name, config.tracking_uri)
        print(f"registered {config.run} as {uri}")
        return
    parser = json_parser(prog="lmexp runs", description=list_tracked_runs.__doc__.splitlines()[0]
                         + " (lmexp runs sync JOURNAL: send records kept during a tracking outage; "
                         "lmexp runs register RUN NAME: put a run's best model in the model registry)")
    parser.add_function_arguments(list_tracked_runs, as_positional=False)
    config = parser.parse_args(argv)
    rows = list_tracked_runs(**{k: v for k, v in config.as_dict().items() if k != "config"})
    if not rows:
        print("no tracked runs yet: train one with lmexp fit --config CONFIG")
        return
    width = shutil.get_terminal_size((PIPE_WIDTH, 24)).columns if sys.stdout.isatty() else PIPE_WIDTH
    print(format_runs(rows, width))


PIPE_WIDTH = 100  # columns of a table printed into a pipe or a file
CLASSIFIER = ("acc", "f1")  # what a classifier's runs show for each evaluation split
LANGUAGE_MODEL = ("loss", "ppl")  # and a language model's
HEADLINE = {CLASSIFIER: "acc", LANGUAGE_MODEL: "ppl"}  # the one shown when both kinds are listed


def metric_names(row: dict[str, Any]) -> tuple[str, ...]:
    """The metrics that speak a run's task: accuracy and F1 for a classifier (it logged an F1),
    loss and perplexity for a language model."""
    return CLASSIFIER if any(row.get(f"{split}/f1") is not None for split in ("val", "test")) else LANGUAGE_MODEL


def format_runs(rows: list[dict[str, Any]], width: int = PIPE_WIDTH) -> str:
    """The runs as a table of one line per run, at most ``width`` characters wide.

    A run is named by its folder relative to the working directory (``runs/<experiment>/<run>``),
    its checkpoint by its name in that folder's ``checkpoints/`` (``best.ckpt``, or
    ``interrupted.ckpt`` for a run stopped before its first validation); an evaluation's by the
    path of the checkpoint it evaluated. Metric columns follow the runs' tasks, under a ``val``/``test``
    heading: ``acc f1`` when every run is a classifier, ``loss ppl`` for language models; when
    both kinds are listed, each split's headline (``acc 0.834``, ``ppl 24.9``; ``--experiment``
    lists one kind in full). A split no run logged is left out; a path too long for the line keeps
    its end (``…/checkpoints/best.ckpt``).
    """
    kinds = {metric_names(row) for row in rows}
    columns: list[tuple[str, str, Any]] = [("", "run", _run_folder), ("", "status", lambda r: r.get("status")),
                                           ("", "steps", lambda r: r.get("steps"))]
    for split in ("val", "test"):
        if not any(row.get(f"{split}/{name}") is not None for row in rows for name in (*CLASSIFIER, *LANGUAGE_MODEL)):
            continue
        if len(kinds) == 1:
            columns += [(split, name, lambda r, key=f"{split}/{name}": r.get(key)) for name in next(iter(kinds))]
        else:
            columns.append((split, "", lambda r, split=split: next(
                (f"{name} {_cell(r.get(f'{split}/{name}'))}" for name in (HEADLINE[metric_names(r)], *metric_names(r))
                 if r.get(f"{split}/{name}") is not None), None)))
    cells = [[_cell(value(row)) for _, _, value in columns] for row in rows]
    widths = [max([len(group), len(name), *(len(line[i]) for line in cells)])
              for i, (group, name, _) in enumerate(columns)]
    checkpoints = [_checkpoint(row) for row in rows]
    wanted = min(max(len(path) for path in checkpoints), MIN_PATH)
    room = width - sum(widths) - 2 * len(widths)  # what is left for the checkpoint
    if room < wanted:  # a long folder gives way first, keeping its end
        widths[0] = max(widths[0] - (wanted - room), MIN_PATH)
        room = max(width - sum(widths) - 2 * len(widths), wanted)
    groups = [group if i == 0 or group != columns[i - 1][0] else "" for i, (group, _, _) in enumerate(columns)]
    table = [[*groups, ""], [name for _, name, _ in columns] + ["checkpoint"]]
    for line, path in zip(cells, checkpoints):
        table.append([_shorten(line[0], widths[0]), *line[1:], _shorten(path, room)])
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, [*widths, 0])).rstrip() for line in table]
    return "\n".join(line for line in lines if line)


MIN_PATH = 16  # characters a shortened path keeps at least: "…oints/best.ckpt"


def _run_folder(row: dict[str, Any]) -> str | None:
    from lmexp.run_folders import shown_path

    return shown_path(Path(row["run_dir"])) if row.get("run_dir") else row.get("run")


def _checkpoint(row: dict[str, Any]) -> str:
    """The checkpoint's name in the run's ``checkpoints/`` folder, else its path relative to the working directory."""
    from lmexp.run_folders import shown_path

    if not row.get("checkpoint"):
        return "-"
    path = Path(row["checkpoint"])
    if row.get("run_dir") and path.parent == Path(row["run_dir"]) / "checkpoints":
        return path.name
    return shown_path(path)


def _shorten(text: str, room: int) -> str:
    return text if len(text) <= room else "…" + text[len(text) - room + 1:]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):  # 0.834, 3.214; 24.9, 1234.5
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


run_runs = run  # the verb's entry point under its descriptive name
