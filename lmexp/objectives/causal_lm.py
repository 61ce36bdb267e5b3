"""Causal language modelling: predict each next token (GPT, LSTM)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from lmexp.errors import ConfigError, check_positive
from lmexp.models import ModelConfig
from lmexp.objectives.language_model import LanguageModelObjective, LMStep


class CausalLM(LanguageModelObjective):
    """Next-token cross-entropy, with optional label smoothing during training.

    Continue a pretrained GPT on new text with ``pretrained: PATH`` (its tokenizer encodes
    the new text).

    Args:
        label_smoothing: Mass spread over the vocabulary in the training loss (0 disables);
            validation and test always report the plain negative log-likelihood.
        continuation_passages: At test, also continue this many held-out passages of the test
            split greedily and score the continuations against the true text: ``test/bleu`` and
            ``test/rougeL`` (0 disables).
        continuation_prompt_tokens: Tokens of each passage given as the prompt.
        continuation_tokens: Tokens generated and compared with the passage's next ones.
        **kwargs: See ``TrainingObjective``.
    """

    task: ClassVar[str] = "causal_lm"

    def __init__(
        self,
        network: str | ModelConfig = "gpt-nano",
        label_smoothing: float = 0.0,
        continuation_passages: int = 0,
        continuation_prompt_tokens: int = 32,
        continuation_tokens: int = 32,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={label_smoothing} must be in [0, 1), e.g. 0.1")
        if continuation_passages < 0:
            raise ConfigError(f"continuation_passages={continuation_passages} is negative: use 0 (off) or more")
        check_positive("continuation_prompt_tokens", continuation_prompt_tokens)
        check_positive("continuation_tokens", continuation_tokens)
        super().__init__(network, **kwargs)
        if continuation_passages and continuation_prompt_tokens + continuation_tokens > self.block_size:
            raise ConfigError(
                f"continuation_prompt_tokens + continuation_tokens = {continuation_prompt_tokens + continuation_tokens} "
                f"exceeds the context of {self.block_size} tokens: shorten them"
            )
        self.label_smoothing = label_smoothing
        self._test_passages: list[list[int]] = []

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

    def lm_step(self, batch: dict[str, torch.Tensor], stage: str) -> LMStep:
        if "document_ids" in batch:  # packed pairs: each sees only itself (the data refuses an lstm)
            logits = self.model(batch["input_ids"], document_ids=batch["document_ids"])
        else:  # right padding never reaches a real token of a causal model: the fused kernel stays
            logits = self.model(batch["input_ids"])  # (B, T, V)
        flat_logits, flat_labels = logits.flatten(0, 1), batch["labels"].flatten()
        # Training optimizes the smoothed loss; evaluation reports the plain NLL.
        smoothing = self.label_smoothing if stage == "train" else 0.0
        if stage == "train":
            loss = F.cross_entropy(flat_logits, flat_labels, label_smoothing=smoothing)
            return LMStep(loss, loss, None, {}, {"logits": logits})
        # Evaluation windows mark context-only and padding positions -100: sum over the rest.
        targets = flat_labels != -100
        nll = F.cross_entropy(flat_logits, flat_labels, reduction="sum") / targets.sum().clamp(min=1)
        correct = ((flat_logits.argmax(-1) == flat_labels) & targets).sum()
        return LMStep(nll, nll, correct, {}, {"logits": logits})

    def scored_rows(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return logits[batch["labels"] != -100]  # (N, V): padding and context-only positions out

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self.hparams.continuation_passages:
            self._score_continuations()

    def _score_continuations(self) -> None:
        """BLEU and ROUGE-L of greedy continuations of evenly spaced test passages."""
        from lmexp.text_metrics import continuation_scores

        datamodule = getattr(self.trainer, "datamodule", None)
        cache, tokenizer = getattr(datamodule, "cache", None), getattr(datamodule, "tokenizer", None)
        if cache is None or tokenizer is None:
            return
        tokens = cache.tokens("test")
        length = self.hparams.continuation_prompt_tokens + self.hparams.continuation_tokens
        n = min(self.hparams.continuation_passages, len(tokens) // length)
        if n == 0:
            return
        starts = [round(i * (len(tokens) - length) / max(n - 1, 1)) for i in range(n)]
        passages = [tokens[start : start + length].astype("int64").tolist() for start in starts]
        scores = continuation_scores(self.model, tokenizer, passages, self.hparams.continuation_prompt_tokens,
                                     self.hparams.continuation_tokens)
        # Every rank scores the same passages: the values agree, sync_dist only says so.
        self.log_dict({"test/bleu": float(scores["bleu"]), "test/rougeL": float(scores["rougeL"])}, sync_dist=True)
