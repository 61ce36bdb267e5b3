"""Task heads that sit on a transformer's hidden states, and the pooling that feeds them.

They belong to the network (not to a training objective) so that a checkpoint or export holds
the whole model: ``load_checkpoint`` returns a classifier that classifies.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ClassificationHead(nn.Module):
    """Pooled state (B, C) -> label logits (B, num_labels)."""

    def __init__(self, n_embd: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(n_embd, num_labels)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.out_proj(self.dropout(pooled))


def last_token_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """hidden (B, T, C) -> (B, C): each row's last real token, the only one a causal model lets
    see the whole sequence. Works for right and left padding (mask 1 = real token)."""
    if attention_mask is None:
        return hidden[:, -1]
    positions = torch.arange(hidden.size(1), device=hidden.device)
    last = (attention_mask.bool() * positions).amax(dim=1)  # (B,)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
