"""A split's token ids spread over several memory-mapped shard files, read as one array.

Batches index the ids with slices and integer arrays (``tokens[starts[:, None] + offsets]``);
this view answers both without copying the shards into one file, so a corpus built as many
shards trains exactly like one built as a single file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class ShardedTokens:
    """Read-only concatenation of 1-D id arrays (usually ``np.memmap`` shards)."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        if not parts:
            raise ValueError("ShardedTokens needs at least one array")
        self.parts = [part for part in parts if len(part)] or [parts[0]]
        self.dtype = np.dtype(self.parts[0].dtype)
        if any(np.dtype(part.dtype) != self.dtype or part.ndim != 1 for part in self.parts):
            raise ValueError("every shard must be a 1-D array of the same dtype")
        self.offsets = np.cumsum([0, *(len(part) for part in self.parts)])
        self.size = int(self.offsets[-1])
        self.shape = (self.size,)
        self.ndim = 1

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self.parts)} shards, {self.size:,} tokens, {self.dtype})"

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = np.concatenate([np.asarray(part) for part in self.parts])
        return whole if dtype is None else whole.astype(dtype)

    def max(self) -> Any:
        return max(part.max() for part in self.parts if len(part))

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.size)
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._range(start, max(start, stop))
        if isinstance(index, (int, np.integer)):
            position = int(index) + (self.size if index < 0 else 0)
            if not 0 <= position < self.size:
                raise IndexError(f"index {index} is out of bounds for {self.size} tokens")
            part = int(np.searchsorted(self.offsets, position, side="right")) - 1
            return self.parts[part][position - self.offsets[part]]
        return self._gather(np.asarray(index))

    def _range(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        part = max(first, 0)
        while start < stop and part < len(self.parts):
            begin, end = self.offsets[part], self.offsets[part + 1]
            if end > start:
                pieces.append(np.asarray(self.parts[part][start - begin : min(stop, end) - begin]))
                start = min(stop, end)
            part += 1
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.dtype)

    def _gather(self, index: np.ndarray) -> np.ndarray:
        if index.dtype == bool:
            return self._gather(np.flatnonzero(index))
        flat = index.astype(np.int64, copy=False).ravel()
        flat = np.where(flat < 0, flat + self.size, flat)
        if flat.size and (flat.min() < 0 or flat.max() >= self.size):
            raise IndexError(f"an index is out of bounds for {self.size} tokens")
        owner = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for part in np.unique(owner):
            mine = owner == part
            out[mine] = self.parts[part][flat[mine] - self.offsets[part]]
        return out.reshape(index.shape)
