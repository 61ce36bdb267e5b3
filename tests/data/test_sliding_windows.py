import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmexp.data.windows import SlidingWindowBatches, sliding_windows
from lmexp.errors import ConfigError
from lmexp.models import GPT, from_name

# (n_tokens, block_size, stride): streams shorter than, equal to and just past one window,
# stride 1, stride block_size, and strides that do not divide the rest of the stream.
CASES = [
    (2, 1, 1), (2, 8, 3), (5, 8, 8), (8, 8, 1), (9, 8, 8), (9, 8, 3), (10, 8, 8), (10, 8, 5),
    (11, 4, 4), (20, 8, 5), (30, 8, 8), (37, 8, 3), (37, 8, 1), (50, 7, 6), (64, 16, 16),
    (65, 16, 16), (100, 16, 7), (101, 5, 2), (101, 3, 1),
]  # fmt: skip


def reference_context_starts(n: int, block_size: int, stride: int) -> dict[int, int]:
    """The rule read literally: windows move by stride, the last is aligned to the stream's end,
    and each scores the targets nobody scored yet. Maps target -> first context position."""
    start_of: dict[int, int] = {}
    start = 0
    while len(start_of) < n - 1:
        if start + block_size >= n - 1:
            start = max(0, n - 1 - block_size)
        for target in range(start + 1, min(start + block_size, n - 1) + 1):
            start_of.setdefault(target, start)
        start += stride
    return start_of


def scored_targets(dataset: SlidingWindowBatches) -> list[tuple[int, int]]:
    """(target position, context length) of every scored label; tokens must be 0, 1, 2, ..."""
    found = []
    for batch in dataset:
        inputs, labels = batch["input_ids"], batch["labels"]
        assert inputs.dtype == labels.dtype == torch.int64 and inputs.shape == labels.shape
        for row_inputs, row_labels in zip(inputs.tolist(), labels.tolist()):
            for column, label in enumerate(row_labels):
                if label != -100:
                    # The label is the token after the input at its column; the context is the
                    # whole row so far, consecutive positions.
                    assert label == row_inputs[column] + 1
                    assert row_inputs[: column + 1] == list(range(label - column - 1, label))
                    found.append((label, column + 1))
    return found


@pytest.mark.parametrize("n, block_size, stride", CASES)
def test_windows_follow_the_rule(n, block_size, stride):
    windows = sliding_windows(n, block_size, stride)
    assert windows[0][0] == 0 and windows[0][2] == 1
    assert windows[-1][1] == n - 1 and windows[-1][0] == max(0, n - 1 - block_size)
    assert all(0 < end - start <= block_size and start < first <= end for start, end, first in windows)
    for (start, end, _), (next_start, _, next_first) in itertools.pairwise(windows):
        assert next_first == end + 1  # scores exactly what is left
        assert next_start - start <= stride
    expected = reference_context_starts(n, block_size, stride)
    got = {t: start for start, end, first in windows for t in range(first, end + 1)}
    assert got == expected


def test_hand_computed_windows():
    assert sliding_windows(20, 8, 5) == [(0, 8, 1), (5, 13, 9), (10, 18, 14), (11, 19, 19)]
    assert sliding_windows(5, 8, 3) == [(0, 4, 1)]
    assert sliding_windows(25, 8, 8) == [(0, 8, 1), (8, 16, 9), (16, 24, 17)]  # disjoint, no tail
    assert sliding_windows(27, 8, 8)[-1] == (18, 26, 25)  # tail aligned to the end, full context


@pytest.mark.parametrize("n, block_size, stride", CASES)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_every_target_scored_once_with_enough_context(n, block_size, stride, batch_size):
    dataset = SlidingWindowBatches(np.arange(n, dtype=np.uint16), block_size, stride, batch_size)
    found = scored_targets(dataset)
    assert sorted(t for t, _ in found) == list(range(1, n))
    assert dataset.n_targets == n - 1 and dataset.window_count == len(sliding_windows(n, block_size, stride))
    assert len(list(dataset)) == len(dataset) == math.ceil(dataset.window_count / batch_size)
    for target, context in found:
        assert min(target, block_size - stride + 1) <= context <= min(target, block_size)
        if stride == 1:
            assert context == min(target, block_size)
    if stride == block_size and (n - 1) % block_size == 0:  # disjoint windows tile the stream
        assert all(context == (target - 1) % block_size + 1 for target, context in found)


