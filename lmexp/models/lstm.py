"""LSTM language model: the recurrent baseline."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from lmexp.models.config import ModelConfig


class LSTMLM(nn.Module):
    """Embedding, stacked LSTM and an output projection (tied to the embedding by default).

    Answers ``hidden_states`` and ``logits`` as the transformers do; it has no classification
    head (``pooled`` and ``classify`` are transformer-only).
    """

    accepts_attention_mask: ClassVar[bool] = False
    """A recurrence reads every position in order: it cannot skip left padding."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        vocab_size = config.require_vocab_size()
        self.tok_emb = nn.Embedding(vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(
            config.n_embd,
            config.n_embd,
            num_layers=config.n_layer,
            bias=config.bias,
            batch_first=True,
            dropout=config.dropout if config.n_layer > 1 else 0.0,
        )
        self.lm_head = nn.Linear(config.n_embd, vocab_size, bias=config.bias)
        # Small uniform init: with tying, N(0, 1) embeddings would give huge initial logits.
        nn.init.uniform_(self.tok_emb.weight, -0.1, 0.1)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        else:
            nn.init.uniform_(self.lm_head.weight, -0.1, 0.1)
        if self.lm_head.bias is not None:
            nn.init.zeros_(self.lm_head.bias)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, T) -> logits (B, T, V), each position seeing only the tokens before it."""
        return self.logits(input_ids)

    def hidden_states(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """input_ids (B, T) -> LSTM outputs (B, T, C).

        The masks are accepted for a uniform interface and not used: a position sees only the
        tokens before it, so right padding never reaches a real token (left padding would; see
        ``accepts_attention_mask``), and there are no segments.
        """
        x, _ = self.lstm(self.drop(self.tok_emb(input_ids)))
        return x

    def logits(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """input_ids (B, T) -> next-token logits (B, T, V)."""
        return self.lm_head(self.drop(self.hidden_states(input_ids, attention_mask, token_type_ids)))
