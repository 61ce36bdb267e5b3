"""Training throughput, logged as ``train/tokens_per_sec`` and ``train/examples_per_sec``."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch

from lmexp.lightning_internals import logs_this_step

__all__ = ["Throughput"]


class Throughput(pl.Callback):
    """Tokens (padding included) and examples per second over the batches since the previous
    logging step, validation time left out (a host timer: no device sync).

    The rate is logged at the start of a logging step's first batch, so the progress bar shows
    it with that batch. ``TrainingObjective.configure_callbacks`` adds it.
    """

    def __init__(self) -> None:
        self.window: tuple[float, int, int] | None = None  # (start, tokens, examples)
        self.validation_started = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0 and logs_this_step(trainer):
            self.log_rate(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # The first batch only starts the clock, so start-up is not counted as training time.
        if self.window is None:
            self.window = (time.perf_counter(), 0, 0)
            return
        started, tokens, examples = self.window
        ranks = trainer.world_size
        self.window = (
            started, tokens + batch["input_ids"].numel() * ranks, examples + batch["input_ids"].shape[0] * ranks
        )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validation_started = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation time is not training time: move the window's start past it.
        if self.window is not None:
            started, tokens, examples = self.window
            self.window = (started + time.perf_counter() - self.validation_started, tokens, examples)

    def log_rate(self, pl_module: pl.LightningModule) -> None:
        if self.window is None:
            return
        now = time.perf_counter()
        started, tokens, examples = self.window
        if tokens and now > started:
            pl_module.log("train/tokens_per_sec", torch.tensor(tokens / (now - started)), prog_bar=True)
            pl_module.log("train/examples_per_sec", torch.tensor(examples / (now - started)))
            self.window = (now, 0, 0)
