"""The streamed, sharded token cache: the same ids however it is cut, built or shared."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

import lmexp.data.cache as cache_module
from lmexp.data.cache import (
    TokenCache,
    build_token_cache,
    cache_key,
    legacy_cache_key,
    prepare_token_cache,
    split_documents,
    verify_cache_entry,
)
from lmexp.data.cleaning import clean_documents
from lmexp.data.shards import DOCUMENT_SEPARATOR, split_of
from lmexp.data.tokenizer import MLM_SPECIAL_TOKENS, CharTable, train_tokenizer
from lmexp.data.tokens import ShardedTokens
from lmexp.errors import DataError
from tests.conftest import make_corpus
from tests.data.test_tokenizer_cache import settings_for

SPLITS = ("train", "val", "test")


def corpus_file(tmp_path: Path, paragraphs: int = 400, name: str = "corpus.txt") -> Path:
    path = tmp_path / name
    path.write_text(make_corpus(paragraphs))
    return path


def reference_ids(path: Path, settings: dict) -> dict[str, list[int]]:
    """What the cache must hold: the whole corpus cleaned in memory, split by the documented
    hash rule, a tokenizer trained on all of train, each split's documents encoded in order."""
    documents, _ = clean_documents(path.read_text().strip("\n").split("\n\n"))
    splits = split_documents(documents, settings["val_fraction"], settings["test_fraction"], settings["seed"])
    tokenizer = train_tokenizer(splits["train"], settings["tokenizer"], settings["vocab_size"], settings["special_tokens"])
    tokenizer.encode_special_tokens = True
    return {
        split: [i for doc in docs for i in tokenizer.encode(doc + DOCUMENT_SEPARATOR, add_special_tokens=False).ids]
        for split, docs in splits.items()
    }


def all_ids(cache: TokenCache) -> dict[str, list[int]]:
    return {split: np.asarray(cache.tokens(split)).astype(int).tolist() for split in SPLITS}


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_the_streamed_cache_holds_the_in_memory_ids_and_split(kind: str, tmp_path: Path):
    path = corpus_file(tmp_path)
    settings = settings_for(path, tokenizer=kind, vocab_size=300, special_tokens=[] if kind == "bpe" else ["[UNK]"])
    cache = build_token_cache(tmp_path / "c", settings, log=lambda _: None)
    assert all_ids(cache) == reference_ids(path, settings)
    assert all(cache.meta["splits"][split]["documents"] > 0 for split in SPLITS)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_many_shards_hold_the_same_ids_as_one(kind: str, tmp_path: Path):
    path = corpus_file(tmp_path)  # no repeated paragraph: per-shard de-duplication drops nothing
    base = settings_for(path, tokenizer=kind, vocab_size=300, special_tokens=[] if kind == "bpe" else ["[UNK]"])
    one = build_token_cache(tmp_path / "one", base, log=lambda _: None)
    many = build_token_cache(tmp_path / "many", {**base, "shard_mb": 0.004}, log=lambda _: None, workers=1)
    assert len(one.meta["shards"]) == 1 and len(many.meta["shards"]) > 5
    assert all_ids(many) == all_ids(one)
    assert many.tokenizer.to_str() == one.tokenizer.to_str()
    assert isinstance(many.tokens("train"), ShardedTokens)


def test_two_parts_and_one_full_build_give_identical_shards(tmp_path: Path):
    path = corpus_file(tmp_path)
    settings = {**settings_for(path), "shard_mb": 0.005}
    first = prepare_token_cache(tmp_path / "shared", settings, part=(0, 2), log=lambda _: None, workers=1)
    assert not first.complete and first.built and first.missing
    assert not (first.entry / "manifest.json").exists()
    with pytest.raises(cache_module.CacheDamaged, match="manifest.json is missing"):
        TokenCache.load(first.entry)  # an incomplete entry is never trusted
    second = prepare_token_cache(tmp_path / "shared", settings, part=(1, 2), log=lambda _: None, workers=1)
    assert second.complete and not second.missing
    assert sorted(first.built + second.built) == list(range(len(first.built) + len(second.built)))
    full = build_token_cache(tmp_path / "alone", settings, log=lambda _: None, workers=2)
    shared = TokenCache.load(second.entry)
    for name in [s["name"] for s in full.meta["shards"]]:
        for file in (*(f"{split}.bin" for split in SPLITS),):
            assert (shared.path / "shards" / name / file).read_bytes() == (full.path / "shards" / name / file).read_bytes()
    assert shared.meta["splits"] == full.meta["splits"]
    assert verify_cache_entry(shared.path, full=True) is None


