"""Masked-LM batches: [CLS]/[SEP] framing, 80/10/10 dynamic masking and sentence-order prediction.

Masking is drawn anew for every batch from a generator seeded by (seed, epoch, batch index):
each epoch sees fresh masks (RoBERTa's dynamic masking), yet a resumed run draws the same
masks as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmexp.data.tokenizer import CLS, MASK, MLM_SPECIAL_TOKENS, SEP
from lmexp.errors import ConfigError


class MLMBatchTransform:
    """Turn raw token windows into BERT pre-training batches.

    Of the non-special tokens, ``mlm_probability`` are selected; of those, 80% become [MASK],
    10% a random token and 10% stay as they are. Labels are the original ids at selected
    positions and -100 elsewhere. With ``sentence_order``, each window is cut at a random point
    into segments A and B and, with probability 0.5, emitted as B A (ALBERT's SOP task;
    ``sop_labels`` is 1 for swapped). ``special_tokens`` (the tokenizer's) are never selected
    and never drawn as random replacements.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        mlm_probability: float = 0.15,
        sentence_order: bool = False,
        seed: int = 0,
        special_tokens: Sequence[str] = tuple(MLM_SPECIAL_TOKENS),
    ) -> None:
        if not 0.0 < mlm_probability < 1.0:
            raise ConfigError(f"mlm_probability={mlm_probability} must be in (0, 1), typically 0.15")
        missing = [t for t in (CLS, SEP, MASK) if t not in vocab]
        if missing:
            raise ConfigError(
                f"the tokenizer lacks the special tokens {missing} that masked LM needs: "
                "train the tokenizer for masked_lm (data.task: masked_lm)"
            )
        self.cls_id, self.sep_id, self.mask_id = vocab[CLS], vocab[SEP], vocab[MASK]
        self.vocab_size = max(vocab.values()) + 1
        is_special = torch.zeros(self.vocab_size, dtype=torch.bool)
        is_special[[vocab[t] for t in special_tokens if t in vocab]] = True
        self.is_special = is_special
        self.replacement_ids = torch.nonzero(~is_special).squeeze(1)  # random tokens are never special
        self.mlm_probability = mlm_probability
        self.sentence_order = sentence_order
        self.seed = seed

    @staticmethod
    def framing_tokens(sentence_order: bool) -> int:
        """Tokens added around each window: [CLS] A [SEP] (B [SEP])."""
        return 3 if sentence_order else 2

    def __call__(self, windows: torch.Tensor, epoch: int, batch_index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(hash((self.seed, epoch, batch_index)) % 2**63)
        batch = self._frame(windows, generator)
        batch["input_ids"], batch["labels"] = self.mask(batch["input_ids"], generator)
        return batch

    def _frame(self, windows: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        n, length = windows.shape
        cls = torch.full((n, 1), self.cls_id, dtype=windows.dtype)
        sep = torch.full((n, 1), self.sep_id, dtype=windows.dtype)
        # Packed windows have no padding, so no attention_mask: attention keeps its unmasked kernel.
        if not self.sentence_order:
            input_ids = torch.cat([cls, windows, sep], dim=1)
            return {"input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids)}
        cuts = torch.randint(1, length, (n,), generator=generator)
        swapped = torch.rand(n, generator=generator) < 0.5
        rows, type_rows = [], []
        for window, cut, swap in zip(windows, cuts.tolist(), swapped.tolist()):
            first, second = (window[cut:], window[:cut]) if swap else (window[:cut], window[cut:])
            rows.append(torch.cat([cls[0], first, sep[0], second, sep[0]]))
            type_rows.append(torch.cat([torch.zeros(len(first) + 2), torch.ones(len(second) + 1)]))
        input_ids = torch.stack(rows)
        return {
            "input_ids": input_ids,
            "token_type_ids": torch.stack(type_rows).long(),
            "sop_labels": swapped.long(),
        }

    def mask(self, input_ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply 80/10/10 masking; returns (masked inputs, labels with -100 off the selection)."""
        probability = torch.full(input_ids.shape, self.mlm_probability)
        probability[self.is_special[input_ids]] = 0.0
        selected = torch.bernoulli(probability, generator=generator).bool()
        labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
        draw = torch.rand(input_ids.shape, generator=generator)
        to_mask = selected & (draw < 0.8)
        to_random = selected & (draw >= 0.8) & (draw < 0.9)
        masked = input_ids.clone()
        masked[to_mask] = self.mask_id
        picks = torch.randint(len(self.replacement_ids), (int(to_random.sum()),), generator=generator)
        masked[to_random] = self.replacement_ids[picks]
        return masked, labels
