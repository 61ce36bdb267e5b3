"""lmexp: train, sweep, track and compress language models with PyTorch Lightning."""

from lmexp.checkpoints import LoadedModel, export_safetensors, load_checkpoint
from lmexp.data import TextDataModule, train_tokenizer
from lmexp.errors import CheckpointError, ConfigError, DataError, LmexpError
from lmexp.generation import generate
from lmexp.models import BERT, GPT, LSTMLM, ModelConfig, build_model, from_name
from lmexp.objectives import CausalLM, LanguageModelObjective, MaskedLM

__version__ = "0.1.0"

__all__ = [
    "BERT",
    "GPT",
    "LSTMLM",
    "CausalLM",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "LanguageModelObjective",
    "LmexpError",
    "LoadedModel",
    "MaskedLM",
    "ModelConfig",
    "TextDataModule",
    "build_model",
    "export_safetensors",
    "from_name",
    "generate",
    "load_checkpoint",
    "train_tokenizer",
]
