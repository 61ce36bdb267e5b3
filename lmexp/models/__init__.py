"""Language model architectures (pure PyTorch), their configuration, and finders for their parts.

GPT, BERT and LSTMLM answer the same calls: ``hidden_states(input_ids, attention_mask=None,
token_type_ids=None)``, ``logits(...)`` (the language-model head over every position) and,
for the transformers, ``pooled(...)`` and ``classify(...)``; ``accepts_attention_mask`` says
whether ``forward`` can read a left-padded batch.
"""

from __future__ import annotations

from torch import nn

from lmexp.models.bert import BERT
from lmexp.models.config import PRESETS, ModelConfig, from_name
from lmexp.models.gpt import GPT
from lmexp.models.kv_cache import KVCache
from lmexp.models.lstm import LSTMLM
from lmexp.models.parts import (
    BLOCK_ROLES,
    BLOCKS_PREFIX,
    BlockLinears,
    block_linears,
    block_modules,
    keep_heads_and_neurons,
    key_in_blocks,
    linear_layers,
    transformer_blocks,
)

__all__ = [
    "BERT",
    "BLOCKS_PREFIX",
    "BLOCK_ROLES",
    "GPT",
    "LSTMLM",
    "PRESETS",
    "BlockLinears",
    "KVCache",
    "ModelConfig",
    "block_linears",
    "block_modules",
    "build_model",
    "count_parameters",
    "from_name",
    "keep_heads_and_neurons",
    "key_in_blocks",
    "linear_layers",
    "transformer_blocks",
]

_ARCHITECTURES: dict[str, type[nn.Module]] = {"gpt": GPT, "bert": BERT, "lstm": LSTMLM}


def build_model(config: ModelConfig) -> nn.Module:
    """The model for config.arch; raises ConfigError while vocab_size is unset."""
    config.require_vocab_size()
    return _ARCHITECTURES[config.arch](config)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values; tied weights are one Parameter, which parameters() yields once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
