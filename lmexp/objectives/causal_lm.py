"""Causal language modelling: predict each next token (GPT, LSTM)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from lmexp.errors import ConfigError
from lmexp.models import ModelConfig
from lmexp.objectives.base import LanguageModelObjective


class CausalLM(LanguageModelObjective):
    """Next-token cross-entropy, with optional label smoothing during training.

    Args:
        label_smoothing: Mass spread over the vocabulary in the training loss (0 disables);
            validation and test always report the plain negative log-likelihood.
        **kwargs: See ``LanguageModelObjective``.
    """

    data_task: ClassVar[str] = "causal_lm"

    def __init__(
        self, network: str | ModelConfig = "gpt-nano", label_smoothing: float = 0.0, **kwargs: Any
    ) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={label_smoothing} must be in [0, 1), e.g. 0.1")
        super().__init__(network, **kwargs)
        if self.network_config.arch == "bert":
            raise ConfigError("CausalLM needs a causal network (gpt or lstm), got a bert config: use MaskedLM for bert")
        self.label_smoothing = label_smoothing

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str):
        logits = self.model(batch["input_ids"])  # (B, T, V)
        flat_logits, flat_labels = logits.flatten(0, 1), batch["labels"].flatten()
        # Training optimizes the smoothed loss; evaluation reports the plain NLL.
        smoothing = self.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(flat_logits, flat_labels, label_smoothing=smoothing)
        return loss, loss, {}
