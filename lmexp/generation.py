"""Autoregressive sampling from language models (pure PyTorch)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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


def supports_attention_mask(model: nn.Module) -> bool:
    """Whether model.forward takes an attention_mask, which a left-padded batch needs.

    A model says so in its ``accepts_attention_mask`` attribute (lmexp's networks all do). One
    that does not say is taken not to: its prompts are then batched by length or right-padded,
    which always works, where passing a mask it does not take would fail.
    """
    return bool(getattr(model, "accepts_attention_mask", False))


def first_nonfinite(model: nn.Module) -> str | None:
    """The name of the first weight holding NaN or inf, if any: such a network (trained past a
    divergence) yields NaN logits, which sampling cannot draw from."""
    for name, tensor in model.named_parameters():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


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
    attention_mask: Tensor | None = None,
    repetition_penalty: float = 1.0,
    stopping: Callable[[Tensor], bool] | None = None,
) -> Tensor:
    """Extend prompts input_ids (B, T) by up to max_new_tokens tokens -> (B, T + new).

    Any model whose forward(input_ids) returns logits (B, T, V) works; models with `make_cache`
    (GPT) decode incrementally with a KV cache when use_cache. With eos_id, finished rows are
    padded with eos_id and generation stops early once every row has produced it. stopping, if
    given, is called with the tokens so far (B, n) after every new token and ends generation
    when it returns True (stop strings need the tokenizer, so they live in its caller).

    Prompts of different lengths go in one batch left-padded, with attention_mask (B, T) 1 for
    real tokens and 0 for the padding before them; the model must take an attention_mask and say
    so (``supports_attention_mask``; GPT does: each row then gets the tokens of its prompt alone,
    while the batch fits the context). Several samples of one prompt are rows repeated by the caller.

    repetition_penalty (CTRL, as in HF transformers) divides the positive logits and multiplies
    the negative ones of every token already in the row, prompt included; 1.0 disables it.

    Past the model's context L (config.block_size) the model sees a window of the latest tokens
    whose start moves window_shift tokens at a time: with n tokens so far it sees [start, n),
    where start is 0 while n <= L, else the smallest multiple of window_shift with n - start <= L,
    so between L - window_shift + 1 and L tokens. Cached keys cannot slide (their positions are
    baked into them), so each move re-encodes the window into a fresh cache, once per
    window_shift new tokens. window_shift=1 is the exact sliding window (always the last L tokens)
    and re-encodes L tokens for every new token; None means max(1, L // 4). Cached and uncached
    generation follow the same rule, so use_cache changes the speed, not the tokens. Padding
    columns count in n (they are dropped as the window moves past them).
    """
    _check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} is negative: use 0 or more")
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise ValueError(
            f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}"
        )
    if not repetition_penalty > 0:
        raise ValueError(
            f"repetition_penalty={repetition_penalty} is invalid: use a value > 0 "
            "(1.0 disables it, above 1 discourages repeats, e.g. 1.2)"
        )
    config = getattr(model, "config", None)
    block_size: int | None = getattr(config, "block_size", None)
    if block_size is not None and input_ids.size(1) > block_size:
        raise ValueError(
            f"prompt has {input_ids.size(1)} tokens but the model's context is "
            f"block_size={block_size}: shorten the prompt"
        )
    shift = _window_shift(window_shift, block_size)
    pad_columns = _check_attention_mask(attention_mask, input_ids, model)

    was_training = model.training
    model.eval()
    try:
        batch, length = input_ids.shape
        cache = model.make_cache(batch) if use_cache and hasattr(model, "make_cache") else None
        # Written in place: concatenating every step would copy the whole sequence per token.
        tokens = input_ids.new_empty(batch, length + max_new_tokens)
        tokens[:, :length] = input_ids
        mask = None
        if pad_columns:  # generated tokens are real; no mask at all when nothing is padding
            mask = torch.ones_like(tokens, dtype=torch.bool)
            mask[:, :length] = attention_mask.bool()
        seen = None  # (B, V) tokens already in each row, for the repetition penalty
        cache_start = 0  # first position of the window the cache holds
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            start = _window_start(length, block_size, shift)
            # Once the window has moved past every pad column, no mask is needed.
            window_mask = mask if start < pad_columns else None
            if cache is None:
                logits = _forward(model, tokens[:, start:length], window_mask, start, length)
            else:
                if start != cache_start:
                    cache.reset()
                    cache_start = start
                logits = _forward(model, tokens[:, start + cache.length : length], window_mask,
                                  start + cache.length, length, cache=cache)
            next_logits = logits[:, -1]  # (B, V)
            if repetition_penalty != 1.0:
                if seen is None:
                    seen = _tokens_seen(tokens[:, :length], mask, next_logits.size(-1))
                next_logits = _penalize_repeats(next_logits, seen, repetition_penalty)
            next_token = _sample(next_logits, temperature, top_k, top_p, generator)  # (B, 1)
            if eos_id is not None:
                next_token = next_token.masked_fill(finished[:, None], eos_id)
                finished |= next_token[:, 0] == eos_id
            tokens[:, length : length + 1] = next_token
            length += 1
            if seen is not None:
                seen.scatter_(1, next_token, True)
            if eos_id is not None and bool(finished.all()):
                break
            if stopping is not None and stopping(tokens[:, :length]):
                break
        return tokens if length == tokens.size(1) else tokens[:, :length].clone()
    finally:
        model.train(was_training)


def _forward(
    model: nn.Module, input_ids: Tensor, mask: Tensor | None, begin: int, end: int, **kwargs: object
) -> Tensor:
    """model(input_ids), with the padding mask of columns [begin, end) when there is one."""
    if mask is None:
        return model(input_ids, **kwargs)
    try:
        return model(input_ids, attention_mask=mask[:, begin:end], **kwargs)
    except TypeError as error:
        if "attention_mask" not in str(error):
            raise
        raise ValueError(_no_mask_message(model)) from None


def _no_mask_message(model: nn.Module) -> str:
    return (f"{type(model).__name__}.forward takes no attention_mask, so it cannot read a left-padded batch: "
            "generate prompts of different lengths one at a time")


def _check_attention_mask(attention_mask: Tensor | None, input_ids: Tensor, model: nn.Module) -> int:
    """Validate a left-padding mask; return the number of columns that hold padding in some row."""
    if attention_mask is None:
        return 0
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}: "
            "give one mask value per prompt token"
        )
    values = attention_mask.long()
    if not bool(((values == 0) | (values == 1)).all()):
        raise ValueError("attention_mask holds values other than 0 and 1: use 1 for real tokens, 0 for padding")
    if not bool((values[:, 1:] >= values[:, :-1]).all()) or not bool(values[:, -1].all()):
        raise ValueError(
            "attention_mask is not left padding (each row: zeros, then at least one 1 up to the end): "
            "pad prompts on the left, as generation appends on the right"
        )
    pad_columns = int((values == 0).sum(dim=1).max())
    if pad_columns and not supports_attention_mask(model):
        raise ValueError(_no_mask_message(model))
    return pad_columns


def _tokens_seen(tokens: Tensor, mask: Tensor | None, vocab_size: int) -> Tensor:
    """(B, V) True for every token in each row (pad columns left out)."""
    counts = torch.zeros(tokens.size(0), vocab_size, dtype=torch.long, device=tokens.device)
    real = torch.ones_like(tokens) if mask is None else mask[:, : tokens.size(1)].long()
    return counts.scatter_add_(1, tokens, real) > 0


def _penalize_repeats(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty: seen tokens' logits move towards -inf by the factor penalty."""
    logits = logits.float()
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


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


def stop_string_check(
    decode: Callable[[list[int]], str], stops: list[str], prompt_width: int, eos_id: int | None = None
) -> Callable[[Tensor], bool]:
    """A `stopping` for generate: True once every row's new text (the tokens after the first
    prompt_width columns, as decode turns them into text) holds one of the stop strings, or (with
    eos_id, which generate is given too) the row has produced eos_id.

    Stop strings are text, not tokens (one may span several tokens, or end inside one), so rows
    are decoded; a row that has one stays done, so only unfinished rows are decoded again. Rows
    ended by eos count as done: otherwise a batch whose rows end some by eos and some by a stop
    string would run to max_new_tokens.
    """
    done: set[int] = set()

    def stopping(tokens: Tensor) -> bool:
        rows = tokens[:, prompt_width:].tolist()
        for i, ids in enumerate(rows):
            if i not in done:
                if eos_id is not None and eos_id in ids:
                    done.add(i)
                    continue
                text = decode(ids)
                if any(stop in text for stop in stops):
                    done.add(i)
        return len(done) == len(rows)

    return stopping


def complete(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    decode: Callable[[list[int]], str],
    max_new_tokens: int,
    stops: Sequence[str] = (),
    eos_id: int | None = None,
    batch_size: int = 64,
    temperature: float = 0.0,
    **sampling: Any,
) -> list[str]:
    """The new text of each prompt (token ids), greedy by default: what the model answers.

    Each row ends at eos_id (left out of the text), at the first stop string (cut before it), or
    after max_new_tokens. Prompts go batch_size at a time, longest first so that rows of a batch
    have similar lengths; left-padded with an attention mask where the model takes one, else
    batched by equal length. ``sampling`` passes on to ``generate`` (top_k, generator, ...).
    """
    stops = list(stops)
    if "" in stops:
        raise ValueError(f"stops={stops!r} contains an empty string, which would end every answer at once: remove it")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: use a positive number of prompts")
    if any(len(ids) == 0 for ids in prompts):
        raise ValueError("a prompt has no tokens: every row needs at least one")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    if supports_attention_mask(model):
        groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    else:  # no mask: one batch per prompt length
        by_length: dict[int, list[int]] = {}
        for i in order:
            by_length.setdefault(len(prompts[i]), []).append(i)
        groups = [same[i : i + batch_size] for same in by_length.values() for i in range(0, len(same), batch_size)]
    device = _model_device(model)
    texts = [""] * len(prompts)
    for group in groups:
        width = max(len(prompts[i]) for i in group)
        pads = [width - len(prompts[i]) for i in group]
        ids = torch.tensor([[0] * pad + list(prompts[i]) for i, pad in zip(group, pads)], device=device)
        mask = torch.tensor([[0] * pad + [1] * (width - pad) for pad in pads], device=device)
        stopping = stop_string_check(decode, stops, width, eos_id) if stops else None
        out = generate(model, ids, max_new_tokens, temperature, eos_id=eos_id,
                       attention_mask=mask if any(pads) else None, stopping=stopping, **sampling)
        for i, row in zip(group, out[:, width:].tolist()):
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id)]
            texts[i] = cut_at_stop(decode(row), stops)
    return texts


