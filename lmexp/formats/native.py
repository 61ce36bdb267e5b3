"""lmexp's own formats: Lightning ``.ckpt`` files written by its objectives, and export folders
of ``model.safetensors`` + ``config.json`` + ``tokenizer.json``.

Reading either yields a plain ``nn.Module`` with its config and tokenizer (``LoadedModel``);
``lmexp.checkpoints.load_checkpoint`` chooses between this and transformers folders.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer
from torch import nn

from lmexp.atomic import replace_folder
from lmexp.data.tokenizer import load_tokenizer, tokenizer_from_json
from lmexp.errors import CheckpointError, ConfigError
from lmexp.faults import fault_point
from lmexp.models import ModelConfig, build_model

__all__ = [
    "CHECKPOINT_KEY",
    "CONFIG_FILE",
    "EXPORT_FORMAT",
    "PRELOAD_HOOKS",
    "RESUMABLE",
    "TOKENIZER_FILE",
    "WEIGHTS_FILE",
    "LoadedModel",
    "export_safetensors",
    "exported_step",
    "latest_checkpoint",
    "load_native",
    "preload_hook",
    "read_checkpoint",
]

CHECKPOINT_KEY = "lmexp"  # lmexp's entry in Lightning checkpoints: RNG, schedule, tokenizer

EXPORT_FORMAT = 2  # 2: config.json lists the transforms applied ("transforms"); 1 had none
WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"


@dataclass
class LoadedModel:
    """A network ready for inference, with what is needed to feed it text."""

    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer | None
    objective: str | None = None
    inputs: dict[str, Any] | None = None
    """How a classifier's training data framed its inputs (columns, max length), for predict."""
    transforms: list[dict[str, Any]] = field(default_factory=list)
    """What was done to the trained weights, in order (pruning, quantization, distillation): each a
    dict with at least ``method``; one with ``rebuild`` names the pre-load hook that rebuilt the
    network's layers (quantized linears) before its weights loaded."""

    @property
    def rebuilt(self) -> bool:
        """Whether the network's layers are no longer lmexp's own (quantized): it runs, but cannot
        be trained or have its weights copied into a fresh network."""
        return any("rebuild" in transform for transform in self.transforms)


PRELOAD_HOOKS = "lmexp.preload_hooks"
"""Entry-point group of pre-load hooks: ``name = "package.module:function"``, where
``function(model, transform) -> nn.Module`` rebuilds a freshly built network (e.g. swaps its
linear layers for quantized ones) so that the weights a transform saved load into it."""


