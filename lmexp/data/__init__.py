"""Data pipeline: sources, cleaning, tokenizers, the token cache and the DataModule.

Every name is imported on first use, so that a token cache worker process (which imports
``lmexp.data.shards``) loads neither torch nor Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmexp.data.batches import TokenBatches, causal_lm_batch
    from lmexp.data.cache import TokenCache, build_token_cache, prepare_token_cache
    from lmexp.data.chat import TEMPLATES, ChatTemplate
    from lmexp.data.classification import ClassificationDataModule
    from lmexp.data.cleaning import CleaningReport, clean_documents, clean_text
    from lmexp.data.contract import Task
    from lmexp.data.datamodule import TextDataModule
    from lmexp.data.masking import MLMBatchTransform
    from lmexp.data.pairs import Conversation, SFTDataModule, read_conversations
    from lmexp.data.sources import Document, read_documents
    from lmexp.data.tokenizer import load_tokenizer, special_tokens_for, train_tokenizer

_EXPORTS = {
    "TokenBatches": "lmexp.data.batches",
    "causal_lm_batch": "lmexp.data.batches",
    "TEMPLATES": "lmexp.data.chat",
    "ChatTemplate": "lmexp.data.chat",
    "TokenCache": "lmexp.data.cache",
    "build_token_cache": "lmexp.data.cache",
    "prepare_token_cache": "lmexp.data.cache",
    "ClassificationDataModule": "lmexp.data.classification",
    "CleaningReport": "lmexp.data.cleaning",
    "clean_documents": "lmexp.data.cleaning",
    "clean_text": "lmexp.data.cleaning",
    "Task": "lmexp.data.contract",
    "TextDataModule": "lmexp.data.datamodule",
    "MLMBatchTransform": "lmexp.data.masking",
    "Conversation": "lmexp.data.pairs",
    "SFTDataModule": "lmexp.data.pairs",
    "read_conversations": "lmexp.data.pairs",
    "Document": "lmexp.data.sources",
    "read_documents": "lmexp.data.sources",
    "load_tokenizer": "lmexp.data.tokenizer",
    "special_tokens_for": "lmexp.data.tokenizer",
    "train_tokenizer": "lmexp.data.tokenizer",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmexp.data' has no attribute {name!r}")


__all__ = [
    "TEMPLATES",
    "ChatTemplate",
    "ClassificationDataModule",
    "CleaningReport",
    "Conversation",
    "Document",
    "MLMBatchTransform",
    "SFTDataModule",
    "Task",
    "TextDataModule",
    "TokenBatches",
    "TokenCache",
    "build_token_cache",
    "causal_lm_batch",
    "clean_documents",
    "clean_text",
    "load_tokenizer",
    "prepare_token_cache",
    "read_conversations",
    "read_documents",
    "special_tokens_for",
    "train_tokenizer",
]