def cut_at_stop(text: str, stops: list[str]) -> str:
    """text up to (not including) the earliest occurrence of any stop string."""
    return text[: min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=len(text))]


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.inference_mode()
def score_continuations(
    model: nn.Module,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 32,
    length_normalize: bool = False,
) -> Tensor:
    """log p(continuation | prompt) per ``(prompt ids, continuation ids)`` row -> (len(rows),).

    One forward per row. Rows are batched by length; a model that says it takes an attention mask
    (``supports_attention_mask``) gets them left-padded (continuations end together), others
    right-padded, which a causal model's real positions never see. The logits at position i predict token i + 1, so the
    continuation's tokens at [s, s + m) are read from the logits at [s - 1, s + m - 1).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: use a positive number of rows")
    left = supports_attention_mask(model)
    device = _model_device(model)
    for prompt, continuation in rows:
        if not prompt or not continuation:
            raise ValueError("every row needs a non-empty prompt and a non-empty continuation")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]), reverse=True)
    scores = torch.zeros(len(rows), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        for begin in range(0, len(order), batch_size):
            index = order[begin : begin + batch_size]
            sequences = [list(rows[i][0]) + list(rows[i][1]) for i in index]
            width = max(len(seq) for seq in sequences)
            ids = torch.zeros(len(index), width, dtype=torch.long)
            mask = torch.zeros(len(index), width, dtype=torch.long)
            starts, lengths = [], []
            for r, (i, seq) in enumerate(zip(index, sequences)):
                offset = width - len(seq) if left else 0
                ids[r, offset : offset + len(seq)] = torch.tensor(seq)
                mask[r, offset : offset + len(seq)] = 1
                starts.append(offset + len(rows[i][0]))
                lengths.append(len(rows[i][1]))
            ids = ids.to(device)
            if left and not bool(mask.all()):
                logits = model(ids, attention_mask=mask.to(device))
            else:
                logits = model(ids)  # nothing padded, or right padding a causal model never sees
            steps = torch.arange(max(lengths), device=device)  # (M,)
            length = torch.tensor(lengths, device=device)[:, None]  # (B, 1)
            valid = steps[None, :] < length  # (B, M)
            target_at = (torch.tensor(starts, device=device)[:, None] + steps).clamp(max=width - 1)  # (B, M)
            batch_rows = torch.arange(len(index), device=device)[:, None]
            log_probs = logits[batch_rows, target_at - 1].float().log_softmax(dim=-1)  # (B, M, V)
            token_log_probs = log_probs.gather(-1, ids[batch_rows, target_at].unsqueeze(-1)).squeeze(-1)  # (B, M)
            total = torch.where(valid, token_log_probs, torch.zeros_like(token_log_probs)).sum(dim=1)
            if length_normalize:
                total = total / length.squeeze(1)
            scores[index] = total.cpu()
    finally:
        model.train(was_training)
    return scores
