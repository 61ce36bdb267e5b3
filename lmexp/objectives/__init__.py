"""LightningModules that train ``lmexp.models`` networks with an objective."""

from lmexp.objectives.base import TrainingObjective, resolve_network
from lmexp.objectives.causal_lm import CausalLM
from lmexp.objectives.classification import SequenceClassification
from lmexp.objectives.language_model import LanguageModelObjective
from lmexp.objectives.masked_lm import MaskedLM
from lmexp.objectives.schedule import warmup_cosine, warmup_stable_decay

__all__ = [
    "CausalLM", "LanguageModelObjective", "MaskedLM", "SequenceClassification", "TrainingObjective",
    "resolve_network", "warmup_cosine", "warmup_stable_decay",
]