def test_worker_processes_build_the_same_shards_as_one_process(tmp_path: Path):
    path = corpus_file(tmp_path)
    settings = {**settings_for(path, tokenizer="bpe", vocab_size=300, special_tokens=[]), "shard_mb": 0.01}
    alone = build_token_cache(tmp_path / "a", settings, log=lambda _: None, workers=1)
    pooled = build_token_cache(tmp_path / "b", settings, log=lambda _: None, workers=2)
    assert all_ids(pooled) == all_ids(alone)


def test_a_truncated_shard_is_detected_and_only_it_is_rebuilt(tmp_path: Path):
    path = corpus_file(tmp_path)
    settings = {**settings_for(path), "shard_mb": 0.01}
    cache = build_token_cache(tmp_path / "c", settings, log=lambda _: None, workers=1)
    expected = all_ids(cache)
    damaged = cache.path / "shards" / "00001" / "train.bin"
    damaged.write_bytes(damaged.read_bytes()[:10])
    untouched = cache.path / "shards" / "00000" / "shard.json"
    before = untouched.stat().st_mtime_ns
    assert "shards/00001/train.bin has 10 bytes" in (verify_cache_entry(cache.path) or "")

    messages: list[str] = []
    rebuilt = build_token_cache(tmp_path / "c", settings, log=messages.append, workers=1)
    notices = [m for m in messages if "is damaged" in m]
    assert len(notices) == 1 and "shards/00001/train.bin has 10 bytes" in notices[0], messages
    assert all_ids(rebuilt) == expected
    assert untouched.stat().st_mtime_ns == before  # the sound shard was kept


def test_explicit_split_files_are_used_as_given(tmp_path: Path):
    train, val = corpus_file(tmp_path, 300, "train.txt"), tmp_path / "valid.txt"
    val.write_text("first held out paragraph\n\nsecond held out paragraph\n")
    settings = settings_for(train, val_fraction=0.0, test_fraction=0.1)
    settings["split_files"] = {"val": {"source": str(val), "fingerprint": "v1"}}
    cache = build_token_cache(tmp_path / "c", settings, log=lambda _: None)
    decode = cache.tokenizer.decode
    assert decode(np.asarray(cache.tokens("val")).astype(int).tolist()) == (
        "first held out paragraph\n\nsecond held out paragraph\n\n")
    assert cache.meta["splits"]["val"]["documents"] == 2
    assert cache.meta["splits"]["test"]["documents"] > 0  # still carved from train by the fraction
    assert "held out" not in decode(np.asarray(cache.tokens("train")).astype(int).tolist())


def test_the_split_is_a_function_of_seed_and_document():
    docs = [f"document number {i}" for i in range(4000)]
    carve = {"val": 0.1, "test": 0.05}
    first = [split_of(d, 7, carve) for d in docs]
    assert first == [split_of(d, 7, carve) for d in reversed(docs)][::-1]  # order does not matter
    assert first != [split_of(d, 8, carve) for d in docs]
    shares = {s: first.count(s) / len(docs) for s in SPLITS}
    assert shares["val"] == pytest.approx(0.1, abs=0.02) and shares["test"] == pytest.approx(0.05, abs=0.015)


def test_an_entry_written_by_an_earlier_version_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = corpus_file(tmp_path, 60)
    settings = settings_for(path, val_fraction=0.1, test_fraction=0.0)
    legacy = tmp_path / "c" / legacy_cache_key(settings)
    legacy.mkdir(parents=True)
    tokenizer = train_tokenizer(["abc ."], "char", special_tokens=["[UNK]"])
    tokenizer.save(str(legacy / "tokenizer.json"))
    ids = {"train": np.array([1, 2, 3, 1], np.uint16), "val": np.array([2, 2], np.uint16), "test": np.zeros(0, np.uint16)}
    for split, array in ids.items():
        if array.size:
            array.tofile(legacy / f"{split}.bin")
    (legacy / "meta.json").write_text(json.dumps({
        "settings": settings, "dtype": "uint16", "vocab_size": tokenizer.get_vocab_size(),
        "splits": {s: {"documents": 1, "tokens": int(a.size), "bytes": int(a.size)} for s, a in ids.items()},
    }))
    monkeypatch.setattr(cache_module, "plan_source", lambda *a, **k: pytest.fail("the earlier entry was rebuilt"))
    messages: list[str] = []
    cache = build_token_cache(tmp_path / "c", settings, log=messages.append)
    assert cache.path == legacy and "earlier versions" in messages[0]
    assert np.asarray(cache.tokens("train")).tolist() == [1, 2, 3, 1] and len(cache.tokens("test")) == 0
    assert cache_key(settings) != legacy.name


