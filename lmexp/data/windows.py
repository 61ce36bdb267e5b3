"""Sliding-window evaluation of a causal LM over a whole held-out token stream.

Cutting the stream into disjoint blocks scores the first tokens of every block with almost no
context, so perplexity comes out too high; overlapping windows naively scored in full count
the overlap twice. Here every target (tokens 1..n-1; token 0 has no context) is scored exactly
once, each with as much context as the window allows: at least ``block_size - stride + 1``
tokens where the stream has that many, at most ``block_size``. ``stride=block_size`` is the
fast disjoint evaluation, ``stride=1`` gives every target its full ``min(t, block_size)``
context. The last window is aligned to the end of the stream rather than left short, so the
tail is not scored with less context than the rest.

A window ``(start, end, first_target)`` feeds inputs ``tokens[start:end]`` (at most
``block_size`` of them), whose outputs predict ``tokens[start + 1 : end + 1]``; only the targets
at positions ``first_target..end`` (inclusive) are scored. Target ``t`` therefore sees the
``t - start`` tokens ``tokens[start:t]`` as context.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lmexp.errors import ConfigError, check_positive

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: unscored label positions
PAD_ID = 0  # input id right padding uses; its outputs are never scored


class Window(NamedTuple):
    """Inputs ``tokens[start:end]``; scored targets are positions ``first_target..end``."""

    start: int
    end: int
    first_target: int


def _check(n_tokens: int, block_size: int, stride: int) -> None:
    check_positive("block_size", block_size)
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= block_size:
        raise ConfigError(
            f"stride={stride!r} must be in [1, block_size={block_size}]: use block_size for disjoint windows "
            "(fastest) or less for more context per token (1 gives every token full context)"
        )
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 2:
        raise ConfigError(
            f"n_tokens={n_tokens!r} leaves nothing to score: a causal LM needs at least 2 tokens, "
            "so evaluate on a longer token stream"
        )


def window_arrays(n_tokens: int, block_size: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Starts, ends and first scored targets of all windows, as int64 arrays (see module doc).

    Arrays rather than a list so a long stream with a small stride stays cheap to describe.
    """
    _check(n_tokens, block_size, stride)
    last = n_tokens - 1  # the last target, and the largest possible input end
    if last <= block_size:  # one window holds the whole stream
        one = np.array([0], dtype=np.int64)
        return one, one + last, one + 1
    count = math.ceil((last - block_size) / stride) + 1
    # Window k starts at k * stride; the first one whose end would reach past the stream is
    # moved back to end exactly at it (and is the last).
    starts = np.minimum(np.arange(count, dtype=np.int64) * stride, last - block_size)
    ends = starts + block_size
    firsts = np.empty(count, dtype=np.int64)
    firsts[0] = 1
    firsts[1:] = ends[:-1] + 1  # each window scores only what the previous ones did not
    return starts, ends, firsts


def sliding_windows(n_tokens: int, block_size: int, stride: int) -> list[Window]:
    """The evaluation windows over ``n_tokens`` tokens, in stream order (see module doc).

    Raises ConfigError unless ``1 <= stride <= block_size`` and ``n_tokens >= 2``.
    """
    return [Window(*map(int, w)) for w in zip(*window_arrays(n_tokens, block_size, stride))]


class SlidingWindowBatches(IterableDataset):
    """Batches of sliding windows whose labels score every target of the stream exactly once.

    Yields ``{"input_ids", "labels"}`` (both int64, (B, T)); labels hold the target id where a
    target is scored and -100 elsewhere (context-only positions, right padding), so summing
    ``cross_entropy(..., reduction="sum")`` over all batches (and ranks) gives the stream's
    total negative log-likelihood over ``n_targets`` targets. A batch is padded only to its
    longest window; windows are shorter than ``block_size`` only when the whole stream is.

    Rank ``r`` of ``world_size`` takes windows ``r, r + world_size, ...``. DDP ranks evaluate
    in lock step, so every rank yields ``len(self)`` batches of the same sizes: a rank that
    runs out fills up with rows whose labels are all -100. Beware a per-batch *mean* loss: a
    batch of only such rows has no targets.

    Args:
        tokens: 1-D token ids (usually a ``np.memmap`` of uint16 or uint32).
        block_size: most input tokens per window (the model's context length).
        stride: distance between window starts, 1..block_size.
        batch_size: windows per batch on this rank.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        stride: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if tokens.ndim != 1:
            raise ConfigError(f"tokens have shape {tokens.shape}: pass a 1-D array of token ids")
        check_positive("batch_size", batch_size)
        check_positive("world_size", world_size)
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size}): pass this process's rank")
        self.tokens = tokens
        self.block_size = block_size
        self.stride = stride
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.starts, self.ends, self.firsts = window_arrays(len(tokens), block_size, stride)
        self.n_targets = len(tokens) - 1
        self.window_count = len(self.starts)  # over all ranks
        self.windows_per_rank = math.ceil(self.window_count / world_size)

    def __len__(self) -> int:
        return math.ceil(self.windows_per_rank / self.batch_size)

    def _batch(self, index: int) -> dict[str, torch.Tensor]:
        """Batch ``index`` of this rank; rows past this rank's last window score nothing."""
        rows = range(index * self.batch_size, min((index + 1) * self.batch_size, self.windows_per_rank))
        mine = [self.rank + row * self.world_size for row in rows]
        mine = [w for w in mine if w < self.window_count]
        starts, ends, firsts = self.starts[mine], self.ends[mine], self.firsts[mine]
        # Filler rows get the width every window has (all are equally long unless there is one).
        width = int((ends - starts).max()) if mine else int(self.ends[0] - self.starts[0])
        positions = starts[:, None] + np.arange(width, dtype=np.int64)  # input positions
        real = positions < ends[:, None]
        scored = real & (positions + 1 >= firsts[:, None])
        last = self.n_targets
        inputs = np.where(real, self.tokens[np.minimum(positions, last)].astype(np.int64), PAD_ID)
        labels = np.where(scored, self.tokens[np.minimum(positions + 1, last)].astype(np.int64), IGNORE_INDEX)
        filler = len(rows) - len(mine)
        if filler:
            inputs = np.concatenate([inputs, np.full((filler, width), PAD_ID, dtype=np.int64)])
            labels = np.concatenate([labels, np.full((filler, width), IGNORE_INDEX, dtype=np.int64)])
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # With DataLoader workers, worker w of k yields every k-th batch; the loader takes them
        # round-robin, so the order is the same as without workers.
        worker = get_worker_info()
        worker_id, n_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for index in range(worker_id, len(self), n_workers):
            yield self._batch(index)
