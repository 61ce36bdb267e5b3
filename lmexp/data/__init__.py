"""Data pipeline: sources, cleaning, tokenizers, the token cache and the DataModule."""

from lmexp.data.batches import TokenBatches, causal_lm_batch
from lmexp.data.cache import TokenCache, build_token_cache
from lmexp.data.cleaning import CleaningReport, clean_documents, clean_text
from lmexp.data.datamodule import TextDataModule
from lmexp.data.masking import MLMBatchTransform
from lmexp.data.sources import Document, read_documents
from lmexp.data.tokenizer import load_tokenizer, special_tokens_for, tokenizer_hash, train_tokenizer

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
    "tokenizer_hash",
    "train_tokenizer",
]