def test_progress_lines_reach_the_log_and_the_build_log_without_a_terminal(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(cache_module, "PROGRESS_SECONDS", 0.0)
    path = corpus_file(tmp_path)
    messages: list[str] = []
    cache = build_token_cache(tmp_path / "c", settings_for(path), log=messages.append)
    progress = [m for m in messages if m.startswith("token cache: ")]
    assert progress and all("MB/s" in m and "ETA" in m and "documents" in m for m in progress)
    log = (cache.path / "build.log").read_text()
    assert "MB/s" in log and "token cache built" in log


def test_a_source_folder_holding_the_cache_is_read_without_it(tmp_path: Path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    corpus_file(folder)
    root = folder / "tokens"
    settings = lambda: settings_for(folder)  # the fingerprint is taken each time
    from lmexp.data.sources import source_fingerprint

    first = build_token_cache(root, {**settings(), "fingerprint": source_fingerprint(str(folder), exclude=(root,))},
                              log=lambda _: None)
    messages: list[str] = []
    second = build_token_cache(root, {**settings(), "fingerprint": source_fingerprint(str(folder), exclude=(root,))},
                               log=messages.append)
    assert second.path == first.path and any("hit" in m for m in messages)
    # Built again from scratch elsewhere, the folder still yields only the corpus, not the cache's files.
    again = build_token_cache(tmp_path / "elsewhere", {**settings(), "seed": 2}, log=lambda _: None)
    assert again.meta["cleaning"]["documents_in"] == first.meta["cleaning"]["documents_in"]


def test_a_bad_part_is_one_line():
    with pytest.raises(DataError, match="shard part 2/2 is out of range: use k/N"):
        prepare_token_cache(Path("/nonexistent"), {}, part=(2, 2))


def test_sharded_tokens_index_like_one_array():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 500, size=n).astype(np.uint16) for n in (5, 0, 17, 1, 30)]
    whole = np.concatenate(parts)
    view = ShardedTokens(parts)
    assert len(view) == whole.size and view.max() == whole.max()
    for index in (slice(None), slice(3, 40), slice(22, 23), slice(-9, None), slice(0, 53, 4), slice(30, 10)):
        assert np.array_equal(view[index], whole[index])
    fancy = rng.integers(-whole.size, whole.size, size=(6, 9))
    assert np.array_equal(view[fancy], whole[fancy])
    assert view[7] == whole[7] and view[-1] == whole[-1]
    assert np.array_equal(np.asarray(view), whole)
    with pytest.raises(IndexError):
        view[np.array([whole.size])]


@pytest.mark.parametrize("specials", [[], ["[UNK]"], MLM_SPECIAL_TOKENS])
def test_the_char_table_encodes_exactly_as_the_tokenizer(specials: list[str]):
    rng = random.Random(1)
    alphabet = "abcdé 𝄞\n\t[]UNKMAS"
    tokenizer = train_tokenizer(["".join(rng.choice(alphabet) for _ in range(80)) for _ in range(20)], "char",
                                special_tokens=specials)
    tokenizer.encode_special_tokens = True
    table = CharTable.of(tokenizer)
    assert table is not None
    for _ in range(300):
        text = "".join(rng.choice(alphabet + "xyz😀Ω\x00") for _ in range(rng.randint(0, 60)))
        ids, n_bytes = table.encode(text)
        assert ids.tolist() == tokenizer.encode(text, add_special_tokens=False).ids
        assert n_bytes == len(text.encode())
    assert CharTable.of(train_tokenizer(["some text here"] * 3, "bpe", vocab_size=270)) is None


