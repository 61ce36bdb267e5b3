"""What every benchmark prints and appends to BENCHMARKS.md: the machine, the command, a table."""

from __future__ import annotations

import argparse
import datetime as dt
import os
from pathlib import Path

import torch

from lmexp.hardware import cpu_has_bf16_units, cpu_model

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_FILE = ROOT / "BENCHMARKS.md"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def append_entry(title: str, command: str, table: str, output: Path = BENCHMARKS_FILE) -> None:
    """Print the table and append it to BENCHMARKS.md with the machine and the exact command."""
    print(table)
    machine = (
        f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__} "
        f"(CPU capability {torch.backends.cpu.get_cpu_capability()}, bf16 units: "
        f"{'yes' if cpu_has_bf16_units() else 'no'})"
    )
    heading = unique_heading(f"{title}, {dt.date.today().isoformat()}", output)
    entry = f"\n### {heading}\n\nMachine: {machine}.\nCommand: `{command}`\n\n{table}\n"
    with open(output, "a") as f:
        f.write(entry)


def unique_heading(heading: str, output: Path) -> str:
    """``heading``, numbered when an entry already has it: the summary cites entries by heading."""
    existing = {line[4:].strip() for line in output.read_text(encoding="utf-8").splitlines()
                if line.startswith("### ")} if output.exists() else set()
    number = 1
    candidate = heading
    while candidate in existing:
        number += 1
        candidate = f"{heading} (run {number})"
    return candidate


def command_line(script: str, parser: argparse.ArgumentParser, args: argparse.Namespace, always: str = "",
                 unlisted: tuple[str, ...] = ("data", "keep", "no_write")) -> str:
    """The command that reproduces a run: the script, ``always``, and every other option not at its default."""
    return f"python {script}{' ' + always if always else ''}" + "".join(
        f" --{name.replace('_', '-')} {value}" for name, value in vars(args).items()
        if name not in unlisted and value is not None and value != parser.get_default(name))


def publish(title: str, command: str, table: str, write: bool = True) -> None:
    """Append the entry to BENCHMARKS.md, or with ``write=False`` only print the table."""
    if write:
        append_entry(title, command, table)
    else:
        print(table)
