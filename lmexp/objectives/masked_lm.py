"""Masked language modelling (BERT), optionally with sentence-order prediction (ALBERT)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmexp.errors import ConfigError
from lmexp.models import ModelConfig
from lmexp.objectives.base import LanguageModelObjective


class MaskedLM(LanguageModelObjective):
    """Cross-entropy on the masked positions only; masking itself happens in the data pipeline.

    Args:
        sop_weight: Weight of the sentence-order loss when batches carry ``sop_labels``
            (``data.sentence_order: true``).
        **kwargs: See ``LanguageModelObjective``.
    """

    data_task: ClassVar[str] = "masked_lm"
    reports_bits_per_byte: ClassVar[bool] = False  # only the masked 15% are predicted

    def __init__(self, network: str | ModelConfig = "bert-mini", sop_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(network, **kwargs)
        if self.network_config.arch != "bert":
            raise ConfigError(f"MaskedLM needs a bert network, got arch={self.network_config.arch!r}: use a bert-* preset")
        self.sop_weight = sop_weight

    def build_heads(self) -> None:
        self.sop_head: nn.Module = nn.Linear(self.network_config.n_embd, 2)

    def compute_loss(self, batch: dict[str, torch.Tensor], stage: str):
        hidden = self.model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
        labels = batch["labels"]
        selected = labels != -100
        # Project only the masked positions onto the vocabulary: ~15% of the work.
        logits = self.model.mlm_logits(hidden[selected])  # (N_selected, V)
        targets = labels[selected]
        # Sums over max(N, 1): a batch where no token was selected gives 0, not NaN.
        n_selected = max(targets.numel(), 1)
        nll = F.cross_entropy(logits, targets, reduction="sum") / n_selected
        metrics = {"mlm_acc": (logits.argmax(-1) == targets).sum() / n_selected}
        loss = nll
        if "sop_labels" in batch:
            sop_logits = self.sop_head(self.model.pool(hidden))
            sop_loss = F.cross_entropy(sop_logits, batch["sop_labels"])
            loss = loss + self.sop_weight * sop_loss
            metrics["sop_loss"] = sop_loss
            metrics["sop_acc"] = (sop_logits.argmax(-1) == batch["sop_labels"]).float().mean()
        return loss, nll, metrics
