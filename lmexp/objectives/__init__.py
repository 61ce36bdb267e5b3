"""LightningModules that train ``lmexp.models`` networks with an objective, and the training
pieces they bring along (exact resume, throughput, gradient clipping)."""

from lmexp.objectives.base import TrainingObjective, attached_trainer, resolve_network
from lmexp.objectives.causal_lm import CausalLM
from lmexp.objectives.classification import SequenceClassification
from lmexp.objectives.language_model import LanguageModelObjective, LMStep
from lmexp.objectives.masked_lm import MaskedLM
from lmexp.objectives.optimizers import clip_gradients
from lmexp.objectives.resume import ExactResume
from lmexp.objectives.schedule import warmup_cosine, warmup_stable_decay
from lmexp.objectives.sft import SFT
from lmexp.objectives.throughput import Throughput

__all__ = [
    "SFT", "CausalLM", "ExactResume", "LMStep", "LanguageModelObjective", "MaskedLM", "SequenceClassification",
    "Throughput", "TrainingObjective", "attached_trainer", "clip_gradients", "resolve_network", "warmup_cosine",
    "warmup_stable_decay",
]
