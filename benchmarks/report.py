"""What every benchmark prints and appends to BENCHMARKS.md: the machine, the command, a table."""

from __future__ import annotations

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
    entry = f"\n### {title}, {dt.date.today().isoformat()}\n\nMachine: {machine}.\nCommand: `{command}`\n\n{table}\n"
    with open(output, "a") as f:
        f.write(entry)
