import numpy as np
import pytest
import torch

from lmexp.data.batches import TokenBatches
from lmexp.data.masking import MLMBatchTransform

TOKENS = np.arange(5000, dtype=np.uint16)


def batches(**kwargs) -> list[dict[str, torch.Tensor]]:
    options = {"window": 17, "stride": 16, "batch_size": 4, "shuffle": True, "seed": 0}
    return list(TokenBatches(TOKENS, **{**options, **kwargs}))


def test_causal_batches_shift_labels_by_one():
    batch = batches()[0]
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    assert torch.equal(batch["labels"][:, -1], batch["input_ids"][:, -1] + 1)  # consecutive ids in TOKENS


def test_epochs_shuffle_differently_and_deterministically():
    epoch = {"e": 0}
    first = batches(epoch_fn=lambda: epoch["e"])
    again = batches(epoch_fn=lambda: epoch["e"])
    epoch["e"] = 1
    second = batches(epoch_fn=lambda: epoch["e"])
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    assert not torch.equal(first[0]["input_ids"], second[0]["input_ids"])


def test_ranks_get_disjoint_equal_shares():
    starts = []
    for rank in range(2):
        seen = batches(rank=rank, world_size=2)
        starts.append({int(x) for b in seen for x in b["input_ids"][:, 0]})
    assert len(batches(rank=0, world_size=2)) == len(batches(rank=1, world_size=2)) > 0
    assert starts[0].isdisjoint(starts[1])


def test_resume_skips_exactly_the_batches_already_done():
    full = batches()
    dataset = TokenBatches(TOKENS, 17, 16, 4, shuffle=True, seed=0)
    dataset.resume_from(epoch=0, batches_done=5)
    resumed = list(dataset)
    assert len(resumed) == len(full) - 5
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(full[5:], resumed))
    assert len(list(dataset)) == len(full)  # the skip applies once


def test_eval_batches_cover_the_stream_in_order():
    seen = batches(shuffle=False, batch_size=7)
    firsts = torch.cat([b["input_ids"][:, 0] for b in seen])
    assert torch.equal(firsts, torch.arange(0, 16 * len(firsts), 16))


VOCAB = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, **{f"t{i}": i for i in range(5, 100)}}


def test_mlm_masking_statistics_and_specials_untouched():
    transform = MLMBatchTransform(VOCAB, mlm_probability=0.15, seed=0)
    generator = torch.Generator().manual_seed(0)
    selected = masked = randomized = kept = eligible = 0
    for index in range(200):
        windows = torch.randint(5, 100, (32, 62), generator=generator)
        windows[:, ::10] = 1  # [UNK] inside the text: special, never masked
        batch = transform(windows, epoch=0, batch_index=index)
        original = torch.cat([torch.full((32, 1), 2), windows, torch.full((32, 1), 3)], dim=1)
        special = original < 5
        labels, inputs = batch["labels"], batch["input_ids"]
        assert torch.all(labels[special] == -100) and torch.equal(inputs[special], original[special])
        chosen = labels != -100
        assert torch.equal(labels[chosen], original[chosen])
        eligible += int((~special).sum())
        selected += int(chosen.sum())
        masked += int((inputs[chosen] == 4).sum())
        kept += int((inputs[chosen] == original[chosen]).sum())
        randomized += int(((inputs[chosen] != 4) & (inputs[chosen] != original[chosen])).sum())
        assert int((inputs[chosen] < 5).sum()) == int((inputs[chosen] == 4).sum())  # random ids never special
    assert selected / eligible == pytest.approx(0.15, abs=0.005)
    assert masked / selected == pytest.approx(0.80, abs=0.01)
    # A random replacement equals the original 1 time in 95: it then counts as kept.
    assert randomized / selected == pytest.approx(0.10 * 94 / 95, abs=0.01)
    assert kept / selected == pytest.approx(0.10 + 0.10 / 95, abs=0.01)


def test_masks_change_between_epochs_but_repeat_for_the_same_batch():
    transform = MLMBatchTransform(VOCAB, seed=0)
    windows = torch.randint(5, 100, (8, 30), generator=torch.Generator().manual_seed(1))
    a, b = transform(windows, 0, 3), transform(windows, 0, 3)
    c = transform(windows, 1, 3)
    assert torch.equal(a["labels"], b["labels"]) and not torch.equal(a["labels"], c["labels"])


def test_sentence_order_segments_and_labels():
    windows = torch.arange(5, 35).repeat(64, 1)
    # Masking left out (tiny probability) so the segments can be read back.
    batch = MLMBatchTransform(VOCAB, mlm_probability=1e-6, sentence_order=True, seed=0)(windows, 0, 0)
    assert batch["input_ids"].shape == (64, 33)
    assert 0.3 < batch["sop_labels"].float().mean().item() < 0.7
    for row, types, swapped in zip(batch["input_ids"], batch["token_type_ids"], batch["sop_labels"]):
        n_first = int((types == 0).sum())  # [CLS] A [SEP]
        assert row[0] == 2 and row[n_first - 1] == 3 and row[-1] == 3 and torch.all(types[n_first:] == 1)
        first, second = row[1 : n_first - 1], row[n_first:-1]
        assert len(first) >= 1 and len(second) >= 1
        joined = torch.cat([second, first]) if swapped else torch.cat([first, second])
        assert torch.equal(joined, torch.arange(5, 35))


def test_dataloader_workers_split_batches_without_duplicates():
    from torch.utils.data import DataLoader

    single = batches()
    with_workers = list(DataLoader(TokenBatches(TOKENS, 17, 16, 4, shuffle=True, seed=0), batch_size=None, num_workers=2))
    assert len(with_workers) == len(single)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(single, with_workers))


def test_only_the_tokenizers_special_tokens_are_protected():
    vocab = {**VOCAB, "[0]": 100}  # looks special, is ordinary text
    transform = MLMBatchTransform(vocab, mlm_probability=0.5, seed=0)
    windows = torch.full((64, 30), 100)
    labels = transform(windows, 0, 0)["labels"]
    assert (labels == 100).float().mean() > 0.3  # "[0]" gets masked like any token
