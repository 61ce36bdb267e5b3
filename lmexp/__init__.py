"""lmexp: an experiment platform for GPT and BERT language models on PyTorch Lightning:
pre-training, fine-tuning and evaluation.

Names are imported on first use, so ``import lmexp.models`` (plain PyTorch) stays free of
Lightning and fast to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "BERT": "lmexp.models",
    "GPT": "lmexp.models",
    "LSTMLM": "lmexp.models",
    "ModelConfig": "lmexp.models",
    "build_model": "lmexp.models",
    "from_name": "lmexp.models",
    "CheckpointError": "lmexp.errors",
    "ConfigError": "lmexp.errors",
    "DataError": "lmexp.errors",
    "LmexpError": "lmexp.errors",
    "LoadedModel": "lmexp.checkpoints",
    "export_safetensors": "lmexp.checkpoints",
    "load_checkpoint": "lmexp.checkpoints",
    "export_hf": "lmexp.huggingface",
    "generate": "lmexp.generation",
    "train_tokenizer": "lmexp.data",
    "TextDataModule": "lmexp.data",
    "ClassificationDataModule": "lmexp.data",
    "SequenceClassification": "lmexp.objectives",
    "TrainingObjective": "lmexp.objectives",
    "CausalLM": "lmexp.objectives",
    "LanguageModelObjective": "lmexp.objectives",
    "MaskedLM": "lmexp.objectives",
    "MLflowTracker": "lmexp.tracking",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from lmexp.checkpoints import LoadedModel, export_safetensors, load_checkpoint
    from lmexp.data import ClassificationDataModule, TextDataModule, train_tokenizer
    from lmexp.errors import CheckpointError, ConfigError, DataError, LmexpError
    from lmexp.generation import generate
    from lmexp.huggingface import export_hf
    from lmexp.models import BERT, GPT, LSTMLM, ModelConfig, build_model, from_name
    from lmexp.objectives import CausalLM, LanguageModelObjective, MaskedLM, SequenceClassification, TrainingObjective
    from lmexp.tracking import MLflowTracker


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmexp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
