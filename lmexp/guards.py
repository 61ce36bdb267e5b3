"""A finite-loss guard: a diverging run stops (or skips its bad steps) and never saves NaN weights.

Lightning trains on through a NaN loss: the weights turn NaN one step later and every checkpoint,
the export and the crash checkpoint after that hold them. The guard decides before each optimizer
step, once the gradients are complete (after accumulation and, under DDP, their all-reduce, so
every rank decides alike): a step whose loss or gradients are not finite never reaches the
weights. ``stop`` ends training there with one line naming the step, the learning rate and the
checkpoint to go back to; ``skip`` drops that step and stops only after ``max_skips`` bad steps in
a row.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lmexp.errors import LmexpError, check_choice, check_positive
from lmexp.generation import first_nonfinite

Mode = Literal["stop", "skip"]


class TrainingDiverged(LmexpError, ArithmeticError):
    """Training produced a non-finite loss, gradient or weight: the run stopped before saving it."""


class FiniteLossGuard(pl.Callback):
    """Keep non-finite losses and gradients out of the weights.

    Args:
        mode: ``stop`` ends training at the first non-finite loss or gradient; ``skip`` leaves
            that step out (weights and optimizer state untouched) and goes on.
        max_skips: In ``skip`` mode, how many non-finite steps in a row end training.
    """

    def __init__(self, mode: Mode = "stop", max_skips: int = 10) -> None:
        check_choice("guard.mode", mode, ("stop", "skip"))
        check_positive("guard.max_skips", max_skips)
        self.mode = mode
        self.max_skips = max_skips
        self.skipped = 0  # steps left out in this fit
        self.in_a_row = 0
        self._loss_finite: torch.Tensor | None = None  # over the micro-batches of the current step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.skipped = self.in_a_row = 0
        self._loss_finite = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        # Kept as a tensor: one device sync per optimizer step, in on_before_optimizer_step.
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss_finite, self._loss_finite = self._loss_finite, None
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # A grad scaler (16-mixed) skips steps with inf gradients itself, as a normal part of
        # finding its scale: only a non-finite loss counts there, and its gradients are left
        # to the scaler (which refuses to step an optimizer without any).
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        checks = [] if loss_finite is None else [loss_finite]
        grads = [p.grad for p in params if p.grad is not None]
        if grads and not scaled:
            # The largest magnitude: NaN propagates, and unlike the 2-norm it cannot overflow.
            checks.append(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type="inf")))
        finite = bool(torch.stack(checks).all()) if checks else True  # the step's one device sync
        bad = trainer.strategy.reduce_boolean_decision(not finite, all=False)
        if not bad:
            self.in_a_row = 0
            return
        if not scaled:
            for param in params:
                param.grad = None  # optimizers step only parameters with a gradient: nothing changes
        lr = _learning_rate(optimizer)
        step = trainer.global_step
        if self.mode == "stop":
            raise TrainingDiverged(
                f"training diverged at step {step}: the loss or a gradient is NaN/inf (learning rate {lr}); "
                f"{_advice(trainer)}; --guard.mode skip leaves such steps out instead"
            )
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_skips:
            raise TrainingDiverged(
                f"training diverged at step {step}: {self.in_a_row} non-finite steps in a row "
                f"(guard.max_skips={self.max_skips}) at learning rate {lr}; {_advice(trainer)}"
            )
        rank_zero_warn(
            f"step {step} skipped: non-finite loss or gradient (NaN/inf) at learning rate {lr} "
            f"({self.in_a_row} in a row; {self.max_skips} stop training)"
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.skipped:
            rank_zero_info(f"{self.skipped} training step(s) skipped for a non-finite loss or gradient")

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # The last defence: a checkpoint (and the export made from it) never holds NaN weights.
        name = first_nonfinite(pl_module)
        if trainer.strategy.reduce_boolean_decision(name is not None, all=False):
            raise TrainingDiverged(
                f"training diverged by step {trainer.global_step}: the weights hold NaN/inf "
                f"({name or 'on another rank'}), so no checkpoint is saved; {_advice(trainer)}"
            )


def _learning_rate(optimizer: torch.optim.Optimizer) -> str:
    """The learning rate(s) of this step, as the schedule set them."""
    rates = dict.fromkeys(f"{group['lr']:.3g}" for group in optimizer.param_groups)
    return "/".join(rates)


def _advice(trainer: pl.Trainer) -> str:
    """Where to go back to: the newest checkpoint the checkpoint callback wrote (each holds finite
    weights: see on_save_checkpoint), if any."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    if not path:
        return "last good checkpoint: none yet (start again with a lower --model.init_args.lr)"
    return f"last good checkpoint: {path} (resume from it, or start again with a lower --model.init_args.lr)"