def test_a_worker_process_failure_is_raised_here_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    good = corpus_file(tmp_path, 200, "a.txt")
    bad = tmp_path / "b.txt"
    bad.write_bytes(make_corpus(50).encode() + b"\n\nbroken \xff byte\n")
    # An explicit test file is not in the tokenizer's sample: only a worker reads it.
    settings = {**settings_for(good, test_fraction=0.0), "shard_mb": 0.004,
                "split_files": {"test": {"source": str(bad), "fingerprint": "b"}}}
    started: list[int] = []
    real_popen = cache_module.subprocess.Popen
    monkeypatch.setattr(cache_module.subprocess, "Popen", lambda *a, **k: started.append(1) or real_popen(*a, **k))
    with pytest.raises(DataError) as caught:
        build_token_cache(tmp_path / "c", settings, log=lambda _: None, workers=2)
    message = str(caught.value)
    assert started and "\n" not in message and "b.txt" in message and "UTF-8" in message, message


def test_a_shard_worker_process_imports_neither_torch_nor_lightning():
    import subprocess
    import sys

    code = "import sys, lmexp.data.shards; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


FAKE_WORKER = r"""
import json, sys
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    # Progress and "done" in one write: the builder must act on both lines.
    sys.stdout.write(json.dumps({"bytes": 1, "documents": 1}) + "\n" + json.dumps({"done": int(line)}) + "\n")
    sys.stdout.flush()
"""


@pytest.mark.timeout(60)
def test_two_lines_a_worker_writes_at_once_are_both_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import sys

    monkeypatch.setattr(cache_module, "WORKER_COMMAND", [sys.executable, "-c", FAKE_WORKER])
    progress = cache_module.BuildProgress(10, lambda _: None, tmp_path / "build.log", workers=2)
    cache_module._run_workers(tmp_path, list(range(6)), 2, progress)  # returns: every shard was handed out
    assert progress.documents == 6


def test_small_files_share_a_shard_and_the_shard_count_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "books"
    folder.mkdir()
    text = make_corpus(300).split("\n\n")
    for i in range(30):
        (folder / f"book{i:02d}.txt").write_text("\n\n".join(text[i * 10 : i * 10 + 10]) + "\n")
    base = settings_for(folder)
    one = build_token_cache(tmp_path / "one", base, log=lambda _: None)
    grouped = build_token_cache(tmp_path / "grouped", {**base, "shard_mb": 0.004}, log=lambda _: None, workers=1)
    assert 1 < len(grouped.meta["shards"]) < 30  # about 4 KB each: several books per shard
    assert all_ids(grouped) == all_ids(one)
    monkeypatch.setattr(cache_module, "MAX_SHARDS", 3)
    bounded = build_token_cache(tmp_path / "bounded", {**base, "shard_mb": 0.001}, log=lambda _: None, workers=1)
    assert len(bounded.meta["shards"]) <= 3 and all_ids(bounded) == all_ids(one)


def test_characters_outside_a_sampled_alphabet_are_counted_and_reported(tmp_path: Path):
    path = corpus_file(tmp_path)
    with path.open("a") as handle:
        handle.write("\n\nthe rare glyph \u2603 appears late\n")
    messages: list[str] = []
    cache = build_token_cache(tmp_path / "c", {**settings_for(path, val_fraction=0.0, test_fraction=0.0),
                                               "tokenizer_sample_mb": 0.001}, log=messages.append)
    assert cache.meta["unknown_characters"] == 1
    assert any("1 characters were not in the char tokenizer's alphabet" in m and "tokenizer_sample_mb" in m
               for m in messages), messages


def test_the_manifest_is_not_written_over_another_parts_damaged_shard(tmp_path: Path):
    path = corpus_file(tmp_path)
    settings = {**settings_for(path), "shard_mb": 0.005}
    first = prepare_token_cache(tmp_path / "shared", settings, part=(0, 2), log=lambda _: None, workers=1)
    second = prepare_token_cache(tmp_path / "shared", settings, part=(1, 2), log=lambda _: None, workers=1)
    (second.entry / "manifest.json").unlink()
    damaged = second.entry / "shards" / "00000" / "train.bin"  # part 0's
    damaged.write_bytes(damaged.read_bytes()[:4])
    again = prepare_token_cache(tmp_path / "shared", settings, part=(1, 2), log=lambda _: None, workers=1)
    assert not again.complete and again.missing == [0] and not (again.entry / "manifest.json").exists()
    fixed = prepare_token_cache(tmp_path / "shared", settings, part=(0, 2), log=lambda _: None, workers=1)
    assert fixed.complete and fixed.built == [0] and first.entry == fixed.entry


