"""lmexp: an experiment platform for GPT and BERT language models on PyTorch Lightning:
pre-training, fine-tuning and evaluation.

Names are imported on first use, so ``import lmexp.models`` (plain PyTorch) stays free of
Lightning and fast to import.

The client API is what this package exports and the ``__all__`` of the modules in
``CLIENT_MODULES``; programs built on lmexp (``compression``, ``sweeps``) import nothing else, so
everything else may change without notice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

CLIENT_MODULES = (
    "lmexp",
    "lmexp.models",
    "lmexp.data",
    "lmexp.objectives",
    "lmexp.errors",
    "lmexp.hardware",
    "lmexp.checkpoints",
    "lmexp.runs",
    "lmexp.tracking",
    "lmexp.mlflow_store",
    "lmexp.atomic",
    "lmexp.arguments",
)
"""The modules a program built on lmexp may import from, and from each only the names in its ``__all__``."""

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
    "StorageError": "lmexp.errors",
    "LoadedModel": "lmexp.checkpoints",
    "export_checkpoint": "lmexp.checkpoints",
    "export_safetensors": "lmexp.checkpoints",
    "load_checkpoint": "lmexp.checkpoints",
    "export_hf": "lmexp.formats.huggingface",
    "generate": "lmexp.generation",
    "Task": "lmexp.data",
    "train_tokenizer": "lmexp.data",
    "TextDataModule": "lmexp.data",
    "ClassificationDataModule": "lmexp.data",
    "SFTDataModule": "lmexp.data",
    "ChatTemplate": "lmexp.data",
    "SequenceClassification": "lmexp.objectives",
    "TrainingObjective": "lmexp.objectives",
    "CausalLM": "lmexp.objectives",
    "SFT": "lmexp.objectives",
    "LanguageModelObjective": "lmexp.objectives",
    "MaskedLM": "lmexp.objectives",
    "MLflowTracker": "lmexp.tracking",
    "Configured": "lmexp.runs",
    "Run": "lmexp.runs",
    "build": "lmexp.runs",
    "check": "lmexp.runs",
    "configure": "lmexp.runs",
}
__all__ = [
    "BERT",
    "CLIENT_MODULES",
    "GPT",
    "LSTMLM",
    "SFT",
    "CausalLM",
    "ChatTemplate",
    "CheckpointError",
    "ClassificationDataModule",
    "ConfigError",
    "Configured",
    "DataError",
    "LanguageModelObjective",
    "LmexpError",
    "LoadedModel",
    "MLflowTracker",
    "MaskedLM",
    "ModelConfig",
    "Run",
    "SFTDataModule",
    "SequenceClassification",
    "StorageError",
    "Task",
    "TextDataModule",
    "TrainingObjective",
    "build",
    "build_model",
    "check",
    "configure",
    "export_checkpoint",
    "export_hf",
    "export_safetensors",
    "from_name",
    "generate",
    "load_checkpoint",
    "train_tokenizer",
]  # _EXPORTS and CLIENT_MODULES (tests/test_layering.py checks)

if TYPE_CHECKING:
    from lmexp.checkpoints import LoadedModel, export_checkpoint, export_safetensors, load_checkpoint
    from lmexp.data import ChatTemplate, ClassificationDataModule, SFTDataModule, Task, TextDataModule, train_tokenizer
    from lmexp.errors import CheckpointError, ConfigError, DataError, LmexpError, StorageError
    from lmexp.formats.huggingface import export_hf
    from lmexp.generation import generate
    from lmexp.models import BERT, GPT, LSTMLM, ModelConfig, build_model, from_name
    from lmexp.objectives import (
        SFT,
        CausalLM,
        LanguageModelObjective,
        MaskedLM,
        SequenceClassification,
        TrainingObjective,
    )
    from lmexp.runs import Configured, Run, build, check, configure
    from lmexp.tracking import MLflowTracker


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmexp' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
