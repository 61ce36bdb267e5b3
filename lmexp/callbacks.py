"""Callbacks lmexp adds to Lightning's: checkpoints with exports, text samples, a progress bar."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from lmexp.checkpoints import export_safetensors
from lmexp.generation import generate
from lmexp.objectives.base import logs_this_step


class LmexpCheckpoint(ModelCheckpoint):
    """Best and last checkpoints, plus a safetensors export of the best one.

    The export (``<dirpath>/best/``: weights, config, tokenizer) is what inference and
    compression tools load without Lightning.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        monitor: str | None = "val/loss",
        mode: str = "min",
        filename: str = "best",
        save_last: bool = True,
        save_top_k: int = 1,
        every_n_train_steps: int | None = None,
        export_best: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            dirpath=dirpath, monitor=monitor, mode=mode, filename=filename, save_last=save_last,
            save_top_k=save_top_k, every_n_train_steps=every_n_train_steps,
            auto_insert_metric_name=False, **kwargs,
        )
        self.export_best = export_best

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        # Under FSDP rank 0 holds only a shard: export from the full checkpoint afterwards
        # (lmexp.checkpoints.load_checkpoint + export_safetensors).
        sharded = isinstance(trainer.strategy, FSDPStrategy)
        if self.export_best and not sharded and filepath == self.best_model_path and trainer.is_global_zero:
            module = trainer.lightning_module
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)
            folder = Path(filepath).with_suffix("")
            export_safetensors(module.model, module.network_config, folder, tokenizer, type(module).__name__)


class CheckpointOnException(pl.Callback):
    """Save ``<dirpath>/interrupted.ckpt`` when training stops on an error or Ctrl-C.

    Lightning's ``OnExceptionCheckpoint`` does the same but also turns every later ``fit``
    without ``ckpt_path`` into a silent resume; here resuming stays explicit:
    ``--ckpt_path <dirpath>/interrupted.ckpt``.
    """

    def __init__(self, dirpath: str, filename: str = "interrupted") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn == "fit" and trainer.global_step > 0:
            trainer.save_checkpoint(self.path)
            rank_zero_info(f"training stopped by {type(exception).__name__}; resume with --ckpt_path {self.path}")


class SampleText(pl.Callback):
    """Print a generated sample every N steps and at the end, and append it to
    ``samples.txt`` in the run's log folder (the CSV logger has no text channel)."""

    def __init__(
        self,
        every_n_steps: int = 500,
        prompt: str = "\n",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = None,
        seed: int = 0,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self._last_sampled_step = -1

    def sample(self, trainer: pl.Trainer) -> str | None:
        module = trainer.lightning_module
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if getattr(module, "data_task", None) != "causal_lm" or tokenizer is None:
            return None
        ids = tokenizer.encode(self.prompt, add_special_tokens=False).ids or [0]
        prompt = torch.tensor([ids[-module.block_size :]], device=module.device)
        generator = torch.Generator(device=module.device).manual_seed(self.seed)
        out = generate(module.model, prompt, self.max_new_tokens, self.temperature, self.top_k, generator=generator)
        return tokenizer.decode(out[0].tolist())

    def _emit(self, trainer: pl.Trainer, title: str) -> None:
        # Generating on rank 0 alone needs the whole model there, which FSDP does not keep.
        if not trainer.is_global_zero or isinstance(trainer.strategy, FSDPStrategy):
            return
        text = self.sample(trainer)
        if text is None:
            return
        rank_zero_info(f"\n--- {title} ---\n{text}\n---")
        if trainer.log_dir is not None:
            Path(trainer.log_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(trainer.log_dir) / "samples.txt", "a", encoding="utf-8") as f:
                f.write(f"--- {title} ---\n{text}\n\n")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_sampled_step = trainer.global_step  # a resumed run already sampled this step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end on the same step: sample once.
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._last_sampled_step:
            self._last_sampled_step = step
            self._emit(trainer, f"sample at step {step}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._emit(trainer, f"sample after {trainer.global_step} steps")


class StepProgressBar(RichProgressBar):
    """Rich progress bar titled by optimizer steps, whose metrics never stall the device.

    Language models train for ``max_steps``, not epochs; Lightning then has no epoch limit and
    the stock title reads ``Epoch 0/-2``. The stock bar also re-reads the logged metrics after
    every batch, turning each logged GPU tensor into a Python number: a device sync per step
    that stops the host from queueing work ahead (it halved the speed of a small GPT on a
    GPU). This bar re-reads them only on the steps where new values were logged.
    """

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.is_disabled:
            return
        if self.train_progress_bar_id is None:  # resumed mid-epoch
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, batch_idx + 1)
        if logs_this_step(trainer):
            self._update_metrics(trainer, pl_module)
        self.refresh()

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0:
            return super()._get_train_description(current_epoch)
        # The title is set at epoch start only (the bar counts batches), so show the budget.
        description = f"Epoch {current_epoch} (max {trainer.max_steps} steps)"
        return f"{description:{len(self.validation_description)}}"

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the log folder's version number is not a metric
        return metrics
