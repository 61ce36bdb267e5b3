"""GPT: decoder-only causal language model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmexp.models.config import ModelConfig
from lmexp.models.kv_cache import KVCache
from lmexp.models.layers import TransformerTrunk, init_gpt2_weights


class GPT(nn.Module):
    """Causal transformer trunk and a linear head predicting the next token at every position."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = TransformerTrunk(config, causal=True)
        self.lm_head = nn.Linear(config.n_embd, config.require_vocab_size(), bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.trunk.tok_emb.weight
        init_gpt2_weights(self, config.n_layer)

    def forward(self, input_ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """input_ids (B, T) -> logits (B, T, V).

        With a cache, input_ids are the tokens after the cached ones; the cache is extended.
        """
        return self.lm_head(self.trunk(input_ids, cache=cache))

    def make_cache(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache for the full context; device and dtype default to the model's."""
        weight = self.trunk.tok_emb.weight
        c = self.config
        return KVCache(
            c.n_layer,
            batch_size,
            c.n_head,
            c.block_size,
            c.head_dim,
            device=device if device is not None else weight.device,
            dtype=dtype if dtype is not None else weight.dtype,
        )
