"""BERT: bidirectional encoder trained by masked language modelling."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from lmexp.models.config import ModelConfig
from lmexp.models.heads import ClassificationHead
from lmexp.models.layers import TransformerTrunk, activation, init_gpt2_weights, layer_norm


class MaskedLMHead(nn.Module):
    """Transform then decode hidden states to vocabulary logits, as in the original BERT."""

    def __init__(self, config: ModelConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        vocab_size = config.require_vocab_size()
        self.dense = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.act = activation(config)
        self.ln = layer_norm(config)
        self.decoder = nn.Linear(config.n_embd, vocab_size, bias=False)
        if config.tie_embeddings:
            self.decoder.weight = embedding.weight
        # Kept apart from the decoder so the tied weight matrix can stay bias-free.
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.ln(self.act(self.dense(hidden)))) + self.bias  # (B, T, V)


class BERT(nn.Module):
    """Bidirectional transformer with token-type embeddings, a [CLS] pooler and its heads: masked
    LM, sentence order, and (with ``config.labels``) sequence classification. The config says
    which exist (``mlm_head``, ``sop_head``, ``pooler``): an encoder imported without a head has
    none, rather than a random one nothing trains.

    Answers the calls every lmexp network answers (``hidden_states``, ``logits``, ``pooled``,
    ``classify``); ``forward`` returns hidden states, as the masked-LM objective decodes only
    the masked positions (``mlm_logits``).
    """

    accepts_attention_mask: ClassVar[bool] = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = TransformerTrunk(config, causal=False, token_types=True)
        self.mlm_head = MaskedLMHead(config, self.trunk.tok_emb) if config.mlm_head else None
        self.pooler = nn.Linear(config.n_embd, config.n_embd, bias=config.bias) if config.pooler else None
        self.sop_head = nn.Linear(config.n_embd, 2) if config.sop_head else None  # sentence-order prediction (ALBERT)
        self.classifier = (
            ClassificationHead(config.n_embd, config.num_labels, config.classifier_dropout) if config.labels else None
        )
        init_gpt2_weights(self, config.n_layer)

    def add_heads(self, config: ModelConfig) -> list[str]:
        """Make, freshly initialized, the heads ``config`` has and this network lacks (a masked-LM
        objective asked for sentence order on an encoder imported without its head); returns their names."""
        made = []
        if config.mlm_head and self.mlm_head is None:
            self.mlm_head, made = MaskedLMHead(config, self.trunk.tok_emb), [*made, "mlm_head"]
        if config.pooler and self.pooler is None:
            self.pooler, made = nn.Linear(config.n_embd, config.n_embd, bias=config.bias), [*made, "pooler"]
        if config.sop_head and self.sop_head is None:
            self.sop_head, made = nn.Linear(config.n_embd, 2), [*made, "sop_head"]
        embedding = self.trunk.tok_emb.weight
        trained = embedding.detach().clone()
        for name in made:
            head = getattr(self, name).to(embedding.device)
            init_gpt2_weights(head, config.n_layer)
            setattr(self, name, head)
        with torch.no_grad():  # a tied decoder is the trained embedding, which the init above drew anew
            embedding.copy_(trained)
        self.config = config
        return made

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """input_ids (B, T) -> hidden states (B, T, C).

        attention_mask (B, T): 1 for real tokens, 0 for padding; token_type_ids (B, T): segment ids.
        """
        return self.hidden_states(input_ids, attention_mask, token_type_ids)

    def hidden_states(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """input_ids (B, T) -> final hidden states (B, T, C); the same as ``forward``."""
        return self.trunk(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    def logits(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """input_ids (B, T) -> masked-LM logits (B, T, V) at every position."""
        return self.mlm_logits(self(input_ids, attention_mask, token_type_ids))

    def pooled(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """input_ids (B, T) -> (B, C): the pooled [CLS] state (through ``forward``, so its hooks see
        the network run)."""
        return self.pool(self(input_ids, attention_mask, token_type_ids))

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """hidden (B, T, C) -> logits (B, T, V). Apply it to masked positions only to save compute."""
        if self.mlm_head is None:
            raise ValueError("this BERT has no masked-LM head (an encoder imported without one): train it with MaskedLM, "
                             "which adds one, or use its hidden states")
        return self.mlm_head(hidden)

    def pool(self, hidden: Tensor) -> Tensor:
        """hidden (B, T, C) -> (B, C): the [CLS] state, for sequence classification."""
        if self.pooler is None:
            raise ValueError("this BERT has no pooler (imported from a folder without one): fine-tune it with "
                             "SequenceClassification, which adds one")
        return torch.tanh(self.pooler(hidden[:, 0]))

    def classify(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """input_ids (B, T) -> label logits (B, num_labels), from the pooled [CLS] state."""
        if self.classifier is None:
            raise ValueError("this BERT has no classification head: build it with labels in its config")
        return self.classifier(self.pooled(input_ids, attention_mask, token_type_ids))
