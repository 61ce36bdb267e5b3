import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, trainers

from lmexp.data.cache import build_token_cache, cache_key, split_documents
from lmexp.data.sources import source_fingerprint
from lmexp.data.tokenizer import MLM_SPECIAL_TOKENS, special_tokens_for, train_tokenizer
from lmexp.errors import DataError
from tests.conftest import make_corpus

TEXT = make_corpus(50)
DOCS = TEXT.split("\n\n")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizer_round_trip_is_exact(kind):
    tokenizer = train_tokenizer(DOCS, kind, vocab_size=300, special_tokens=special_tokens_for(kind, "causal_lm"))
    sample = "The old king hears a quiet song.\n\nPart 7.\n  spaced  "
    assert tokenizer.decode(tokenizer.encode(sample).ids) == sample


def test_wordpiece_round_trips_words_and_has_bert_specials():
    tokenizer = train_tokenizer(DOCS, "wordpiece", vocab_size=200, special_tokens=special_tokens_for("wordpiece", "masked_lm"))
    vocab = tokenizer.get_vocab()
    assert all(token in vocab for token in MLM_SPECIAL_TOKENS)
    sample = "The old king hears a quiet song."
    assert tokenizer.decode(tokenizer.encode(sample).ids) == sample


def test_bpe_respects_vocab_size_and_char_ignores_it():
    bpe = train_tokenizer(DOCS, "bpe", vocab_size=300)
    assert bpe.get_vocab_size() == 300
    char = train_tokenizer(DOCS, "char", vocab_size=300, special_tokens=["[UNK]"])
    assert char.get_vocab_size() == len(set("".join(DOCS))) + 1


@pytest.mark.parametrize("specials", [[], ["[UNK]"], MLM_SPECIAL_TOKENS, ["a", "[UNK]", "[UNK]"]])
def test_char_tokenizer_is_identical_to_the_bpe_trainer_one(specials):
    # The char tokenizer is built without a trainer; caches and checkpoints made with the
    # trainer's tokenizer must keep the same ids, so the whole tokenizer.json must match.
    docs = [*DOCS, "héllo 𝄞 wörld", "[UNK] a\tb\r", "", "ＡＢ"]
    reference = Tokenizer(models.BPE(unk_token="[UNK]" if "[UNK]" in specials else None))
    reference.decoder = decoders.Fuse()
    reference.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=1, special_tokens=specials, show_progress=False))
    assert train_tokenizer(iter(docs), "char", special_tokens=specials).to_str() == reference.to_str()


def settings_for(source: Path, **changes) -> dict:
    settings = {
        "source": str(source), "fingerprint": source_fingerprint(str(source)), "text_column": "text",
        "normalization": "NFC", "min_chars": 1, "dedupe": "documents", "val_fraction": 0.1,
        "test_fraction": 0.1, "seed": 1, "tokenizer": "char", "vocab_size": 100,
        "special_tokens": ["[UNK]"],
    }
    return {**settings, **changes}


def test_cache_is_built_once_and_reused(tiny_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    messages: list[str] = []
    first = build_token_cache(tmp_path / "c", settings_for(tiny_corpus), log=messages.append)
    assert first.meta["dtype"] == "uint16"
    assert any("built" in m for m in messages)
    # A second build must not read the source: make reading it fail to prove it.
    def no_reading(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr("lmexp.data.cache.plan_source", no_reading)
    messages.clear()
    second = build_token_cache(tmp_path / "c", settings_for(tiny_corpus), log=messages.append)
    assert second.path == first.path and any("hit" in m for m in messages)
    train = second.tokens("train")
    assert isinstance(train, np.memmap) and train.dtype == np.uint16  # one shard: the file itself
    decoded = first.tokenizer.decode(train[:200].astype(int).tolist())
    assert decoded and decoded in "\n\n".join(split_documents(make_corpus().strip("\n").split("\n\n"), 0.1, 0.1, 1)["train"])


def test_cache_key_changes_with_any_setting(tiny_corpus: Path):
    base = settings_for(tiny_corpus)
    assert cache_key(base) == cache_key(dict(base))
    for change in ({"seed": 2}, {"tokenizer": "bpe"}, {"min_chars": 5}, {"val_fraction": 0.2}):
        assert cache_key({**base, **change}) != cache_key(base)


def test_editing_the_source_invalidates_the_cache(tiny_corpus: Path, tmp_path: Path):
    first = build_token_cache(tmp_path / "c", settings_for(tiny_corpus), log=lambda _: None)
    tiny_corpus.write_text(make_corpus(seed=5) + "\n\nmore text")
    second = build_token_cache(tmp_path / "c", settings_for(tiny_corpus), log=lambda _: None)
    assert second.path != first.path


def test_split_is_deterministic_by_seed_and_disjoint():
    docs = [f"doc {i}" for i in range(1000)]
    a, b, c = split_documents(docs, 0.1, 0.1, 3), split_documents(docs, 0.1, 0.1, 3), split_documents(docs, 0.1, 0.1, 4)
    assert a == b and a != c
    assert 60 <= len(a["val"]) <= 140 and 60 <= len(a["test"]) <= 140  # each document by a hash: about 10%
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(docs)


def test_meta_records_bytes_per_token(tiny_corpus: Path, tmp_path: Path):
    cache = build_token_cache(tmp_path / "c", settings_for(tiny_corpus), log=lambda _: None)
    meta = json.loads((cache.path / "manifest.json").read_text())
    # Pure ASCII text with a character tokenizer: exactly one byte per token.
    assert cache.bytes_per_token("train") == pytest.approx(1.0)
    assert meta["cleaning"]["documents_in"] == 200


def test_empty_corpus_after_cleaning_is_an_error(tmp_path: Path):
    path = tmp_path / "short.txt"
    path.write_text("a\n\nbb\n\nccc")
    with pytest.raises(DataError, match=r"empty after cleaning .* lower data.min_chars"):
        build_token_cache(tmp_path / "c", settings_for(path, min_chars=10), log=lambda _: None)


def test_text_that_spells_a_special_token_stays_text(tmp_path: Path):
    path = tmp_path / "c.txt"
    path.write_text(make_corpus(30) + "\n\nwrite [MASK] and [UNK] here\n")
    settings = settings_for(path, tokenizer="bpe", vocab_size=300, val_fraction=0.0, test_fraction=0.0,
                            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    cache = build_token_cache(tmp_path / "c", settings, log=lambda _: None)
    ids = cache.tokens("train").astype(int).tolist()
    specials = {cache.tokenizer.token_to_id(t) for t in ("[MASK]", "[UNK]")}
    assert not specials & set(ids)
    assert "write [MASK] and [UNK] here" in cache.tokenizer.decode(ids)
    # Tokenizers read back later (cache hits, checkpoints, --tokenizer) encode prompts the same way.
    from lmexp.data import load_tokenizer

    for reloaded in (build_token_cache(tmp_path / "c", settings, log=lambda _: None).tokenizer, load_tokenizer(cache.path)):
        assert not specials & set(reloaded.encode("write [MASK] here").ids)
