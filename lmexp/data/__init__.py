"""Data pipeline: sources, cleaning, tokenizers, the token cache and the DataModule.

``TextDataModule`` (the only Lightning piece) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmexp.data.batches import TokenBatches, causal_lm_batch
from lmexp.data.cache import TokenCache, build_token_cache
from lmexp.data.cleaning import CleaningReport, clean_documents, clean_text
from lmexp.data.masking import MLMBatchTransform
from lmexp.data.sources import Document, read_documents
from lmexp.data.tokenizer import load_tokenizer, special_tokens_for, train_tokenizer

if TYPE_CHECKING:
    from lmexp.data.datamodule import TextDataModule


def __getattr__(name: str) -> Any:
    if name == "TextDataModule":
        from lmexp.data.datamodule import TextDataModule

        return TextDataModule
    raise AttributeError(f"module 'lmexp.data' has no attribute {name!r}")


__all__ = [
    "CleaningReport",
    "Document",
    "MLMBatchTransform",
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
