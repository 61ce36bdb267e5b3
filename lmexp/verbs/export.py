"""``lmexp export``: write a checkpoint as a Hugging Face transformers folder."""

from __future__ import annotations

from pathlib import Path

from lmexp.arguments import json_parser

__all__ = ["run", "run_export"]


def run(argv: list[str]) -> Path:
    """``lmexp export CHECKPOINT OUTPUT [--overwrite]``: export, then say how to load the folder."""
    from lmexp.checkpoints import export_checkpoint

    parser = json_parser(prog="lmexp export", description=export_checkpoint.__doc__.splitlines()[0])
    parser.add_function_arguments(export_checkpoint, as_positional=True)
    config = parser.parse_args(argv)
    folder = export_checkpoint(config.checkpoint, config.output, config.overwrite)
    print(f"wrote {folder}: load it with transformers' AutoModel*.from_pretrained({str(folder)!r}) and AutoTokenizer")
    return folder


run_export = run  # the verb's entry point under its descriptive name
