"""LightningCLI with lmexp's defaults, behind ``lmexp fit|validate|test``."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info

from lmexp.callbacks import CheckpointOnException, LmexpCheckpoint, PlainProgress, StepProgressBar
from lmexp.checkpoints import latest_checkpoint, read_checkpoint
from lmexp.cli import DESCRIPTION, OneLineErrors
from lmexp.data import TextDataModule
from lmexp.errors import CheckpointError
from lmexp.objectives import LanguageModelObjective


NAMED_CHECKPOINTS = ("last", "best", "hpc")  # --ckpt_path values that name a file rather than give one


class LmexpArgumentParser(OneLineErrors, LightningArgumentParser):
    """Lightning's parser, reporting a bad flag or value in one line."""


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
        # The data module restores the data position itself (its state is in the checkpoint).
        warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_an_advertisement)
        super().__init__(
            model_class=LanguageModelObjective,
            datamodule_class=TextDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults={"use_distributed_sampler": False},
            save_config_kwargs={"overwrite": True},
            parser_class=LmexpArgumentParser,
            parser_kwargs={"prog": "lmexp", "description": DESCRIPTION},
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict has nothing to write for a language model yet: not offered until it does.
        return {verb: skip for verb, skip in LightningCLI.subcommands().items() if verb != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(LmexpCheckpoint, "checkpoint")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads the hyperparameters of a --ckpt_path file right after parsing, with a
        # bare torch.load: check the file first, so a bad one is a one-line error.
        verb = self.config.get("subcommand")
        ckpt_path = self.config[verb].get("ckpt_path") if verb else None
        if ckpt_path is not None and ckpt_path not in NAMED_CHECKPOINTS and not str(ckpt_path).startswith("registry"):
            read_checkpoint(ckpt_path, mmap=True)

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
        if self.subcommand is not None:
            config.ckpt_path = resolve_ckpt_path(
                config.ckpt_path, config.checkpoint.dirpath, config.checkpoint.filename, self.subcommand
            )

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
            # A Rich bar draws nothing until the end where output is not a terminal.
            callbacks.append(StepProgressBar() if sys.stdout.isatty() else PlainProgress())
        if config.get("logger", True) is not False and not any(isinstance(c, LearningRateMonitor) for c in configured):
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        return super()._instantiate_trainer(config, callbacks)


def resolve_ckpt_path(ckpt_path: str | None, dirpath: str, best_name: str, verb: str) -> str | None:
    """The file ``--ckpt_path last`` or ``best`` names in the run's checkpoint folder.

    ``last`` is the newest complete checkpoint, whichever file holds it (``last.ckpt``, or
    ``interrupted.ckpt`` after a crash or a signal). A ``fit`` with ``last`` and nothing saved
    yet starts from scratch, so one command both starts and resumes a pre-emptible job.
    """
    if ckpt_path == "last":
        found = latest_checkpoint(dirpath)
        if found is None:
            if verb == "fit":
                rank_zero_info(f"--ckpt_path last: no checkpoint in {dirpath} yet, training from the start")
                return None
            raise CheckpointError(f"--ckpt_path last: {dirpath} holds no readable checkpoint; train first or pass a path")
        return str(found)
    if ckpt_path == "best":
        path = os.path.join(dirpath, f"{best_name}.ckpt")
        read_checkpoint(path, mmap=True)
        return path
    return ckpt_path
