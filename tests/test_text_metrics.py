import pytest
import torch
from tokenizers import Tokenizer, models
from torch import nn

from lmexp.models import GPT, from_name
from lmexp.text_metrics import continuation_scores

VOCAB = 40


def word_tokenizer() -> Tokenizer:
    """Token i is the word w{i}; decoding joins words with spaces."""
    return Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))


def documents(n: int = 6, length: int = 16, seed: int = 0) -> list[list[int]]:
    """Random passages; passage i starts with token i, which identifies it."""
    rng = torch.Generator().manual_seed(seed)
    return [[i] + torch.randint(10, VOCAB, (length - 1,), generator=rng).tolist() for i in range(n)]


class Oracle(nn.Module):
    """Knows the passages: after t tokens of passage i it predicts passage i's token t + offset
    (offset 0: the true next token), and records the inputs it is given."""

    def __init__(self, docs: list[list[int]], offset: int = 0) -> None:
        super().__init__()
        self.docs, self.offset = docs, offset
        self.inputs: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.inputs.append(input_ids.clone())
        B, T = input_ids.shape
        logits = torch.zeros(B, T, VOCAB)
        for row in range(B):
            doc = self.docs[int(input_ids[row, 0])]
            logits[row, -1, doc[min(T + self.offset, len(doc) - 1)]] = 1.0
        return logits


def test_a_model_that_continues_exactly_scores_one():
    docs = documents()
    model = Oracle(docs)
    scores = continuation_scores(model, word_tokenizer(), docs, prompt_tokens=5, continuation_tokens=8, batch_size=4)
    assert scores == {"bleu": pytest.approx(1.0), "rougeL": pytest.approx(1.0), "n": 6}
    # The prompt is exactly each passage's first 5 tokens (batches of 4, then 2).
    assert torch.equal(model.inputs[0], torch.tensor([d[:5] for d in docs[:4]]))
    assert torch.equal(model.inputs[8], torch.tensor([d[:5] for d in docs[4:]]))


@pytest.mark.parametrize("offset", [1, -1])
def test_a_continuation_shifted_by_one_token_does_not_score_one(offset):
    """The first generated token is compared with the token right after the prompt: a model one
    token ahead (or behind) would score 1 under an off-by-one split."""
    docs = documents()
    scores = continuation_scores(Oracle(docs, offset), word_tokenizer(), docs, prompt_tokens=5, continuation_tokens=8)
    assert scores["rougeL"] < 0.95 and scores["bleu"] < 0.9


def test_garbage_scores_low():
    class AlwaysWord(nn.Module):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(*input_ids.shape, VOCAB)
            logits[..., 1] = 1.0  # w1: in no passage's continuation
            return logits

    docs = documents()
    scores = continuation_scores(AlwaysWord(), word_tokenizer(), docs, prompt_tokens=5, continuation_tokens=8)
    assert scores == {"bleu": 0.0, "rougeL": 0.0, "n": 6}


def test_short_passages_are_skipped_and_none_left_raises():
    docs = documents() + [[1, 11, 12]]  # too short for 5 + 8 tokens
    assert continuation_scores(Oracle(docs), word_tokenizer(), docs, 5, 8)["n"] == 6
    with pytest.raises(ValueError, match=r"no passage has prompt_tokens \+ continuation_tokens = 13 tokens \(longest: 3\)"):
        continuation_scores(Oracle(docs), word_tokenizer(), [[1, 11, 12]], 5, 8)
    with pytest.raises(ValueError, match="continuation_tokens=0 must both be at least 1"):
        continuation_scores(Oracle(docs), word_tokenizer(), docs, 5, 0)


def test_runs_on_a_gpt_with_cache_and_window():
    """A real (random) GPT through its KV cache, generating past its context."""
    torch.manual_seed(0)
    model = GPT(from_name("gpt-tiny", vocab_size=VOCAB, block_size=8))
    docs = documents(n=3, length=20)
    scores = [continuation_scores(model, word_tokenizer(), docs, 6, 10, use_cache=c) for c in (True, False)]
    assert scores[0] == scores[1] and scores[0]["n"] == 3
    assert 0.0 <= scores[0]["bleu"] <= 1.0 and 0.0 <= scores[0]["rougeL"] <= 1.0
