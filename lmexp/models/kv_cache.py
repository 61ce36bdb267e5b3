"""Key/value cache for incremental decoding with causal transformers."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of past positions, so each new token attends without recomputing them.

    Buffers are preallocated at full context length; `length` counts the filled positions.
    Every layer writes its new keys/values at [length, length + T) during a forward pass, and
    the model calls `advance(T)` once all layers are done.

    A left-padded batch also needs to know, for every cached position, whether it holds a real
    token: later tokens must not attend to cached pad keys, and count their positions from each
    row's first real token. `update_mask` keeps that padding mask (None while every cached
    position is real, so unpadded decoding keeps its mask-free attention).
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int | list[int],
        max_length: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        heads = n_head if isinstance(n_head, list) else [n_head] * n_layer  # a list: per layer (pruned heads)
        shapes = [(batch_size, h, max_length, head_dim) for h in heads]
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for shape in shapes]
        self.batch_size = batch_size
        self.max_length = max_length
        self.length = 0
        self.mask: Tensor | None = None  # (B, max_length) bool, True = real token; None = all real

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values (B, nh, T, hs) of `layer`; return all keys/values (B, nh, length+T, hs)."""
        end = self.length + k.size(2)
        if end > self.max_length:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {k.size(2)} new tokens exceed "
                f"max_length={self.max_length}: call reset() or crop the context"
            )
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def update_mask(self, attention_mask: Tensor | None, length: int) -> Tensor | None:
        """Store the padding mask (B, T) of `length` new positions (None: all real); return the
        mask of all positions (B, self.length + T), or None while no position is padding.

        Called once per forward pass, before `advance`.
        """
        end = self.length + length
        if end > self.max_length:
            raise ValueError(
                f"KV cache overflow: {self.length} cached + {length} new tokens exceed "
                f"max_length={self.max_length}: call reset() or crop the context"
            )
        if attention_mask is None and self.mask is None:
            return None
        if self.mask is None:  # first padded input: every position cached so far was real
            self.mask = torch.ones(self.batch_size, self.max_length, dtype=torch.bool, device=attention_mask.device)
        self.mask[:, self.length : end] = True if attention_mask is None else attention_mask.bool()
        return self.mask[:, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        """Forget all positions (and their padding); the buffers are reused."""
        self.length = 0
        self.mask = None
