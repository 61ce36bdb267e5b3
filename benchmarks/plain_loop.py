"""The hand-written training loop the benchmarks hold lmexp against: what a user writes by hand.

AdamW (fused), lmexp's warmup-cosine schedule and clipping, no framework around it. Weight decay
follows nanoGPT's rule (every matrix, the tied embedding too), where lmexp spares embeddings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lmexp.objectives.schedule import warmup_cosine


def plain_optimizer(
    model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float, warmup: int, total: int,
    min_lr_ratio: float, eight_bit: bool = False,
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if eight_bit:
        from bitsandbytes.optim import AdamW8bit

        optimizer: torch.optim.Optimizer = AdamW8bit(groups, lr=lr, betas=betas)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    return optimizer, LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, min_lr_ratio))


def endless_batches(data) -> Iterator[dict[str, torch.Tensor]]:
    """The data module's training batches, epoch after epoch."""
    while True:
        yield from data.train_dataloader()


def plain_step(
    forward: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer, scheduler: LambdaLR, clip: float, device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
) -> None:
    """One optimizer step: forward (under autocast, if given), loss, backward, clip, step."""
    x = batch["input_ids"].to(device, non_blocking=True)
    y = batch["labels"].to(device, non_blocking=True)
    with autocast or contextlib.nullcontext():
        logits = forward(x)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
