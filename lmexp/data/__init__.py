"""Data pipeline: sources, cleaning, tokenizers, the token cache and the DataModule.

The data modules (``TextDataModule``, ``ClassificationDataModule``: the Lightning pieces) are
imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmexp.data.batches import TokenBatches, causal_lm_batch
from lmexp.data.cache import TokenCache, build_token_cache
from lmexp.data.cleaning import CleaningReport, clean_documents, clean_text
from lmexp.data.contract import Task
from lmexp.data.masking import MLMBatchTransform
from lmexp.data.sources import Document, read_documents
from lmexp.data.tokenizer import load_tokenizer, special_tokens_for, train_tokenizer

if TYPE_CHECKING:
    from lmexp.data.classification import ClassificationDataModule
    from lmexp.data.datamodule import TextDataModule

_DATA_MODULES = {"TextDataModule": "lmexp.data.datamodule", "ClassificationDataModule": "lmexp.data.classification"}


def __getattr__(name: str) -> Any:
    if name in _DATA_MODULES:
        import importlib

        return getattr(importlib.import_module(_DATA_MODULES[name]), name)
    raise AttributeError(f"module 'lmexp.data' has no attribute {name!r}")


__all__ = [
    "ClassificationDataModule",
    "CleaningReport",
    "Document",
    "MLMBatchTransform",
    "Task",
    "TextDataModule",
    "TokenBatches",
    "TokenCache",
    "build_token_cache",
    "causal_lm_batch",
    "clean_documents",
    "clean_text",
    "load_tokenizer",
    "read_documents",
    "special_tokens_for",
    "train_tokenizer",
]
