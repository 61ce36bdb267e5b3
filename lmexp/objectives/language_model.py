"""What the language-model objectives share: per-token loss, perplexity, bits per byte, accuracy."""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn
from torchmetrics import MeanMetric

from lmexp.objectives.base import TrainingObjective

EVAL_STAGES = ("val", "test")


class LMStep(NamedTuple):
    """One batch through a language-model loss."""

    loss: torch.Tensor  # what training optimizes
    nll: torch.Tensor  # mean negative log-likelihood per target: what evaluation reports
    correct: torch.Tensor | None  # correct top-1 predictions, or None
    metrics: dict[str, torch.Tensor]  # extra values to log
    outputs: dict[str, torch.Tensor]  # what the loss was computed from: "logits", ...


class LanguageModelObjective(TrainingObjective):
    """Base of CausalLM and MaskedLM: evaluation metrics are token-weighted over the whole split.

    ``val/loss`` and ``test/loss`` are the mean negative log-likelihood per predicted token
    (every batch weighted by its number of targets, not averaged per batch), with ``ppl``,
    ``bpb`` (bits per UTF-8 byte, where every token is predicted) and ``acc`` (top-1 accuracy).
    """

    reports_bits_per_byte: ClassVar[bool] = True  # meaningful when every token is predicted
    # Whether the loss comes from an ``lm_loss`` override below the class that gives ``lm_step``.
    _steps_through_lm_loss: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        owner = {name: next(i for i, klass in enumerate(mro) if name in vars(klass)) for name in ("lm_loss", "lm_step")}
        cls._steps_through_lm_loss = owner["lm_loss"] < owner["lm_step"]
        if "lm_loss" in vars(cls) and cls._steps_through_lm_loss:
            # Warned where the class is defined: the user's code, which the default filters show.
            warnings.warn(
                f"{cls.__qualname__} overrides lm_loss, which is deprecated and goes in the next release: "
                "implement lm_step, returning an LMStep (its outputs feed compute_loss(return_outputs=True))",
                DeprecationWarning, stacklevel=2,
            )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bytes_per_token: dict[str, float] = {}  # per evaluation split, from the data
        self.eval_nll = nn.ModuleDict({stage: MeanMetric() for stage in EVAL_STAGES})
        self.eval_acc = nn.ModuleDict({stage: MeanMetric() for stage in EVAL_STAGES})

    def read_data(self, datamodule: Any) -> None:
        super().read_data(datamodule)
        if datamodule is not None and hasattr(datamodule, "bytes_per_token"):
            self.bytes_per_token = {split: datamodule.bytes_per_token(split) for split in EVAL_STAGES}

    def lm_step(self, batch: dict[str, torch.Tensor], stage: str) -> LMStep:
        """The loss of a batch and what it was computed from (override per objective).

        A subclass that overrides the older ``lm_loss`` instead keeps training through it, with
        empty ``outputs``."""
        if not self._steps_through_lm_loss:
            raise NotImplementedError(f"{type(self).__name__} must implement lm_step")
        return self._step_from_lm_loss(batch, stage)

    def _step_from_lm_loss(self, batch: dict[str, torch.Tensor], stage: str) -> LMStep:
        loss, nll, correct, metrics = self.lm_loss(batch, stage)
        return LMStep(loss, nll, correct, metrics, {})

    def lm_loss(
        self, batch: dict[str, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Return (loss to optimize, mean NLL per target, correct top-1 predictions or None,
        extra metrics to log). The NLL is what evaluation reports; training uses the loss."""
        if type(self).lm_step is LanguageModelObjective.lm_step:  # an override's super().lm_loss
            raise NotImplementedError(f"{type(self).__name__} must implement lm_step")
        step = self.lm_step(batch, stage)
        return step.loss, step.nll, step.correct, step.metrics

    def scored_rows(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The (N, V) rows of ``logits`` the loss scores (override where it scores a subset)."""
        return logits

    def compute_loss(
        self, batch: dict[str, torch.Tensor], stage: str, return_outputs: bool = False, loss_name: str = "loss",
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self._steps_through_lm_loss:
            if return_outputs:
                raise NotImplementedError(
                    f"{type(self).__name__} computes its loss in lm_loss, which gives no logits: implement lm_step"
                )
            step = self._step_from_lm_loss(batch, stage)
        else:
            step = self.lm_step(batch, stage)
        loss, nll, correct, extra, outputs = step
        if return_outputs:
            outputs = {**outputs, "scored": self.scored_rows(outputs["logits"], batch)}
        result = (loss, outputs) if return_outputs else loss
        batch_size = batch["input_ids"].shape[0]
        if stage == "train":
            self.log_train(loss_name, loss, batch_size, prog_bar=loss_name == "loss")
            for name, value in extra.items():
                self.log_train(name, value, batch_size)
            return result
        n_targets = (batch["labels"] != -100).sum()
        self.eval_nll[stage].update(nll.detach(), weight=n_targets)
        if correct is not None:
            self.eval_acc[stage].update(correct / n_targets.clamp(min=1), weight=n_targets)
        for name, value in extra.items():
            self.log(f"{stage}/{name}", value, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)
        return result

    def _log_eval_epoch(self, stage: str) -> None:
        nll = self.eval_nll[stage].compute()
        acc = self.eval_acc[stage].compute() if self.eval_acc[stage].update_count else None
        # Evaluation runs in inference mode; states reset there would become inference
        # tensors that a later fit cannot update in place.
        with torch.inference_mode(False):
            self.eval_nll[stage].reset()
            self.eval_acc[stage].reset()
        metrics = {f"{stage}/loss": nll, f"{stage}/ppl": torch.exp(nll)}
        if self.bytes_per_token.get(stage) and self.reports_bits_per_byte:
            metrics[f"{stage}/bpb"] = nll / math.log(2) / self.bytes_per_token[stage]
        if acc is not None:
            metrics[f"{stage}/acc"] = acc
        # The metric is already reduced over ranks; sync_dist states that (Lightning warns otherwise).
        self.log_dict(metrics, prog_bar=stage == "val", sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch("test")
