"""What a model and its data agree on, stated once instead of read off each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tokenizers import Tokenizer

Task = Literal["causal_lm", "masked_lm", "classification"]


@dataclass(frozen=True)
class DataContract:
    """What an objective needs from its data module, handed over before data is prepared.

    The other direction (vocabulary size, class labels) is the data module's ``vocab_size`` and
    ``labels``, which the objective reads before it makes the weights.
    """

    task: Task
    """causal_lm, masked_lm or classification: how text becomes batches."""
    block_size: int
    """The model's context: no sample may be longer."""
    arch: str = "gpt"
    """gpt, bert or lstm: bert inputs are framed as [CLS] text [SEP]."""
    tokenizer: Tokenizer | None = None
    """A pretrained model's tokenizer, which the data must encode with instead of training one."""
    labels: tuple[str, ...] | None = None
    """The class labels a trained classifier already has, in id order: data read for evaluation maps
    its labels to these (no training file needed)."""
