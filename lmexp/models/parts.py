"""Finders for the parts of a network that tools act on, by role, and the surgery that removes
attention heads and MLP neurons.

Compression and analysis code asks for "the MLP's input projection of block 3" here instead of
spelling out module paths and the fused query/key/value layout, which are lmexp's to change.
Module names (``trunk.blocks.0.mlp.fc_in``) are still what such tools record and let users
match with patterns: they are the names of the layers for humans and for saved transforms.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmexp.models.config import ModelConfig
from lmexp.models.layers import Block

BLOCKS_PREFIX = "trunk.blocks."
"""What the module names and state-dict keys of the transformer blocks' layers start with."""

_BLOCK_KEY = re.compile(rf"^{re.escape(BLOCKS_PREFIX)}(\d+)\.(.*)$")

BLOCK_ROLES = ("attention_in", "attention_out", "mlp_in", "mlp_out")
"""The linear layers of a block: the fused query/key/value projection, the attention output
projection, the MLP's input and output projections."""

_ROLE_PATHS = {"attention_in": "attn.qkv", "attention_out": "attn.out_proj", "mlp_in": "mlp.fc_in",
               "mlp_out": "mlp.out_proj"}


@dataclass(frozen=True)
class BlockLinears:
    """One transformer block's linear layers by role (``BLOCK_ROLES``), with their module names."""

    index: int
    layers: dict[str, nn.Module]
    """Role -> layer: an ``nn.Linear``, or whatever replaced it (a quantized linear)."""
    names: dict[str, str]
    """Role -> the layer's module name in the network (``trunk.blocks.3.attn.qkv``)."""
    n_head: int
    head_dim: int

    @property
    def attention_width(self) -> int:
        """Features the heads of this block make together (n_head * head_dim)."""
        return self.n_head * self.head_dim

    def value_rows(self) -> Tensor:
        """The rows of ``attention_in``'s weight that make the values, head by head (inner, C)."""
        return self.layers["attention_in"].weight.detach()[2 * self.attention_width:]


def transformer_blocks(model: nn.Module) -> list[Block]:
    """The transformer blocks of a GPT or BERT, bottom first; refused for a network without any."""
    trunk = getattr(model, "trunk", None)
    if trunk is None:
        raise ValueError(f"{type(model).__name__} has no transformer blocks: pass a gpt or bert network")
    return list(trunk.blocks)


def block_linears(model: nn.Module) -> list[BlockLinears]:
    """Each transformer block's linear layers by role, bottom block first."""
    found = []
    for index, block in enumerate(transformer_blocks(model)):
        layers = {role: block.get_submodule(path) for role, path in _ROLE_PATHS.items()}
        names = {role: f"{BLOCKS_PREFIX}{index}.{path}" for role, path in _ROLE_PATHS.items()}
        found.append(BlockLinears(index, layers, names, block.attn.n_head, block.attn.head_dim))
    return found


def block_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module inside the transformer blocks, by module name, in order."""
    return {
        f"{BLOCKS_PREFIX}{index}.{name}": module
        for index, block in enumerate(transformer_blocks(model))
        for name, module in block.named_modules()
        if name
    }


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers inside the transformer blocks (quantized ones included, which subclass
    ``nn.Linear``), by module name, in order; embeddings and heads are not among them."""
    return {name: module for name, module in block_modules(model).items() if isinstance(module, nn.Linear)}


def key_in_blocks(key: str, blocks: Sequence[int]) -> str:
    """The state-dict key (or module name) in a network whose block ``blocks[i]`` is block i here;
    keys outside the blocks are the same in both."""
    match = _BLOCK_KEY.match(key)
    return f"{BLOCKS_PREFIX}{blocks[int(match.group(1))]}.{match.group(2)}" if match else key


def head_features(heads: Tensor, head_dim: int) -> Tensor:
    """The attention output projection's input features of the given heads, head by head."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def keep_heads_and_neurons(
    model: nn.Module, config: ModelConfig, heads: Sequence[Tensor], neurons: Sequence[Tensor]
) -> tuple[ModelConfig, nn.Module]:
    """A smaller network holding only the given attention heads and MLP neurons of each block
    (``heads[i]``, ``neurons[i]``: sorted indices kept in block i), with its config, which lists
    each block's heads and MLP width where they differ from the uniform ones."""
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    for linears, kept_heads, kept_neurons in zip(block_linears(model), heads, neurons, strict=True):
        features = head_features(kept_heads, linears.head_dim)
        inner = linears.attention_width
        qkv_rows = torch.cat([features, inner + features, 2 * inner + features])  # the same heads in q, k and v
        names = linears.names
        _take(state, f"{names['attention_in']}.weight", qkv_rows, dim=0)
        _take(state, f"{names['attention_in']}.bias", qkv_rows, dim=0)
        _take(state, f"{names['attention_out']}.weight", features, dim=1)
        _take(state, f"{names['mlp_in']}.weight", kept_neurons, dim=0)
        _take(state, f"{names['mlp_in']}.bias", kept_neurons, dim=0)
        _take(state, f"{names['mlp_out']}.weight", kept_neurons, dim=1)
    layer_heads = [len(kept) for kept in heads]
    layer_hidden = [len(kept) for kept in neurons]
    smaller = config.replace(
        layer_heads=None if layer_heads == [config.n_head] * config.n_layer else layer_heads,
        layer_mlp_hidden=None if layer_hidden == [config.mlp_ratio * config.n_embd] * config.n_layer else layer_hidden,
    )
    network = type(model)(smaller)
    network.load_state_dict(state)
    return smaller, network


def _take(state: dict[str, Tensor], key: str, index: Tensor, dim: int) -> None:
    """Keep only ``index`` along ``dim`` of one state-dict entry (biases are absent without bias)."""
    if key in state:
        state[key] = state[key].index_select(dim, index).contiguous()
