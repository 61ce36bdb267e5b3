"""Autoregressive sampling from language models (pure PyTorch)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def sample_next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row from logits (B, V) -> (B, 1).

    temperature 0 is greedy argmax; top_k keeps the k most likely tokens; top_p keeps the smallest
    set of most likely tokens whose probability reaches p (nucleus sampling).
    """
    _check_sampling(temperature, top_k, top_p)
    return _sample(logits, temperature, top_k, top_p, generator)


def _sample(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """sample_next_token without argument checks, which `generate` does once, not per token."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)


@torch.inference_mode()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
    window_shift: int | None = None,
) -> Tensor:
    """Extend prompts input_ids (B, T) by up to max_new_tokens tokens -> (B, T + new).

    Any model whose forward(input_ids) returns logits (B, T, V) works; models with `make_cache`
    (GPT) decode incrementally with a KV cache when use_cache. With eos_id, finished rows are
    padded with eos_id and generation stops early once every row has produced it.

    Past the model's context L (config.block_size) the model sees a window of the latest tokens
    whose start moves window_shift tokens at a time: with n tokens so far it sees [start, n),
    where start is 0 while n <= L, else the smallest multiple of window_shift with n - start <= L,
    so between L - window_shift + 1 and L tokens. Cached keys cannot slide (their positions are
    baked into them), so each move re-encodes the window into a fresh cache, once per
    window_shift new tokens. window_shift=1 is the exact sliding window (always the last L tokens)
    and re-encodes L tokens for every new token; None means max(1, L // 4). Cached and uncached
    generation follow the same rule, so use_cache changes the speed, not the tokens.
    """
    _check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is negative: use 0 or more")
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise ValueError(
            f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}"
        )
    config = getattr(model, "config", None)
    block_size: int | None = getattr(config, "block_size", None)
    if block_size is not None and input_ids.size(1) > block_size:
        raise ValueError(
            f"prompt has {input_ids.size(1)} tokens but the model's context is "
            f"block_size={block_size}: shorten the prompt"
        )
    shift = _window_shift(window_shift, block_size)
    cache = model.make_cache(input_ids.size(0)) if use_cache and hasattr(model, "make_cache") else None

    was_training = model.training
    model.eval()
    try:
        batch, length = input_ids.shape
        # Written in place: concatenating every step would copy the whole sequence per token.
        tokens = input_ids.new_empty(batch, length + max_new_tokens)
        tokens[:, :length] = input_ids
        cache_start = 0  # first position of the window the cache holds
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            start = _window_start(length, block_size, shift)
            if cache is None:
                logits = model(tokens[:, start:length])
            else:
                if start != cache_start:
                    cache.reset()
                    cache_start = start
                logits = model(tokens[:, start + cache.length : length], cache=cache)
            next_token = _sample(logits[:, -1], temperature, top_k, top_p, generator)  # (B, 1)
            if eos_id is not None:
                next_token = next_token.masked_fill(finished[:, None], eos_id)
                finished |= next_token[:, 0] == eos_id
            tokens[:, length : length + 1] = next_token
            length += 1
            if eos_id is not None and bool(finished.all()):
                break
        return tokens if length == tokens.size(1) else tokens[:, :length].clone()
    finally:
        model.train(was_training)


def _window_start(length: int, block_size: int | None, shift: int) -> int:
    """First position the model sees when length tokens exist (the rule `generate` documents)."""
    if block_size is None or length <= block_size:
        return 0
    return -(-(length - block_size) // shift) * shift  # ceil to a multiple of shift


def _window_shift(window_shift: int | None, block_size: int | None) -> int:
    """The validated window shift; a quarter of the context by default keeps at least 3/4 of it
    in view while one re-encoding of the cache serves many new tokens."""
    if window_shift is None:
        return max(1, block_size // 4) if block_size is not None else 1
    if isinstance(window_shift, bool) or not isinstance(window_shift, int) or window_shift < 1:
        raise ValueError(
            f"window_shift={window_shift!r} is invalid: use a positive number of tokens "
            "(1 for an exact sliding window), or None for a quarter of the context"
        )
    if block_size is not None and window_shift > block_size:
        raise ValueError(
            f"window_shift={window_shift} exceeds the model's context block_size={block_size}: "
            f"use at most {block_size}"
        )
    return window_shift


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ValueError(
            f"temperature={temperature} is invalid: use 0 for greedy decoding or a positive value to sample"
        )
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid: use a positive number of tokens, or None to disable")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is outside (0, 1]: use e.g. 0.9, or None to disable")
