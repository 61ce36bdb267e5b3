"""What every compression method shares: which layers it may touch, how a network is run on
calibration batches, and how a compressed variant is written so that lmexp loads it back.

The toolkit is a client of lmexp's public API (names in the ``__all__`` of the modules listed in
``lmexp.CLIENT_MODULES``): networks come from ``lmexp.checkpoints.load_checkpoint`` and go back
out through ``lmexp.checkpoints.export_safetensors``, with the transform recorded in the
export's ``config.json`` (``LoadedModel.transforms``); the layers it acts on are found through
``lmexp.models``' finders, not by module paths.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmexp.atomic import write_text
from lmexp.checkpoints import CONFIG_FILE, LoadedModel, export_safetensors, load_checkpoint
from lmexp.errors import CheckpointError, ConfigError
from lmexp.hardware import process_rank
from lmexp.models import BLOCKS_PREFIX, linear_layers, transformer_blocks

BLOCKS = BLOCKS_PREFIX
"""What the names of the transformer blocks' layers start with. Compression touches the linear
layers inside the blocks (``lmexp.models.linear_layers``: attention and MLP projections);
embeddings and heads (the LM head and masked-LM decoder share the token embedding, the pooler
and classifier are small and sensitive) stay as they are unless a method is told otherwise."""


EXPERIMENT = "compression"
"""MLflow experiment and run-folder group of everything the toolkit runs and records."""


class CompressionError(ConfigError):
    """A compression request that cannot be carried out as asked; the message says why and what to do."""


def load(path: str | Path) -> LoadedModel:
    """An lmexp checkpoint, export folder or transformers folder as a network to compress."""
    loaded = load_checkpoint(path)
    try:
        transformer_blocks(loaded.model)
    except ValueError:
        raise CompressionError(
            f"{str(path)!r} holds an {loaded.config.arch.upper()}; the compression toolkit works on transformer blocks: "
            "pass a gpt or bert checkpoint"
        ) from None
    return loaded


def check_fraction(name: str, value: float) -> float:
    """A fraction in [0, 1) such as a sparsity: 1 would remove everything."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise CompressionError(f"{name}={value!r} is outside [0, 1): use a fraction such as 0.5 for half of the weights")
    return float(value)


def compressible_linears(model: nn.Module, skip: Sequence[str] = ()) -> dict[str, nn.Linear]:
    """The linear layers inside the transformer blocks, by module name, in order.

    skip: ``fnmatch`` patterns of module names to leave alone, e.g. ``trunk.blocks.0.*`` or
    ``*.qkv``. Layers outside the blocks (embeddings, tied LM head, pooler, classifier) are
    never returned.
    """
    return {
        name: module
        for name, module in linear_layers(model).items()
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)
    }


def network_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The keyword arguments of the network's ``hidden_states`` that a data-module batch provides."""
    return {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch}


