"""LightningCLI with lmexp's defaults, behind ``lmexp fit|validate|test|predict``."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from lmexp.callbacks import CheckpointOnException, LmexpCheckpoint, StepProgressBar
from lmexp.data import TextDataModule
from lmexp.objectives import LanguageModelObjective


def _not_an_advertisement(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip:")


class LmexpCLI(LightningCLI):
    """LightningCLI with lmexp's defaults: best/last checkpoints with an export, a checkpoint on
    crash or interrupt, a Rich progress bar, learning-rate logging, and our own data sampler
    (it shards batches across ranks itself)."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        # TokenBatches shards batches across workers itself, so its __len__ is exact.
        warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_an_advertisement)
        super().__init__(
            model_class=LanguageModelObjective,
            datamodule_class=TextDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults={"use_distributed_sampler": False},
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(LmexpCheckpoint, "checkpoint")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.checkpoint.dirpath is None:
            root = config.trainer.default_root_dir or os.getcwd()
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        if config.data.init_args.get("val_fraction") == 0 and config.checkpoint.monitor == "val/loss":
            # No validation split: the best checkpoint (and its export) is the latest one,
            # saved when training (or its epoch) ends rather than after a validation.
            config.checkpoint.monitor = None
            config.checkpoint.save_on_train_epoch_end = True

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        if config.get("logger") in (True, None):
            # The logger Lightning would pick without TensorBoard, minus its install notices.
            config["logger"] = CSVLogger(config.get("default_root_dir") or os.getcwd())
        configured = list(config.get("callbacks") or []) + list(callbacks)
        checkpoint = next((c for c in configured if isinstance(c, LmexpCheckpoint)), None)
        if checkpoint is not None and checkpoint.dirpath:
            # A crash or Ctrl-C between validations keeps its progress: resume with
            # --ckpt_path <dirpath>/interrupted.ckpt.
            callbacks.append(CheckpointOnException(checkpoint.dirpath))
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in configured
        ):
            callbacks.append(StepProgressBar())
        if config.get("logger", True) is not False and not any(isinstance(c, LearningRateMonitor) for c in configured):
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        return super()._instantiate_trainer(config, callbacks)
