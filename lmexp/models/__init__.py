"""Language model architectures (pure PyTorch) and their configuration."""

from __future__ import annotations

from torch import nn

from lmexp.models.bert import BERT
from lmexp.models.config import PRESETS, ModelConfig, from_name
from lmexp.models.gpt import GPT
from lmexp.models.kv_cache import KVCache
from lmexp.models.lstm import LSTMLM

__all__ = [
    "BERT",
    "GPT",
    "LSTMLM",
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "build_model",
    "count_parameters",
    "from_name",
]

_ARCHITECTURES: dict[str, type[nn.Module]] = {"gpt": GPT, "bert": BERT, "lstm": LSTMLM}


def build_model(config: ModelConfig) -> nn.Module:
    """The model for config.arch; raises ConfigError while vocab_size is unset."""
    config.require_vocab_size()
    return _ARCHITECTURES[config.arch](config)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values; tied weights are one Parameter, which parameters() yields once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
