"""Exact resume: a run stopped anywhere and resumed trains on as if it had never stopped.

A checkpoint holds the random-number generators (dropout draws from them) and describes the
training state at the last optimizer step, even when it is written inside an accumulation window
or between epochs; the resumed run restores the generators right before its first batch.
``TrainingObjective.configure_callbacks`` adds ``ExactResume``, so a plain ``pl.Trainer`` gets it.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from lmexp.checkpoints import CHECKPOINT_KEY
from lmexp.lightning_internals import batches_processed, between_epochs, rewind_saved_fit_loop

__all__ = ["ExactResume", "align_to_last_step", "last_step_batch"]


def torch_rng_state() -> dict[str, Any]:
    """The generators a training step draws from (dropout): cheap enough to take every step."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_state() -> dict[str, Any]:
    """Every global generator, for checkpoints."""
    np_state = np.random.get_state()
    return {
        **torch_rng_state(),
        "python": random.getstate(),
        # numpy arrays are not allowed by weights_only loading: store as a tensor
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(state["python"]))
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def align_to_last_step(checkpoint: dict[str, Any], last_step_batch: int | None, datamodule_key: str | None) -> bool:
    """Make a checkpoint describe the training state at the last optimizer step.

    Two moments need it; everywhere else it changes nothing:
    - Between optimizer steps (a crash or Ctrl-C inside an accumulation window or a batch):
      the weights and optimizer state are those of the last step, but batches after it were
      fetched or run. Counting them as done would skip their data on resume and shift
      Lightning's validation schedule, so the loop counters and data position go back to the
      batch that ended the last step (``last_step_batch``).
    - Between epochs (``last_step_batch=None``): Lightning has moved to the next epoch but still
      holds the finished epoch's batch counts, which would skip that many batches of the next
      epoch on resume. The new epoch's counts are zero, and an epoch start interrupted before
      its first batch starts again.

    Returns whether the checkpoint was rewound into the middle of a step.
    """
    rewound = rewind_saved_fit_loop(checkpoint, last_step_batch)
    if rewound is None:
        return False
    batches_done, moved_back = rewound
    if datamodule_key and isinstance(checkpoint.get(datamodule_key), dict):
        checkpoint[datamodule_key]["batches_done"] = min(checkpoint[datamodule_key]["batches_done"], batches_done)
    return moved_back


def last_step_batch(trainer: pl.Trainer) -> int | None:
    """Batches of this epoch that ended with an optimizer step (all, at the epoch's end); None
    between epochs, when Lightning's batch counts still describe the previous one."""
    if between_epochs(trainer):
        return None
    processed = batches_processed(trainer)
    if processed >= trainer.num_training_batches:
        return processed  # the last, possibly shorter, accumulation window also steps
    return processed - processed % trainer.accumulate_grad_batches


class ExactResume(pl.Callback):
    """Save the random generators with every checkpoint, rewound to the last optimizer step, and
    restore them right before the first resumed batch.

    The generators are stored under the checkpoint's lmexp entry (``CHECKPOINT_KEY``/``rng``),
    where checkpoints have always kept them.
    """

    def __init__(self) -> None:
        self.pending_rng: dict[str, Any] | None = None  # loaded, not yet applied
        self.rng_at_step_start: tuple[tuple[int, int], dict[str, Any]] | None = None

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.pending_rng = checkpoint.get(CHECKPOINT_KEY, {}).get("rng")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        # Restore the RNG right before the first resumed step, after everything Lightning
        # does between loading and training that might draw random numbers.
        if self.pending_rng is not None:
            set_rng_state(self.pending_rng)
            self.pending_rng = None
        if batch_idx % trainer.accumulate_grad_batches == 0:
            # A crash before this window's optimizer step rewinds to here (see on_save_checkpoint).
            # A step draws only from torch's generators, so only those are kept (the full
            # state costs ~60 us a step, this ~2).
            self.rng_at_step_start = ((trainer.current_epoch, batch_idx), torch_rng_state())

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        rng = self.pending_rng or rng_state()  # a restore not yet applied is the true state
        if trainer.state.fn == "fit":
            datamodule = trainer.datamodule
            datamodule_key = type(datamodule).__qualname__ if datamodule is not None else None
            last_step = last_step_batch(trainer)
            if align_to_last_step(checkpoint, last_step, datamodule_key) and self.pending_rng is None:
                # Random numbers drawn after the last step belong to the interrupted window:
                # use the state it started from, when that snapshot is of this very window.
                position, state = self.rng_at_step_start or (None, None)
                if position == (trainer.current_epoch, last_step):
                    rng = {**rng, **state}
        checkpoint.setdefault(CHECKPOINT_KEY, {})["rng"] = rng
