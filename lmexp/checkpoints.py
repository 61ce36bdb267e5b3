"""Load trained networks without Lightning or the CLI, whatever format holds them, and export them.

Compression tools, evaluation scripts and ``lmexp generate`` all come through here: one
function turns a Lightning ``.ckpt``, an lmexp export folder or a transformers folder into a
plain ``nn.Module``, its config and its tokenizer. The formats themselves live in
``lmexp.formats``; their names a client needs are re-exported here.
"""

from __future__ import annotations

from pathlib import Path

from lmexp.errors import ConfigError
from lmexp.formats.huggingface import export_hf, is_hf_directory, load_hf
from lmexp.formats.native import (
    CHECKPOINT_KEY,
    CONFIG_FILE,
    EXPORT_FORMAT,
    PRELOAD_HOOKS,
    RESUMABLE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    LoadedModel,
    export_safetensors,
    exported_step,
    latest_checkpoint,
    load_native,
    preload_hook,
    read_checkpoint,
)

__all__ = [
    "CHECKPOINT_KEY",
    "CONFIG_FILE",
    "EXPORT_FORMAT",
    "PRELOAD_HOOKS",
    "RESUMABLE",
    "TOKENIZER_FILE",
    "WEIGHTS_FILE",
    "LoadedModel",
    "export_checkpoint",
    "export_safetensors",
    "exported_step",
    "latest_checkpoint",
    "load_checkpoint",
    "local_checkpoint",
    "preload_hook",
    "read_checkpoint",
]


def load_checkpoint(path: str | Path) -> LoadedModel:
    """Load a ``.ckpt`` written by an lmexp objective, a folder written by ``export_safetensors``,
    a transformers folder (``save_pretrained``) of a BERT or GPT-2, or a model of the MLflow
    tracking store (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/m-<id>``: its
    export, downloaded once into ``~/.cache/lmexp/models``)."""
    path = local_checkpoint(path)
    if path.is_dir() and is_hf_directory(path):
        return load_hf(path)
    return load_native(path)


def local_checkpoint(path: str | Path) -> Path:
    """The local file or folder ``path`` names: a ``models:/`` URI is downloaded (once) from the
    tracking store (``$MLFLOW_TRACKING_URI``, else ./mlflow.db); anything else is a path."""
    if isinstance(path, str) and path.startswith("models:/"):
        from lmexp.mlflow_models import resolve_model_uri

        return resolve_model_uri(path)
    return Path(path)


def export_checkpoint(checkpoint: str, output: str, overwrite: bool = False) -> Path:
    """Write an lmexp checkpoint as a transformers folder that ``from_pretrained`` loads.

    Args:
        checkpoint: A ``.ckpt`` written by lmexp fit, or an lmexp export folder.
        output: The folder to write: config.json, model.safetensors, tokenizer.json, tokenizer_config.json.
        overwrite: Replace the files of an earlier export in ``output``.
    """
    target = Path(output)
    if (target / CONFIG_FILE).exists() and not overwrite:
        raise ConfigError(f"{output!r} already holds a {CONFIG_FILE}: choose another folder or pass --overwrite true")
    if target.is_dir() and not (target / CONFIG_FILE).exists() and any(target.iterdir()):
        # The export replaces its folder as a whole: other files there would be lost.
        raise ConfigError(f"{output!r} holds files but no export: choose a new or empty folder")
    loaded = load_checkpoint(checkpoint)
    if loaded.rebuilt:
        methods = ", ".join(t["method"] for t in loaded.transforms)
        raise ConfigError(
            f"{checkpoint!r} is quantized ({methods}), which transforms' BERT and GPT-2 classes cannot load: "
            "export the checkpoint before quantization"
        )
    return export_hf(loaded.model, loaded.config, target, loaded.tokenizer)
