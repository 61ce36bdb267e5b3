"""Masked language modelling (BERT), optionally with sentence-order prediction (ALBERT)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lmexp.errors import ConfigError
from lmexp.models import ModelConfig
from lmexp.objectives.base import attached_trainer
from lmexp.objectives.language_model import LanguageModelObjective, LMStep


class MaskedLM(LanguageModelObjective):
    """Cross-entropy on the masked positions only; masking itself happens in the data pipeline.

    Args:
        sop_weight: Weight of the sentence-order loss when batches carry ``sop_labels``
            (``data.sentence_order: true``).
        **kwargs: See ``TrainingObjective``.
    """

    task: ClassVar[str] = "masked_lm"
    reports_bits_per_byte: ClassVar[bool] = False  # only the masked 15% are predicted

    def __init__(self, network: str | ModelConfig = "bert-mini", sop_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(network, **kwargs)
        self.sop_weight = sop_weight

    def check_network(self, config: ModelConfig) -> None:
        if config.arch != "bert":
            raise ConfigError(
                f"MaskedLM needs a bert network, but {self._describe_source()} is arch={config.arch!r}: "
                "use a bert-* preset or a BERT checkpoint"
            )

    def with_heads(self, config: ModelConfig) -> ModelConfig:
        # An encoder without a masked-LM head gets a fresh one (reported when the weights load).
        return config.replace(mlm_head=True) if config.arch == "bert" else config  # check_network refuses the rest

    def read_data(self, datamodule: Any) -> None:
        super().read_data(datamodule)
        # Sentence order reads the pooler and its own head: a start without them gets fresh ones.
        if not getattr(datamodule, "sentence_order", False) or self.network_config.arch != "bert":
            return
        self.network_config = self.network_config.replace(sop_head=True, pooler=True)
        made = self.model.add_heads(self.network_config) if self.model is not None else []
        if made:
            rank_zero_info(f"MaskedLM: new {', '.join(made)} for sentence order on top of {self.hparams.pretrained}")

    def unused_modules(self) -> list[nn.Module]:
        unused = [self.model.classifier] if self.model.classifier is not None else []
        # Without sentence-order labels the SOP head (and the pooler feeding it) get no gradient.
        if not self.uses_sentence_order():
            unused += [module for module in (self.model.sop_head, self.model.pooler) if module is not None]
        return unused

    def uses_sentence_order(self) -> bool:
        trainer = attached_trainer(self)
        datamodule = trainer.datamodule if trainer is not None else None
        return bool(getattr(datamodule, "sentence_order", True))

    def lm_step(self, batch: dict[str, torch.Tensor], stage: str) -> LMStep:
        hidden = self.model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))
        labels = batch["labels"]
        selected = labels != -100
        # Project only the masked positions onto the vocabulary: ~15% of the work.
        logits = self.model.mlm_logits(hidden[selected])  # (N_selected, V)
        targets = labels[selected]
        # Sums over max(N, 1): a batch where no token was selected gives 0, not NaN.
        n_selected = max(targets.numel(), 1)
        nll = F.cross_entropy(logits, targets, reduction="sum") / n_selected
        correct = (logits.argmax(-1) == targets).sum()
        metrics = {"mlm_acc": correct / n_selected} if stage == "train" else {}
        loss = nll
        if "sop_labels" in batch:
            sop_logits = self.model.sop_head(self.model.pool(hidden))
            sop_loss = F.cross_entropy(sop_logits, batch["sop_labels"])
            loss = loss + self.sop_weight * sop_loss
            metrics["sop_loss"] = sop_loss
            metrics["sop_acc"] = (sop_logits.argmax(-1) == batch["sop_labels"]).float().mean()
        return LMStep(loss, nll, correct, metrics, {"logits": logits, "hidden": hidden})