def test_a_plan_that_cannot_be_read_is_an_error_not_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import errno

    path = corpus_file(tmp_path)
    settings = {**settings_for(path), "shard_mb": 0.005}
    cache = build_token_cache(tmp_path / "c", settings, log=lambda _: None, workers=1)
    (cache.path / "manifest.json").unlink()  # as while other machines still build

    def unreadable(entry: Path) -> dict:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cache_module, "read_plan", unreadable)
    with pytest.raises(OSError, match="Input/output error"):
        prepare_token_cache(tmp_path / "c", settings, log=lambda _: None, workers=1)
    assert (cache.path / "shards" / "00000" / "shard.json").exists()  # nobody's shards were discarded


def test_a_cleaner_keeps_a_bounded_number_of_hashes(monkeypatch: pytest.MonkeyPatch):
    from lmexp.data import cleaning

    monkeypatch.setattr(cleaning, "DEDUPE_WINDOW", 3)
    cleaner = cleaning.DocumentCleaner()
    kept = [cleaner.clean(text) for text in ["a", "b", "a", "c", "d", "a", "e"]]
    assert kept == ["a", "b", None, "c", "d", "a", "e"]  # exact within each window of 3 distinct documents
    assert len(cleaner._seen_documents) <= 3


def test_the_key_of_an_earlier_versions_entry_is_the_one_it_wrote():
    """The value below is what the previous release's ``cache_key`` gave these settings."""
    settings = {"source": "/data/corpus.txt", "fingerprint": "f" * 64, "text_column": "text", "normalization": "NFC",
                "min_chars": 1, "dedupe": "documents", "val_fraction": 0.1, "test_fraction": 0.0, "seed": 1337,
                "tokenizer": "char", "vocab_size": 4096, "special_tokens": ["[UNK]"]}
    new = {**settings, "split_files": {}, "shard_mb": 16, "tokenizer_sample_mb": 100}
    assert legacy_cache_key(new) == "cfbdc2f0e03be1c58378"
    assert legacy_cache_key({**new, "split_files": {"val": {"source": "v", "fingerprint": "x"}}}) is None


PART = """
import json, sys
from pathlib import Path
from lmexp.data.cache import prepare_token_cache
settings = json.loads(sys.argv[2])
k = int(sys.argv[3])
report = prepare_token_cache(Path(sys.argv[1]), settings, part=(k, 2), log=lambda _: None, workers=1)
print(json.dumps({"built": report.built, "complete": report.complete}))
"""


def test_two_parts_running_at_once_share_one_tokenizer_and_fill_one_entry(tmp_path: Path):
    import subprocess
    import sys

    path = corpus_file(tmp_path, 600)
    settings = {**settings_for(path, tokenizer="bpe", vocab_size=300, special_tokens=[]), "shard_mb": 0.005}
    root = Path(__file__).resolve().parents[2]
    parts = [subprocess.Popen([sys.executable, "-c", PART, str(tmp_path / "shared"), json.dumps(settings), str(k)],
                              cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    outcomes = [part.communicate(timeout=120) for part in parts]
    assert all(part.returncode == 0 for part in parts), [err[-2000:] for _, err in outcomes]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outcomes]
    assert sorted(reports[0]["built"] + reports[1]["built"]) == list(range(len(reports[0]["built"] + reports[1]["built"])))
    if not any(report["complete"] for report in reports):  # both finished before either saw the other's last shard
        prepare_token_cache(tmp_path / "shared", settings, log=lambda _: None, workers=1)
    shared = build_token_cache(tmp_path / "shared", settings, log=lambda _: None)
    alone = build_token_cache(tmp_path / "alone", settings, log=lambda _: None, workers=1)
    assert shared.tokenizer.to_str() == alone.tokenizer.to_str() and all_ids(shared) == all_ids(alone)
    from lmexp.atomic import TEMPORARY_PREFIX

    assert not list((tmp_path / "shared").rglob(f"{TEMPORARY_PREFIX}*"))