@torch.no_grad()
def run_blocks(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> int:
    """Run the network up to its last block's hidden states (``hidden_states``: embeddings and
    transformer blocks, no head) over calibration batches, in eval mode, so hooks on the blocks'
    layers collect what they need; return the number of batches seen."""
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            model.hidden_states(**network_inputs(batch))
            seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise CompressionError("no calibration batches: pass data with at least one batch (--calibration-batches 1 or more)")
    return seen


# Earlier names of the two functions above, kept so that existing imports keep working.
trunk_inputs = network_inputs
run_trunk = run_blocks


def copy_loaded(loaded: LoadedModel) -> LoadedModel:
    """A deep copy to compress, leaving the original network untouched."""
    return LoadedModel(
        copy.deepcopy(loaded.model), loaded.config, loaded.tokenizer, loaded.objective,
        copy.deepcopy(loaded.inputs), copy.deepcopy(loaded.transforms),
    )


def is_main_process() -> bool:
    """Whether this process writes results: rank 0 of a multi-process (DDP) training run, where
    every rank runs the whole command and trains, but only one may save the network."""
    return process_rank() == 0


def check_output(folder: str | Path, overwrite: bool) -> None:
    """Refuse to replace an earlier export unless asked: checked before any long work starts."""
    if (Path(folder) / CONFIG_FILE).exists() and not overwrite:
        raise CompressionError(f"{str(folder)!r} already holds a {CONFIG_FILE}: choose another folder or pass --overwrite")
    if Path(folder).is_dir() and not (Path(folder) / CONFIG_FILE).exists() and any(Path(folder).iterdir()):
        # The export replaces its folder as a whole: other files there would be lost.
        raise CompressionError(f"{str(folder)!r} holds files but no export: choose a new or empty folder for --out")


def run_logger(args: argparse.Namespace) -> Any:
    """The tracking of a training run a command starts (recovery fine-tuning, distillation):
    none with --no-tracking, the store --tracking-uri names, else what its config says."""
    if args.no_tracking:
        return False
    if args.tracking_uri:
        from lmexp.tracking import MLflowTracker

        return MLflowTracker(args.tracking_uri)
    return None


def save(loaded: LoadedModel, folder: str | Path, overwrite: bool = False) -> Path:
    """Write a compressed variant as an lmexp export folder (``model.safetensors``,
    ``config.json`` with the transforms applied, ``tokenizer.json``) that ``load_checkpoint``,
    ``lmexp generate``/``test``/``predict`` and ``--model.init_args.pretrained`` take."""
    check_output(folder, overwrite)
    if any(t["method"] == "dynamic-int8" for t in loaded.transforms):
        raise CompressionError(
            "a dynamic-int8 network cannot be saved (torch's packed int8 weights have no safetensors form): save the "
            "original and apply compression.quantize.dynamic_int8 after loading it, or quantize with --method int8"
        )
    return export_safetensors(  # replaces the folder as a whole: an earlier export stays until the new one is complete
        loaded.model, loaded.config, folder, loaded.tokenizer, loaded.objective, loaded.inputs, loaded.transforms
    )


def describe(loaded: LoadedModel) -> str:
    """One line: architecture, size and what was done to it."""
    methods = " + ".join(t["method"] for t in loaded.transforms) or "as trained"
    n = sum(p.numel() for p in loaded.model.parameters())
    return f"{loaded.config.arch}, {loaded.config.n_layer} layers, {n:,} parameters ({methods})"


def sparsity_table(model: nn.Module, skip: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per compressible layer: name, shape, weights, zeros, sparsity; then a total row."""
    rows = []
    for name, linear in compressible_linears(model, skip).items():
        weight = linear.weight.detach()
        zeros = int((weight == 0).sum())
        rows.append({"layer": name, "shape": list(weight.shape), "weights": weight.numel(), "zeros": zeros,
                     "sparsity": zeros / weight.numel()})
    total = sum(r["weights"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    rows.append({"layer": "total", "shape": [], "weights": total, "zeros": zeros, "sparsity": zeros / max(total, 1)})
    return rows


def format_sparsity(rows: list[dict[str, Any]]) -> str:
    """The sparsity table as aligned text, for the terminal and log files."""
    width = max(len(r["layer"]) for r in rows)
    lines = [f"{'layer':<{width}}  {'shape':>11}  {'sparsity':>8}"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['layer']:<{width}}  {shape:>11}  {r['sparsity']:>8.1%}")
    return "\n".join(lines)


def common_arguments(parser: argparse.ArgumentParser, output: bool = True, skip: bool = True) -> None:
    """The arguments every method's command shares (``--skip`` only where layers can be left alone)."""
    parser.add_argument("--ckpt", required=True, help="the trained network: a .ckpt, an lmexp export folder or a transformers folder")
    parser.add_argument(
        "--config", action="append", default=None,
        help="YAML config(s) whose data section gives calibration / fine-tuning / evaluation data "
        "(default: the config.yaml of the checkpoint's run folder)",
    )
    if skip:
        parser.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                            help="fnmatch pattern of block layers to leave alone, e.g. 'trunk.blocks.0.*' (repeatable)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    parser.add_argument("--no-tracking", action="store_true", help="do not record the command in MLflow")
    if output:
        parser.add_argument("--out", required=True, help="folder to write the compressed network to (an lmexp export)")
        parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")


def track(
    args: argparse.Namespace, params: dict[str, Any], metrics: dict[str, float], artifacts: Sequence[Path] = ()
) -> None:
    """Record a compression command as a run of the MLflow experiment ``compression`` (unless
    ``--no-tracking``), through lmexp's tracker, which keeps records through store outages."""
    if args.no_tracking:
        return
    from lmexp.tracking import MLflowTracker

    out = Path(getattr(args, "out", ".") or ".")
    tracker = MLflowTracker(args.tracking_uri, experiment_name=EXPERIMENT, run_name=f"{args.command}-{out.name}",
                            save_dir=str(out))
    tracker.log_hyperparams({"command": args.command, "checkpoint": str(args.ckpt), **params})
    if metrics:
        tracker.log_metrics(metrics)
    for path in artifacts:
        if Path(path).exists():
            tracker.log_artifact(path)
    tracker.finalize("success")


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2))  # whole or absent, never cut short


__all__ = [
    "BLOCKS",
    "CheckpointError",
    "CompressionError",
    "check_fraction",
    "check_output",
    "common_arguments",
    "compressible_linears",
    "copy_loaded",
    "describe",
    "format_sparsity",
    "is_main_process",
    "load",
    "network_inputs",
    "run_blocks",
    "run_logger",
    "run_trunk",
    "save",
    "sparsity_table",
    "track",
    "trunk_inputs",
]