def preload_hook(name: str) -> Callable[[nn.Module, dict[str, Any]], nn.Module]:
    """The pre-load hook registered as `name` by an installed package."""
    found = entry_points(group=PRELOAD_HOOKS, name=name)
    if not found:
        known = sorted(point.name for point in entry_points(group=PRELOAD_HOOKS))
        raise CheckpointError(
            f"the weights need the pre-load hook {name!r}, which no installed package provides "
            f"(installed: {', '.join(known) or 'none'}): install the package that wrote them (lmexp with its compression toolkit)"
        )
    return next(iter(found)).load()


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` a Lightning checkpoint safely (``weights_only=True``), with one-line errors.

    ``mmap=True`` maps the tensors instead of reading them: a cheap check that a file is a
    complete checkpoint, and a way to read its small entries (``global_step``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist: pass the path of a .ckpt file or an export folder")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, whose index comes last
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or not a checkpoint (not a complete archive as torch.save "
            "writes): pass a .ckpt written by lmexp, such as checkpoints/last.ckpt"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises several types for truncated, corrupt or foreign files
        # torch's messages run to paragraphs (the weights-only one explains its history): keep
        # the first sentence, which says what failed.
        first = (str(err).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read safely ({type(err).__name__}: {first}): "
            "pass a .ckpt written by lmexp, such as checkpoints/last.ckpt"
        ) from None


RESUMABLE = ("last.ckpt", "interrupted.ckpt")  # what training writes as it goes, and on a stop


def latest_checkpoint(folder: str | Path, names: tuple[str, ...] = RESUMABLE) -> Path | None:
    """The newest complete checkpoint of a run, whichever file holds it.

    After a crash, Ctrl-C or SIGTERM, ``interrupted.ckpt`` is newer than ``last.ckpt``; after a
    finished run the reverse. The one with the most optimizer steps wins (the newer file on a
    tie); a file that cannot be read (cut short by a crash while it was written) is passed over.
    """
    found: list[tuple[int, float, Path]] = []
    for name in names:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            step = int(read_checkpoint(path, mmap=True).get("global_step", 0))
        except CheckpointError:
            continue
        found.append((step, path.stat().st_mtime, path))
    return max(found)[2] if found else None


def load_native(path: str | Path) -> LoadedModel:
    """Load a ``.ckpt`` written by an lmexp objective, or a folder written by ``export_safetensors``."""
    path = Path(path)
    if path.is_dir():
        return _load_export(path)
    checkpoint = read_checkpoint(path)
    network = checkpoint.get("hyper_parameters", {}).get("network")
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith(prefix)}
    extra = checkpoint.get(CHECKPOINT_KEY, {})
    transforms = extra.get("transforms", [])
    config, model = _build(network, path, lambda model: model.load_state_dict(state), transforms)
    tokenizer = tokenizer_from_json(extra["tokenizer"]) if "tokenizer" in extra else None
    return LoadedModel(model.eval(), config, tokenizer, extra.get("objective"), extra.get("inputs"), transforms)


def _load_export(folder: Path) -> LoadedModel:
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{str(folder)!r} has no {CONFIG_FILE}: pass a folder written by the export")
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{str(folder / CONFIG_FILE)!r} is not valid JSON ({error}): re-export the model") from None
    if not isinstance(meta, dict) or "model" not in meta or not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"{str(folder)!r} is not an lmexp export (its {CONFIG_FILE} has no 'model' entry or "
            f"{WEIGHTS_FILE} is missing): pass a folder written by lmexp, such as checkpoints/best"
        )
    written = meta.get("format", 1)
    if not isinstance(written, int) or written > EXPORT_FORMAT:
        raise CheckpointError(
            f"{str(folder)!r} was written in export format {written!r}, newer than this lmexp reads "
            f"(up to {EXPORT_FORMAT}): upgrade lmexp"
        )
    transforms = meta.get("transforms", [])
    config, model = _build(meta["model"], folder, lambda model: _load_weights(model, folder / WEIGHTS_FILE), transforms)
    tokenizer_path = folder / TOKENIZER_FILE
    tokenizer = None
    if tokenizer_path.is_file():
        try:
            tokenizer = load_tokenizer(tokenizer_path)
        except Exception as error:  # the tokenizers library raises bare Exceptions
            raise _damaged(tokenizer_path, error) from None
    return LoadedModel(model.eval(), config, tokenizer, meta.get("objective"), meta.get("inputs"), transforms)


def _load_weights(model: nn.Module, path: Path) -> None:
    try:
        load_model(model, str(path))
    except SafetensorError as error:
        raise _damaged(path, error) from None


def _damaged(path: Path, error: Exception) -> CheckpointError:
    """A one-line error for a file of an export that is cut short or garbled."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return CheckpointError(f"{str(path)!r} is damaged or cut short ({first_line}): re-export the model, "
                           "or load its .ckpt instead")


def _build(
    network: Any, path: Path, load_weights: Callable[[nn.Module], Any], transforms: list[dict[str, Any]]
) -> tuple[ModelConfig, nn.Module]:
    """The model a checkpoint or export describes, rebuilt by the pre-load hooks its transforms
    name, with its weights; one-line errors otherwise."""
    if not isinstance(network, dict):
        raise CheckpointError(f"{str(path)!r} is not an lmexp checkpoint (no model config inside)")
    if not isinstance(transforms, list) or not all(isinstance(t, dict) and "method" in t for t in transforms):
        raise CheckpointError(f"{str(path)!r} has a malformed transforms list: re-export the model")
    try:
        config = ModelConfig().replace(**network)
    except ConfigError as error:
        raise CheckpointError(f"{str(path)!r} has a model config lmexp cannot use ({error})") from None
    model = build_model(config)
    for transform in transforms:
        if "rebuild" in transform:
            model = preload_hook(transform["rebuild"])(model, transform)
    try:
        load_weights(model)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"{str(path)!r} holds weights that do not fit its model config ({first_line}): "
            "pass a checkpoint or export written by lmexp, unedited"
        ) from None
    return config, model


def export_safetensors(
    model: nn.Module,
    config: ModelConfig,
    folder: str | Path,
    tokenizer: Tokenizer | None = None,
    objective: str | None = None,
    inputs: dict[str, Any] | None = None,
    transforms: list[dict[str, Any]] | None = None,
    global_step: int | None = None,
) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``tokenizer.json`` as the folder ``folder``
    (``inputs``: how a classifier frames its inputs; ``transforms``: what was done to the trained
    weights, see ``LoadedModel.transforms``; ``global_step``: the training step of the weights, so
    an export can be matched with its checkpoint; all kept in ``config.json``).

    The folder is replaced as a whole (lmexp.atomic.replace_folder): a reader, or a crash, sees
    the previous export or the new one, never a mix of the two."""
    meta = {"format": EXPORT_FORMAT, "model": config.to_dict(), "objective": objective, "transforms": transforms or []}
    if inputs is not None:
        meta["inputs"] = inputs
    if global_step is not None:
        meta["global_step"] = int(global_step)

    def fill(temporary: Path) -> None:
        save_model(model, str(temporary / WEIGHTS_FILE))  # handles tied embeddings
        fault_point("export.write", path=folder)
        (temporary / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save(str(temporary / TOKENIZER_FILE))

    return replace_folder(folder, fill, fault="export.write")


def exported_step(folder: str | Path) -> int | None:
    """The training step an export's weights come from (None: not recorded, or no readable export)."""
    try:
        meta = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    step = meta.get("global_step") if isinstance(meta, dict) else None
    return step if isinstance(step, int) else None
