"""How close a model's continuations of held-out text come to the real ones: BLEU and ROUGE-L.

Perplexity says how likely the true text is; these say how much of it greedy decoding
reproduces, which is what a user reading generated text sees. Both are computed on words
(whitespace-separated) of the decoded text, so models with different tokenizers compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from lmexp.generation import generate


class Decoder(Protocol):
    """What is needed of a tokenizer (an HF ``tokenizers.Tokenizer`` is one)."""

    def decode(self, ids: list[int]) -> str: ...


def continuation_scores(
    model: nn.Module,
    tokenizer: Decoder,
    documents: Sequence[Sequence[int]],
    prompt_tokens: int,
    continuation_tokens: int,
    batch_size: int = 16,
    use_cache: bool = True,
) -> dict[str, float]:
    """BLEU and ROUGE-L of greedy continuations of held-out passages against the true ones.

    Each passage (a list of token ids) of at least prompt_tokens + continuation_tokens tokens
    is split into its first prompt_tokens tokens, the prompt, and the next continuation_tokens,
    the reference; shorter passages are skipped. The model continues every prompt greedily by
    continuation_tokens tokens (batches of batch_size; all prompts have the same length, so no
    padding is needed), and generation and reference are decoded and compared as words:

    - ``bleu``: corpus BLEU-4 (torchmetrics ``BLEUScore(n_gram=4, smooth=True)``: n-gram counts
      pooled over all passages, add-one smoothing of the 2- to 4-gram precisions, which short
      continuations need). It is 0 when no 4-gram matches anywhere, so give continuations of
      several words.
    - ``rougeL``: ROUGE-L F-measure (longest common word subsequence), averaged over passages;
      torchmetrics computes it without nltk.
    - ``n``: the number of passages scored.
    """
    from torchmetrics.text import BLEUScore, ROUGEScore  # training-stack dependency: only here

    if prompt_tokens < 1 or continuation_tokens < 1:
        raise ValueError(
            f"prompt_tokens={prompt_tokens} and continuation_tokens={continuation_tokens} must both be "
            "at least 1: a continuation needs a prompt and something to compare"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: use 1 or more passages per batch")
    needed = prompt_tokens + continuation_tokens
    passages = [list(doc[:needed]) for doc in documents if len(doc) >= needed]
    if not passages:
        raise ValueError(
            f"no passage has prompt_tokens + continuation_tokens = {needed} tokens "
            f"(longest: {max((len(d) for d in documents), default=0)}): use shorter prompts or continuations"
        )
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    known = _vocab_size(tokenizer)
    generated: list[str] = []
    references: list[str] = []
    for begin in range(0, len(passages), batch_size):
        batch = torch.tensor(passages[begin : begin + batch_size], device=device)
        out = generate(model, batch[:, :prompt_tokens], continuation_tokens, temperature=0, use_cache=use_cache)
        for new, true in zip(out[:, prompt_tokens:].tolist(), batch[:, prompt_tokens:].tolist()):
            generated.append(_decode(tokenizer, new, known))
            references.append(_decode(tokenizer, true, known))
    bleu = BLEUScore(n_gram=4, smooth=True)(generated, [[r] for r in references])
    rouge = ROUGEScore(rouge_keys="rougeL")(generated, references)["rougeL_fmeasure"]
    return {"bleu": float(bleu), "rougeL": float(rouge), "n": len(passages)}


def _vocab_size(tokenizer: Decoder) -> int | None:
    get = getattr(tokenizer, "get_vocab_size", None)
    return get() if callable(get) else None


def _decode(tokenizer: Decoder, ids: list[int], known: int | None) -> str:
    """Text of ids; ids beyond the tokenizer's vocabulary (a padded model vocabulary) have none."""
    return tokenizer.decode(ids if known is None else [i for i in ids if i < known])
