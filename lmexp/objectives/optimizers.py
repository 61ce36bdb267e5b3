"""Muon for a transformer's hidden weight matrices, AdamW for everything else, as one optimizer.

Muon (``torch.optim.Muon``) orthogonalizes each matrix's momentum before the update, which lets
the hidden layers take larger, better-conditioned steps; it is defined for 2-D weights only, so
embeddings, output heads, norms and biases stay with AdamW. Both live in one ``Optimizer`` so
that the trainer, the LR schedule, gradient clipping and checkpoints see a single optimizer
(Lightning's automatic optimization takes one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lmexp.models.layers import Block


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weight matrices of the linear layers inside transformer blocks: what Muon trains.

    Embeddings, the LM head (often tied to the embedding), classifier and pooler sit outside the
    blocks and stay with AdamW, as Muon's authors recommend for input and output layers.
    """
    seen: set[int] = set()
    matrices = []
    for block in (m for m in model.modules() if isinstance(m, Block)):
        for layer in (m for m in block.modules() if isinstance(m, nn.Linear)):
            weight = layer.weight
            if weight.requires_grad and id(weight) not in seen:
                seen.add(id(weight))
                matrices.append(weight)
    return matrices


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon over ``muon_groups`` and AdamW over ``adamw_groups``, stepped together.

    The param groups are the two optimizers' own group dicts (Muon's first), so an LR scheduler
    sets both learning rates; the state is one dict shared by both (their parameters are
    disjoint), so ``state_dict``/``load_state_dict`` and device moves work as for any optimizer.
    Muon's step size is adjusted to match AdamW's update RMS (``match_rms_adamw``), so the same
    learning rate and weight decay suit both halves.
    """

    def __init__(
        self,
        muon_groups: Iterable[dict[str, Any]],
        adamw_groups: Iterable[dict[str, Any]],
        lr: float,
        muon_lr: float,
        betas: tuple[float, float],
        momentum: float = 0.95,
        fused: bool | None = None,
    ) -> None:
        self.muon = torch.optim.Muon(list(muon_groups), lr=muon_lr, momentum=momentum, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(list(adamw_groups), lr=lr, betas=betas, fused=fused)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, defaults={})
        self._link()

    def _link(self) -> None:
        """Point both halves at this optimizer's groups and state (after init or a load)."""
        n_muon = len(self.muon.param_groups)
        self.muon.param_groups = self.param_groups[:n_muon]
        self.adamw.param_groups = self.param_groups[n_muon:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # replaces the group dicts and the state
        self._link()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss
