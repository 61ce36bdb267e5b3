"""The transformer stack shared by GPT (causal) and BERT (bidirectional)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmexp.models.config import ModelConfig
from lmexp.models.kv_cache import KVCache

Rope = tuple[Tensor, Tensor]
"""Rotary cos and sin tables for the positions of the current input, each (T, hs), or
(B, 1, T, hs) when rows have their own positions (a left-padded batch)."""


class RotaryEmbedding(nn.Module):
    """Rotary position tables (RoPE, rotate-half layout), precomputed for the whole context."""

    def __init__(self, head_dim: int, max_length: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_length, dtype=torch.float32), inv_freq)  # (L, hs/2)
        angles = torch.cat((angles, angles), dim=-1)  # (L, hs)
        # Not persistent: derived from the config, so checkpoints need not carry them.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, offset: int, length: int) -> Rope:
        """Tables for positions [offset, offset + length)."""
        return self.cos[offset : offset + length], self.sin[offset : offset + length]

    def at(self, positions: Tensor) -> Rope:
        """Tables for per-row positions (B, T) -> each (B, 1, T, hs), broadcasting over heads."""
        return self.cos[positions][:, None], self.sin[positions][:, None]


def apply_rotary(x: Tensor, rope: Rope) -> Tensor:
    """Rotate queries or keys (B, nh, T, hs) by their positions' angles."""
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention (fused kernels when available)."""

    def __init__(self, config: ModelConfig, causal: bool, layer_idx: int = 0) -> None:
        super().__init__()
        self.causal = causal
        self.layer_idx = layer_idx
        self.n_head = config.heads_in(layer_idx)
        self.head_dim = config.head_dim
        inner = self.n_head * self.head_dim  # n_embd unless heads were pruned
        self.dropout = config.dropout
        # One fused projection: rows [0, inner) are queries, then keys, then values, head by head.
        self.qkv = nn.Linear(config.n_embd, 3 * inner, bias=config.bias)
        self.out_proj = nn.Linear(inner, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # QK-norm: RMSNorm over each head's queries and keys (one learned scale per head dimension,
        # shared by the heads), so their dot products stay bounded. Off, no modules (nor weights).
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else None

    def forward(
        self,
        x: Tensor,
        rope: Rope | None = None,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """x (B, T, C) -> (B, T, C).

        attn_mask is boolean, True where a query may attend to a key, broadcastable to
        (B, nh, T, S) with S the number of keys (cached plus new); causality is added here.
        """
        B, T, _ = x.shape
        hs = self.head_dim
        q, k, v = self.qkv(x).split(self.n_head * hs, dim=2)
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.q_norm is not None:
            # Before rotary positions, and before the cache: cached keys are stored normalised.
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, past + T, hs)
        # The fused causal path assumes queries and keys start at the same position.
        is_causal = self.causal and attn_mask is None and past == 0
        if self.causal and not is_causal and T > 1:
            # Query i sits at position past + i and sees keys [0, past + i].
            causal_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device)
            causal_mask = causal_mask.tril(diagonal=past)  # (T, S)
            attn_mask = causal_mask if attn_mask is None else attn_mask & causal_mask
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * hs)
        return self.resid_dropout(self.out_proj(y))


class SquaredReLU(nn.Module):
    """relu(x)**2 (Primer, modded-nanoGPT)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x).square()


def activation(config: ModelConfig) -> nn.Module:
    """The config's activation: exact GELU, its tanh approximation (GPT-2's gelu_new), or squared ReLU."""
    if config.activation == "relu2":
        return SquaredReLU()
    return nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")


def layer_norm(config: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        hidden = config.mlp_hidden_in(layer_idx)
        self.fc_in = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.act = activation(config)
        self.out_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.out_proj(self.act(self.fc_in(x))))


