"""Batches sliced straight out of a memory-mapped token array, resumable mid-epoch.

The dataset yields whole batches (one fancy-index per batch, no per-sample collate), so a
DataLoader with ``batch_size=None`` and no workers has nothing left to do. Which blocks a rank
sees is a pure function of (seed, epoch, rank, world size), so a run resumed at batch ``k`` of
an epoch continues with exactly the batches the uninterrupted run would have used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

BatchTransform = Callable[[torch.Tensor, int, int], dict[str, torch.Tensor]]


def causal_lm_batch(windows: torch.Tensor, epoch: int, batch_index: int) -> dict[str, torch.Tensor]:
    """Next-token prediction: inputs are the window minus its last token, labels shifted by one."""
    return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}


def count_windows(n_tokens: int, window: int, stride: int, offset: int = 0) -> int:
    """How many windows of ``window`` tokens, ``stride`` apart, fit after ``offset``."""
    return max(0, (n_tokens - offset - window) // stride + 1)


class TokenBatches(IterableDataset):
    """Fixed-length windows over a token array, grouped into batches.

    Args:
        tokens: 1-D token ids (usually a ``np.memmap``).
        window: tokens per sample (block_size + 1 for causal LM, so inputs and labels overlap).
        stride: distance between window starts; ``window - 1`` for causal LM tiles the stream.
        batch_size: samples per batch on this rank.
        shuffle: training order; also shifts all windows by a random offset each epoch so
            every epoch sees different block boundaries.
        epoch_fn: returns the current epoch (the trainer's), so shuffling follows the trainer.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        window: int,
        stride: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        transform: BatchTransform = causal_lm_batch,
        epoch_fn: Callable[[], int] = lambda: 0,
    ) -> None:
        self.tokens = tokens
        self.window = window
        self.stride = stride
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.transform = transform
        self.epoch_fn = epoch_fn
        self._resume: tuple[int, int] | None = None  # (epoch, batches already done)
        self._offsets = np.arange(window, dtype=np.int64)

    def _starts(self, epoch: int) -> np.ndarray:
        """Window start positions this rank uses in ``epoch``, in order."""
        rng = np.random.default_rng((self.seed, epoch))
        offset = int(rng.integers(self.stride)) if self.shuffle else 0
        count = count_windows(len(self.tokens), self.window, self.stride, offset)
        order = rng.permutation(count) if self.shuffle else np.arange(count)
        per_rank = count // self.world_size  # equal counts: DDP ranks must step together
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        return offset + mine.astype(np.int64) * self.stride

    def num_samples(self) -> int:
        return count_windows(len(self.tokens), self.window, self.stride) // self.world_size

    def __len__(self) -> int:
        if self.shuffle:  # a random offset can cost one window: count the smaller case
            return max(0, (self.num_samples() - 1)) // self.batch_size
        return math.ceil(self.num_samples() / self.batch_size)

    def resume_from(self, epoch: int, batches_done: int) -> None:
        """Skip the first ``batches_done`` batches the next time ``epoch`` is iterated."""
        self._resume = (epoch, batches_done)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.epoch_fn()
        first = 0
        if self._resume is not None and self._resume[0] == epoch:
            first = self._resume[1]
        self._resume = None
        starts = self._starts(epoch)
        # With DataLoader workers, worker w of k yields every k-th batch; the loader takes them
        # round-robin, so the order is the same as without workers.
        worker = get_worker_info()
        worker_id, n_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for index in range(first + worker_id, len(self), n_workers):
            batch_starts = starts[index * self.batch_size : (index + 1) * self.batch_size]
            windows = self.tokens[batch_starts[:, None] + self._offsets]  # (B, window)
            yield self.transform(torch.from_numpy(windows.astype(np.int64)), epoch, index)
