"""Sequence classification: fine-tune a pretrained GPT or BERT (or train one from scratch)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from lmexp.errors import ConfigError
from lmexp.models import ModelConfig
from lmexp.objectives.base import TrainingObjective, attached_trainer

EVAL_STAGES = ("val", "test")
_BLOCK = re.compile(r"^trunk\.blocks\.(\d+)\.")


class SequenceClassification(TrainingObjective):
    """Cross-entropy over class labels from the network's pooled state (BERT: [CLS]; GPT: the
    last real token). Reports loss, accuracy and macro-F1 per evaluation; a test adds per-class
    precision and recall and a confusion matrix (printed, and ``confusion_test.png`` in the run).

    Args:
        freeze_encoder: Train the classification head only (a linear probe of the pretrained
            features); the network's weights stay as they are.
        layer_lr_decay: Layer-wise learning-rate decay: the top block trains at ``lr``, each block
            below at this factor times the one above, the embeddings lowest (1 disables; 0.8-0.95
            is usual for fine-tuning).
        head_lr: Learning rate of the classification head (default: ``lr``); a fresh head often
            wants a larger one than the pretrained body.
        class_weights: Loss weights per class for imbalanced data: ``balanced`` (inverse class
            frequency in the training split), a list in label order, or none.
        **kwargs: See ``TrainingObjective``.
    """

    task: ClassVar[str] = "classification"

    def __init__(
        self,
        network: str | ModelConfig = "bert-mini",
        freeze_encoder: bool = False,
        layer_lr_decay: float = 1.0,
        head_lr: float | None = None,
        class_weights: Literal["balanced"] | list[float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not 0.0 < layer_lr_decay <= 1.0:
            raise ConfigError(f"layer_lr_decay={layer_lr_decay} must be in (0, 1], e.g. 0.9 (1 disables)")
        if head_lr is not None and head_lr <= 0:
            raise ConfigError(f"head_lr={head_lr} must be positive, e.g. 1e-3, or null to use lr")
        if isinstance(class_weights, str) and class_weights != "balanced":
            raise ConfigError(f"class_weights={class_weights!r} is unknown: use 'balanced', a list of weights, or null")
        if isinstance(class_weights, list) and any(w <= 0 for w in class_weights):
            raise ConfigError(f"class_weights={class_weights} must all be positive")
        super().__init__(network, **kwargs)

    def check_network(self, config: ModelConfig) -> None:
        if config.arch == "lstm":
            raise ConfigError(
                f"SequenceClassification needs a gpt or bert network, but {self._describe_source()} is an lstm"
            )

    def with_heads(self, config: ModelConfig) -> ModelConfig:
        # A BERT classifies from the pooled [CLS] state: transformers' BertForMaskedLM has no pooler.
        return config.replace(pooler=True) if config.arch == "bert" else config

    def network_complete(self, config: ModelConfig) -> bool:
        return config.vocab_size is not None and config.labels is not None

    def unused_modules(self) -> list[nn.Module]:
        model = self.model
        unused: list[nn.Module] = [getattr(model, name) for name in ("mlm_head", "sop_head", "lm_head")
                                   if getattr(model, name, None) is not None]
        if self.hparams.freeze_encoder:
            unused += [child for name, child in model.named_children() if name != "classifier"]
        return unused

    def read_data(self, datamodule: Any) -> None:
        super().read_data(datamodule)
        counts = getattr(datamodule, "class_counts", None)
        self.class_counts = counts() if callable(counts) else None

    def build_heads(self) -> None:
        n = self.network_config.num_labels
        self.metrics = nn.ModuleDict({
            stage: MetricCollection({
                "acc": MulticlassAccuracy(n, average="micro"), "f1": MulticlassF1Score(n, average="macro"),
            }) for stage in EVAL_STAGES
        })
        self.eval_loss = nn.ModuleDict({stage: MeanMetric() for stage in EVAL_STAGES})
        self.test_details = MetricCollection({
            "precision": MulticlassPrecision(n, average=None), "recall": MulticlassRecall(n, average=None),
            "confusion": MulticlassConfusionMatrix(n),
        })
        # Not saved: derived from the settings and the training data.
        self.register_buffer("loss_weights", self._resolve_class_weights(n), persistent=False)

    def _resolve_class_weights(self, n: int) -> torch.Tensor:
        weights = self.hparams.class_weights
        if weights is None:
            return torch.ones(0)
        if weights == "balanced":
            counts = getattr(self, "class_counts", None)
            if counts is None:  # rebuilt for evaluation: the loss weights do not change the metrics
                return torch.ones(0)
            if min(counts) == 0:
                raise ConfigError(f"class_weights='balanced' but a class has no training example (counts {counts})")
            total = sum(counts)
            return torch.tensor([total / (n * c) for c in counts], dtype=torch.float32)
        if len(weights) != n:
            raise ConfigError(
                f"class_weights has {len(weights)} values but there are {n} labels {self.network_config.labels}: "
                "give one weight per label, in label order"
            )
        return torch.tensor(weights, dtype=torch.float32)

    # ----------------------------------------------------------- optimization
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups per depth: the head at ``head_lr``, block i at ``lr * decay**(top - i)``.

        Decay as in the base: weight matrices only. Each group's ``lr`` is its peak; the schedule
        scales all of them alike.
        """
        decay_rate, lr = self.hparams.layer_lr_decay, self.hparams.lr
        n_layer = self.network_config.n_layer
        embeddings = {id(p) for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
        seen: set[int] = set()
        for name, param in self.model.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if name.startswith("classifier."):
                group_lr = self.hparams.head_lr or lr
            else:
                block = _BLOCK.match(name)
                depth = int(block.group(1)) + 1 if block else (0 if "emb" in name else n_layer + 1)
                group_lr = lr * decay_rate ** (n_layer + 1 - depth)
            decays = param.ndim >= 2 and id(param) not in embeddings
            groups.setdefault((group_lr, decays), []).append(param)
        return [
            {"params": params, "lr": group_lr, "weight_decay": self.hparams.weight_decay if decays else 0.0}
            for (group_lr, decays), params in groups.items()
        ]

    # -------------------------------------------------------------- the step
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Label logits (B, num_labels) of a batch as the data module makes them."""
        return self.model.classify(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))

    def compute_loss(
        self, batch: dict[str, torch.Tensor], stage: str, return_outputs: bool = False, loss_name: str = "loss",
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self(batch)
        labels = batch["labels"]
        weight = self.loss_weights if self.loss_weights.numel() else None
        loss = F.cross_entropy(logits, labels, weight=weight)
        result = (loss, {"logits": logits, "scored": logits}) if return_outputs else loss
        batch_size = labels.shape[0]
        if stage == "train":
            self.log_train(loss_name, loss, batch_size, prog_bar=loss_name == "loss")
            self.log_train("acc", (logits.argmax(-1) == labels).float().mean(), batch_size)
            return result
        # Unweighted loss per example for reporting: comparable across class-weight settings.
        self.eval_loss[stage].update(F.cross_entropy(logits, labels, reduction="mean"), weight=batch_size)
        self.metrics[stage].update(logits, labels)
        if stage == "test":
            self.test_details.update(logits, labels)
        return result

    def _log_eval_epoch(self, stage: str) -> dict[str, Any]:
        values = {f"{stage}/{name}": value for name, value in self.metrics[stage].compute().items()}
        values[f"{stage}/loss"] = self.eval_loss[stage].compute()
        with torch.inference_mode(False):  # see LanguageModelObjective._log_eval_epoch
            self.metrics[stage].reset()
            self.eval_loss[stage].reset()
        self.log_dict(values, prog_bar=stage == "val", sync_dist=True)
        return values

    def on_validation_epoch_end(self) -> None:
        self._log_eval_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch("test")
        details = self.test_details.compute()
        with torch.inference_mode(False):
            self.test_details.reset()
        labels = self.network_config.labels or []
        for i, label in enumerate(labels):
            self.log(f"test/precision/{label}", details["precision"][i], sync_dist=True)
            self.log(f"test/recall/{label}", details["recall"][i], sync_dist=True)
        self._report_confusion(details["confusion"].cpu(), labels)

    @rank_zero_only
    def _report_confusion(self, confusion: torch.Tensor, labels: list[str]) -> None:
        rank_zero_info(format_confusion(confusion, labels))
        trainer = attached_trainer(self)
        folder = Path(trainer.default_root_dir) if trainer is not None else None
        if folder is None or not folder.is_dir():
            return
        path = plot_confusion(confusion, labels, folder / "confusion_test.png")
        for logger in trainer.loggers:
            if hasattr(logger, "log_artifact"):
                logger.log_artifact(path)


def format_confusion(confusion: torch.Tensor, labels: list[str]) -> str:
    """The confusion matrix as text: rows are true labels, columns predictions."""
    width = max([len(label) for label in labels] + [len(str(int(confusion.max()))), 6]) + 2
    lines = ["confusion matrix (rows: true label, columns: predicted)", " " * width + "".join(f"{l:>{width}}" for l in labels)]
    for label, row in zip(labels, confusion.tolist()):
        lines.append(f"{label:>{width}}" + "".join(f"{int(v):>{width}}" for v in row))
    return "\n".join(lines)


def plot_confusion(confusion: torch.Tensor, labels: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = confusion.numpy()
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2.5, 1.2 * len(labels) + 2))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, str(int(value)), ha="center", va="center",
                color="white" if value > counts.max() / 2 else "black")
    ax.set_title(f"confusion matrix ({int(counts.sum())} examples)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
