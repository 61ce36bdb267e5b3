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
) -> Tensor:
    """Extend prompts input_ids (B, T) by up to max_new_tokens tokens -> (B, T + new).

    Any model whose forward(input_ids) returns logits (B, T, V) works; models with `make_cache`
    (GPT) decode incrementally with a KV cache when use_cache. Beyond the model's context
    (config.block_size) only the last block_size tokens are fed; with a cache, that window is
    prefilled into a fresh cache. With eos_id, finished rows are padded with eos_id and
    generation stops early once every row has produced it.
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
    cache = model.make_cache(input_ids.size(0)) if use_cache and hasattr(model, "make_cache") else None

    was_training = model.training
    model.eval()
    try:
        tokens = input_ids
        pending = tokens  # tokens not yet in the cache
        finished = torch.zeros(tokens.size(0), dtype=torch.bool, device=tokens.device)
        for _ in range(max_new_tokens):
            if cache is None:
                context = tokens if block_size is None else tokens[:, -block_size:]
                logits = model(context)
            else:
                if cache.length + pending.size(1) > cache.max_length:
                    cache.reset()
                    pending = tokens[:, -cache.max_length :]
                logits = model(pending, cache=cache)
            next_token = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)  # (B, 1)
            if eos_id is not None:
                next_token = next_token.masked_fill(finished[:, None], eos_id)
                finished |= next_token[:, 0] == eos_id
            tokens = torch.cat((tokens, next_token), dim=1)
            pending = next_token
            if eos_id is not None and bool(finished.all()):
                break
        return tokens
    finally:
        model.train(was_training)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ValueError(
            f"temperature={temperature} is invalid: use 0 for greedy decoding or a positive value to sample"
        )
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} is invalid: use a positive number of tokens, or None to disable")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is outside (0, 1]: use e.g. 0.9, or None to disable")
