"""Muon for a transformer's hidden weight matrices, AdamW for everything else, as one optimizer.

Muon (``torch.optim.Muon``) orthogonalizes each matrix's momentum before the update, which lets
the hidden layers take larger, better-conditioned steps; it is defined for 2-D weights only, so
embeddings, output heads, norms and biases stay with AdamW. Both live in one ``Optimizer`` so
that the trainer, the LR schedule, gradient clipping and checkpoints see a single optimizer
(Lightning's automatic optimization takes one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lmexp.hardware import cpu_has_bf16_units
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


def run_closure(closure: Callable[[], float] | None) -> float | None:
    """What an optimizer's step does first: re-evaluate the loss with gradients on, if asked."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def orthogonalize_fp32(update: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration, as torch's, in fp32 instead of bf16."""
    a, b, c = group["ns_coefficients"]
    x = update.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=group["eps"])
    for _ in range(group["ns_steps"]):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Fp32Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with its Newton-Schulz iteration in fp32, for CPUs without bf16 units.

    torch always orthogonalizes in bf16, which such CPUs emulate: a 4-layer, 128-dim GPT's
    matrices took 1.6 s a step on an AVX2-only CPU, against 0.13 s in fp32. The update is otherwise
    torch's (momentum, Nesterov, the learning-rate adjustment, decoupled decay) and the state is
    the same ``momentum_buffer``, so checkpoints move between the two.
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = run_closure(closure)
        for group in self.param_groups:
            lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = orthogonalize_fp32(update, group)
                A, B = param.shape[:2]
                scale = (
                    0.2 * math.sqrt(max(A, B))
                    if group["adjust_lr_fn"] == "match_rms_adamw"
                    else math.sqrt(max(1, A / B))
                )
                param.mul_(1 - lr * decay)
                param.add_(update.to(param.dtype), alpha=-lr * scale)
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon over ``muon_groups`` and AdamW over ``adamw_groups``, stepped together.

    The param groups are the two optimizers' own group dicts (Muon's first), so an LR scheduler
    sets both learning rates; the state is one dict shared by both (their parameters are
    disjoint), so ``state_dict``/``load_state_dict`` and device moves work as for any optimizer.
    Muon's step size is adjusted to match AdamW's update RMS (``match_rms_adamw``), so the same
    learning rate and weight decay suit both halves. On a CPU without bf16 units Muon
    orthogonalizes in fp32 (``Fp32Muon``).
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
        muon_groups = list(muon_groups)
        on_cpu = all(p.device.type == "cpu" for group in muon_groups for p in group["params"])
        muon = Fp32Muon if on_cpu and not cpu_has_bf16_units() else torch.optim.Muon
        self.muon = muon(muon_groups, lr=muon_lr, momentum=momentum, adjust_lr_fn="match_rms_adamw")
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
        loss = run_closure(closure)
        self.muon.step()
        self.adamw.step()
        return loss


def clip_gradients(parameters: nn.Module | Iterable[torch.Tensor], value: float | None,
                   algorithm: str | None = "norm") -> None:
    """Clip gradients in place as a trainer's ``gradient_clip_val`` / ``gradient_clip_algorithm``
    say: ``value`` clips each element, ``norm`` (or None) the total 2-norm; no value: no clipping.

    Training clips through it where Lightning's precision plugin refuses to (fused optimizers
    under bf16), and the precision probe clips as the run would.
    """
    if not value:
        return
    if algorithm not in (None, "norm", "value"):
        raise ValueError(f"gradient_clip_algorithm={algorithm!r} is unknown: use 'norm' or 'value'")
    params = parameters.parameters() if isinstance(parameters, nn.Module) else parameters
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, value)
    else:
        torch.nn.utils.clip_grad_norm_(params, value)
