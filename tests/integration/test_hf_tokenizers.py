"""Tokenizer parity with transformers on real text: SST-2's dev sentences and Tiny Shakespeare."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lmexp.formats.huggingface import load_hf_tokenizer
from tests.conftest import shared_data

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")


def real_texts() -> tuple[list[str], list[str]]:
    """(training text for the vocabularies, texts to compare on)."""
    with open(shared_data("sst2/train.tsv"), encoding="utf-8", newline="") as f:
        train = [row["sentence"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    with open(shared_data("sst2/dev.tsv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    dev = [row.get("sentence") or row["content"] for row in rows]
    lines = [line for line in shared_data("tinyshakespeare.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    return train[:20000] + lines[:20000], dev + lines[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("lower", [True, False])
def test_bert_vocab_txt_gives_transformers_ids_on_real_text(lower: bool, tmp_path: Path) -> None:
    from tokenizers import BertWordPieceTokenizer

    train, texts = real_texts()
    wordpiece = BertWordPieceTokenizer(lowercase=lower)
    wordpiece.train_from_iterator(train, vocab_size=4000, show_progress=False)
    wordpiece.save_model(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
    theirs = transformers.BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=lower)
    ours = load_hf_tokenizer(tmp_path, "bert")
    assert [e.ids for e in ours.encode_batch(texts)] == theirs(texts)["input_ids"]


@pytest.mark.slow
def test_gpt2_vocab_and_merges_give_transformers_ids_on_real_text(tmp_path: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer

    train, texts = real_texts()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(train, vocab_size=4000, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(tmp_path))
    theirs = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ours = load_hf_tokenizer(tmp_path, "gpt2")
    assert [e.ids for e in ours.encode_batch(texts)] == theirs(texts)["input_ids"]
