"""Causal language modelling: predict each next token (GPT, LSTM)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from lmexp.errors import ConfigError
from lmexp.models import ModelConfig
from lmexp.objectives.language_model import LanguageModelObjective


class CausalLM(LanguageModelObjective):
    """Next-token cross-entropy, with optional label smoothing during training.

    Continue a pretrained GPT on new text with ``pretrained: PATH`` (its tokenizer encodes
    the new text).

    Args:
        label_smoothing: Mass spread over the vocabulary in the training loss (0 disables);
            validation and test always report the plain negative log-likelihood.
        **kwargs: See ``TrainingObjective``.
    """

    task: ClassVar[str] = "causal_lm"

    def __init__(
        self, network: str | ModelConfig = "gpt-nano", label_smoothing: float = 0.0, **kwargs: Any
    ) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={label_smoothing} must be in [0, 1), e.g. 0.1")
        super().__init__(network, **kwargs)
        self.label_smoothing = label_smoothing

    def check_network(self, config: ModelConfig) -> None:
        if config.arch == "bert":
            raise ConfigError(
                f"CausalLM needs a causal network (gpt or lstm), but {self._describe_source()} is a bert: "
                "use a GPT checkpoint or preset, or MaskedLM for bert"
            )

    def unused_modules(self) -> list[torch.nn.Module]:
        classifier = getattr(self.model, "classifier", None)
        return [classifier] if classifier is not None else []

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def lm_loss(self, batch: dict[str, torch.Tensor], stage: str):
        logits = self.model(batch["input_ids"])  # (B, T, V)
        flat_logits, flat_labels = logits.flatten(0, 1), batch["labels"].flatten()
        # Training optimizes the smoothed loss; evaluation reports the plain NLL.
        smoothing = self.label_smoothing if stage == "train" else 0.0
        if stage == "train":
            loss = F.cross_entropy(flat_logits, flat_labels, label_smoothing=smoothing)
            return loss, loss, None, {}
        # Evaluation windows mark context-only and padding positions -100: sum over the rest.
        targets = flat_labels != -100
        nll = F.cross_entropy(flat_logits, flat_labels, reduction="sum") / targets.sum().clamp(min=1)
        correct = ((flat_logits.argmax(-1) == flat_labels) & targets).sum()
        return nll, nll, correct, {}
