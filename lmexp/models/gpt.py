"""GPT: decoder-only causal language model."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from lmexp.models.config import ModelConfig
from lmexp.models.heads import ClassificationHead, last_token_pool
from lmexp.models.kv_cache import KVCache
from lmexp.models.layers import TransformerTrunk, init_gpt2_weights


class GPT(nn.Module):
    """Causal transformer trunk and a linear head predicting the next token at every position;
    with ``config.labels``, also a classification head on the last real token.

    Answers the calls every lmexp network answers (``hidden_states``, ``logits``, ``pooled``,
    ``classify``), so callers need not know which architecture they hold.
    """

    accepts_attention_mask: ClassVar[bool] = True
    """``forward`` takes an attention_mask, so a left-padded batch of prompts can be generated."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = TransformerTrunk(config, causal=True)
        self.lm_head = nn.Linear(config.n_embd, config.require_vocab_size(), bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.trunk.tok_emb.weight
        self.classifier = (
            ClassificationHead(config.n_embd, config.num_labels, config.classifier_dropout) if config.labels else None
        )
        init_gpt2_weights(self, config.n_layer)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """input_ids (B, T) -> logits (B, T, V).

        attention_mask (B, T), 1 = real token, lets a left-padded batch of prompts give each row
        the logits of its prompt alone (positions count from the row's first real token). With a
        cache, input_ids (and the mask) are the tokens after the cached ones; the cache is extended
        and remembers the mask. document_ids (B, T) keep documents packed into one row apart (each
        sees only itself, positions restart per document; -1 = padding): see ``TransformerTrunk``.
        """
        return self.logits(input_ids, attention_mask, cache=cache, document_ids=document_ids)

    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        cache: KVCache | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """input_ids (B, T) -> final hidden states (B, T, C); masks, cache and documents as in ``forward``.

        token_type_ids are accepted for a uniform interface and ignored: a GPT has no segment
        embeddings (a pair is told apart by its separator tokens).
        """
        return self.trunk(input_ids, attention_mask=attention_mask, cache=cache, document_ids=document_ids)

    def logits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        cache: KVCache | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """input_ids (B, T) -> next-token logits (B, T, V) at every position."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, token_type_ids, cache, document_ids))

    def pooled(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """input_ids (B, T), right-padded -> (B, C): each row's last real token's state.

        Causal attention keeps right padding from reaching any real token, so the mask is needed
        only to find each row's last real token (and the fused causal kernel stays in use).
        """
        return self.pool(self.trunk(input_ids), attention_mask)

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
            [c.heads_in(layer) for layer in range(c.n_layer)],
            c.block_size,
            c.head_dim,
            device=device if device is not None else weight.device,
            dtype=dtype if dtype is not None else weight.dtype,
        )

    def pool(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """hidden (B, T, C) -> (B, C): the last real token's state (mask 1 = real token)."""
        return last_token_pool(hidden, attention_mask)

    def classify(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """input_ids (B, T), right-padded -> label logits (B, num_labels), from ``pooled``."""
        if self.classifier is None:
            raise ValueError("this GPT has no classification head: build it with labels in its config")
        return self.classifier(self.pooled(input_ids, attention_mask, token_type_ids))
