"""Key/value cache for incremental decoding with causal transformers."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of past positions, so each new token attends without recomputing them.

    Buffers are preallocated at full context length; `length` counts the filled positions.
    Every layer writes its new keys/values at [length, length + T) during a forward pass, and
    the model calls `advance(T)` once all layers are done.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_length: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (batch_size, n_head, max_length, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.batch_size = batch_size
        self.max_length = max_length
        self.length = 0

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

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        """Forget all positions; the buffers are reused."""
        self.length = 0