def test_memmap_uint32_and_batch_width(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(70_000, 70_050, dtype=np.uint32).tofile(path)
    tokens = np.memmap(path, dtype=np.uint32, mode="r")
    batches = list(SlidingWindowBatches(tokens, block_size=8, stride=3, batch_size=4))
    assert all(b["input_ids"].shape[1] == 8 for b in batches)
    assert batches[0]["input_ids"][0, 0] == 70_000 and batches[0]["labels"][0, 0] == 70_001
    short = list(SlidingWindowBatches(tokens[:6], block_size=8, stride=3, batch_size=4))
    assert len(short) == 1 and short[0]["input_ids"].shape == (1, 5)  # only as wide as its window
    assert short[0]["labels"].tolist() == [[70_001, 70_002, 70_003, 70_004, 70_005]]


def _sensitive_gpt(position: str) -> GPT:
    """A random tiny GPT, float64, with weights large enough that context visibly matters."""
    torch.manual_seed(0)
    model = GPT(from_name("gpt-tiny", vocab_size=50, block_size=16, position=position)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


def _oracle_nll(model: GPT, tokens: np.ndarray, context_start: dict[int, int]) -> dict[int, float]:
    """-log p(token t | tokens[context_start[t]:t]), one forward pass per target."""
    ids = torch.from_numpy(tokens.astype(np.int64))
    nll = {}
    with torch.no_grad():
        for t, start in context_start.items():
            logits = model(ids[start:t][None])[0, -1]
            nll[t] = -torch.log_softmax(logits, -1)[ids[t]].item()
    return nll


def _batched_nll(model: GPT, n: int, tokens: np.ndarray, **options) -> dict[int, float]:
    """Per-target NLL from SlidingWindowBatches; positions come from a twin run over 0, 1, 2, ..."""
    nll = {}
    twin = SlidingWindowBatches(np.arange(n, dtype=np.uint16), **options)
    with torch.no_grad():
        for batch, positions in zip(SlidingWindowBatches(tokens, **options), twin, strict=True):
            logits = model(batch["input_ids"])
            loss = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none", ignore_index=-100)
            scored = positions["labels"] != -100
            assert torch.equal(scored, batch["labels"] != -100)
            for t, value in zip(positions["labels"][scored].tolist(), loss[scored].tolist()):
                assert t not in nll
                nll[t] = value
            total = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="sum", ignore_index=-100)
            assert total.item() == pytest.approx(loss.sum().item(), rel=1e-9)
    return nll


@pytest.mark.parametrize("position", ["learned", "rotary"])
@pytest.mark.parametrize("n, stride, batch_size", [(60, 1, 8), (60, 5, 3), (61, 16, 2), (53, 7, 4), (12, 4, 2)])
def test_loss_matches_token_by_token_oracle(position, n, stride, batch_size):
    block_size = 16
    model = _sensitive_gpt(position)
    tokens = np.random.default_rng(n + stride).integers(0, 50, size=n).astype(np.uint16)
    if stride == 1:  # the oracle needs nothing of the implementation's rule
        context_start = {t: max(0, t - block_size) for t in range(1, n)}
    else:
        context_start = reference_context_starts(n, block_size, stride)
    expected = _oracle_nll(model, tokens, context_start)
    got = _batched_nll(model, n, tokens, block_size=block_size, stride=stride, batch_size=batch_size)
    assert got.keys() == expected.keys()
    for t in expected:
        assert got[t] == pytest.approx(expected[t], rel=1e-6), t
    assert sum(got.values()) == pytest.approx(sum(expected.values()), rel=1e-4)
    # The comparison can fail: one token less of context changes the total visibly.
    shorter = {t: min(start + 1, t - 1) for t, start in context_start.items()}
    assert sum(_oracle_nll(model, tokens, shorter).values()) != pytest.approx(sum(expected.values()), rel=1e-3)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize(
    "n, block_size, stride, batch_size", [(100, 8, 3, 4), (37, 8, 1, 5), (50, 8, 8, 2), (6, 8, 2, 2)]
)
def test_ranks_step_together_and_share_the_targets(world_size, n, block_size, stride, batch_size):
    tokens = np.arange(n, dtype=np.uint16)
    ranks = [
        SlidingWindowBatches(tokens, block_size, stride, batch_size, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    yielded = [list(dataset) for dataset in ranks]
    assert len({len(dataset) for dataset in ranks}) == 1
    assert [len(batches) for batches in yielded] == [len(ranks[0])] * world_size
    for same_step in zip(*yielded):  # ranks in lock step see batches of one shape
        assert len({tuple(b["input_ids"].shape) for b in same_step}) == 1
    targets = sorted(t for dataset in ranks for t, _ in scored_targets(dataset))
    assert targets == list(range(1, n))
    if ranks[0].window_count % world_size:  # some rank ran out and was padded with unscored rows
        last = yielded[-1][-1]["labels"]
        assert (last == -100).all(dim=1).any()


@pytest.mark.parametrize(
    "n, block_size, stride, message",
    [
        (100, 64, 0, "stride=0 must be in [1, block_size=64]"),
        (100, 8, 9, "stride=9 must be in [1, block_size=8]"),
        (1, 8, 4, "n_tokens=1 leaves nothing to score"),
        (0, 8, 4, "n_tokens=0"),
        (100, 0, 1, "block_size=0 must be a positive integer"),
    ],
)
def test_bad_arguments_are_config_errors(n, block_size, stride, message):
    with pytest.raises(ConfigError) as error:
        sliding_windows(n, block_size, stride)
    assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        SlidingWindowBatches(np.zeros(n, dtype=np.uint16), block_size, stride, batch_size=2)


def test_bad_dataset_arguments_are_config_errors():
    tokens = np.zeros(20, dtype=np.uint16)
    with pytest.raises(ConfigError, match="rank=2 must be in"):
        SlidingWindowBatches(tokens, 8, 4, 2, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size=0"):
        SlidingWindowBatches(tokens, 8, 4, 0)
    with pytest.raises(ConfigError, match="1-D"):
        SlidingWindowBatches(tokens.reshape(4, 5), 8, 4, 2)