class Block(nn.Module):
    """Transformer block. Pre-LayerNorm (normalising inside the residual branches) keeps deep
    stacks stable; post-LayerNorm (normalising each residual sum) is the original BERT's."""

    def __init__(self, config: ModelConfig, causal: bool, layer_idx: int = 0) -> None:
        super().__init__()
        self.post_norm = config.norm_position == "post"
        self.ln1 = layer_norm(config)
        self.attn = Attention(config, causal, layer_idx)
        self.ln2 = layer_norm(config)
        self.mlp = MLP(config, layer_idx)

    def forward(
        self,
        x: Tensor,
        rope: Rope | None = None,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        if self.post_norm:
            x = self.ln1(x + self.attn(x, rope, attn_mask, cache))
            return self.ln2(x + self.mlp(x))
        x = x + self.attn(self.ln1(x), rope, attn_mask, cache)
        return x + self.mlp(self.ln2(x))


class TransformerTrunk(nn.Module):
    """Embeddings, blocks and (pre-LayerNorm) the final LayerNorm: everything but the task head."""

    def __init__(self, config: ModelConfig, causal: bool, token_types: bool = False) -> None:
        super().__init__()
        self.config = config
        self.causal = causal
        self.tok_emb = nn.Embedding(config.require_vocab_size(), config.n_embd)
        learned = config.position == "learned"
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if learned else None
        self.rotary = None if learned else RotaryEmbedding(config.head_dim, config.block_size)
        self.type_emb = nn.Embedding(config.type_vocab_size, config.n_embd) if token_types else None
        self.emb_norm = layer_norm(config) if config.embedding_norm else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, causal, i) for i in range(config.n_layer))
        # Post-LayerNorm blocks already end normalised.
        self.ln_f = layer_norm(config) if config.norm_position == "pre" else None

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        cache: KVCache | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """input_ids (B, T) -> hidden states (B, T, C).

        attention_mask (B, T): 1 for real tokens, 0 for padding that no token may attend to; with
        a cache it covers the new tokens only (the cache keeps the mask of the positions it holds).
        In a causal model with padding, positions count from each row's first real token, so a
        left-padded row gets the same result as its tokens alone; otherwise positions are 0..T-1
        after the cached ones (and causal attention keeps its fused kernel).

        document_ids (B, T) pack several documents into one row (supervised fine-tuning packs
        prompt/response pairs): a token attends only to the tokens of its own document, and
        positions restart at 0 where each document starts. A document is a run of equal ids along a
        row, each document of a row with its own id (0, 1, 2, ...); padding has a negative id (-1), and a pad token attends only to padding (its
        output is meaningless and must not be scored). Not with a cache: generation continues one
        document.
        """
        B, T = input_ids.shape
        past = self._check_input(B, T, cache)
        if document_ids is not None and (cache is not None or document_ids.shape != input_ids.shape):
            raise ValueError(
                f"document_ids {tuple(document_ids.shape)} must match input_ids {tuple(input_ids.shape)} and come "
                "without a cache: pass one document id per input token, and generate without document_ids"
            )
        if cache is not None:
            key_mask = cache.update_mask(attention_mask, T)  # (B, past + T) or None
        else:
            key_mask = attention_mask.bool() if attention_mask is not None else None
        # Per-row positions only for a causal model given a mask (left-padded prompts) or packed
        # documents; the unmasked path stays as cheap as before. A bidirectional model numbers
        # positions 0..T-1 whatever the padding, as BERT does.
        positions = None
        if document_ids is not None:
            positions = document_positions(document_ids)
        elif key_mask is not None and self.causal:
            positions = (key_mask.long().cumsum(dim=1)[:, past:] - 1).clamp(min=0)
        x = self.tok_emb(input_ids)  # (B, T, C)
        if self.pos_emb is not None:
            if positions is None:
                x = x + self.pos_emb(torch.arange(past, past + T, device=input_ids.device))  # (T, C) broadcast
            else:
                x = x + self.pos_emb(positions)  # (B, T, C)
        if self.type_emb is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.type_emb(token_type_ids)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        rope = None
        if self.rotary is not None:
            rope = self.rotary(past, T) if positions is None else self.rotary.at(positions)
        mask = self._attention_mask(key_mask, past, T)
        if document_ids is not None:
            # (B, 1, T, T): same document only (Attention adds causality); every query keeps its
            # own key, so a row whose keys are all masked cannot give NaN.
            same = document_ids[:, None, :, None] == document_ids[:, None, None, :]
            same = same | torch.eye(T, dtype=torch.bool, device=same.device)
            mask = same if mask is None else mask & same
        recompute = self.config.activation_checkpointing and self.training and cache is None
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x) if self.ln_f is not None else x

    def _attention_mask(self, key_mask: Tensor | None, past: int, length: int) -> Tensor | None:
        """The padding mask (B, S) as an attention mask broadcastable to (B, nh, T, S).

        In a causal model a pad query of a left-padded row sees only pad keys: with all of its
        keys masked, attention would give NaN, which then reaches real rows through the next
        layer's values (NaN times a zero weight is NaN). So every query may also attend to its
        own key; a real query could anyway, and a pad query's output is never used.
        """
        if key_mask is None:
            return None
        mask = key_mask[:, None, None, :]  # (B, 1, 1, S)
        if self.causal:
            keys = torch.arange(key_mask.size(1), device=key_mask.device)
            queries = torch.arange(past, past + length, device=key_mask.device)
            mask = mask | (keys[None, :] == queries[:, None])  # (B, 1, T, S)
        return mask

    def _check_input(self, batch_size: int, length: int, cache: KVCache | None) -> int:
        """Validate the input against the context and cache; return the number of cached positions."""
        block_size = self.config.block_size
        if cache is None:
            if length > block_size:
                raise ValueError(
                    f"input has {length} tokens but block_size={block_size}: "
                    f"crop inputs to at most {block_size} tokens"
                )
            return 0
        if cache.batch_size != batch_size:
            raise ValueError(
                f"input batch size {batch_size} does not match the KV cache's {cache.batch_size}: "
                "make the cache with the input's batch size"
            )
        if cache.length + length > block_size:
            raise ValueError(
                f"{cache.length} cached + {length} new tokens exceed block_size={block_size}: "
                "reset the cache and prefill a cropped context"
            )
        return cache.length


def document_positions(document_ids: Tensor) -> Tensor:
    """(B, T) document ids -> each token's position within its document (runs of equal ids)."""
    T = document_ids.size(1)
    index = torch.arange(T, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def init_gpt2_weights(model: nn.Module, n_layer: int) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, and residual output projections
    scaled by 1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.RMSNorm):  # qk_norm's
            nn.init.ones_(module.weight)
    for module in model.modules():
        if isinstance(module, (Attention, MLP)):
            nn.init.normal_(module.out_proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
