"""The token cache checks itself on load, rebuilds a damaged entry, and reports a full disk in one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import lmexp.faults
from lmexp.atomic import TEMPORARY_PREFIX
from lmexp.data.cache import TokenCache, build_token_cache, verify_cache_entry
from lmexp.errors import StorageError
from tests.data.test_tokenizer_cache import settings_for


def build(root: Path, corpus: Path, messages: list[str] | None = None) -> TokenCache:
    log = messages.append if messages is not None else lambda _: None
    return build_token_cache(root, settings_for(corpus), log=log)


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 + 1])


def out_of_vocabulary(path: Path) -> None:
    """Same size, every id far above any vocabulary (a file overwritten by something else)."""
    path.write_bytes(np.full(path.stat().st_size // 2, 60000, dtype=np.uint16).tobytes())


def drop_last_token(path: Path) -> None:
    """A valid tokenizer, one token short of the vocabulary the ids were encoded with."""
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    del vocab[max(vocab, key=vocab.get)]
    path.write_text(json.dumps(data))


DAMAGES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "manifest cut short": ("manifest.json", cut_short, "manifest.json"),
    "manifest without splits": ("manifest.json", lambda p: p.write_text(json.dumps({"dtype": "uint16"})), "manifest.json"),
    "train cut short": ("shards/00000/train.bin", cut_short, "shards/00000/train.bin has"),
    "train garbled": ("shards/00000/train.bin", out_of_vocabulary, "shards/00000/train.bin holds id 60000"),
    "val missing": ("shards/00000/val.bin", Path.unlink, "shards/00000/val.bin"),
    "shard record missing": ("shards/00000/shard.json", Path.unlink, "shards/00000/shard.json is missing"),
    "tokenizer cut short": ("tokenizer.json", cut_short, "tokenizer.json"),
    "tokenizer of another vocabulary": ("tokenizer.json", drop_last_token, "tokenizer.json"),
}



@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_entry_is_rebuilt_with_one_notice(damage: str, tiny_corpus: Path, tmp_path: Path):
    root = tmp_path / "c"
    original = build(root, tiny_corpus)
    expected = {split: np.array(original.tokens(split)) for split in ("train", "val", "test")}
    name, spoil, reason = DAMAGES[damage]
    spoil(original.path / name)

    messages: list[str] = []
    rebuilt = build(root, tiny_corpus, messages)

    notices = [m for m in messages if " is damaged (" in m]
    assert len(notices) == 1 and "\n" not in notices[0], messages
    assert notices[0].startswith(f"token cache entry {original.path} is damaged (")
    assert notices[0].endswith("): rebuilding")
    assert reason in notices[0]
    assert rebuilt.path == original.path
    for split, tokens in expected.items():
        assert np.array_equal(np.array(rebuilt.tokens(split)), tokens)
    assert verify_cache_entry(rebuilt.path, full=True) is None
    assert [p.name for p in root.iterdir()] == [original.path.name]  # nothing set aside is left


def test_the_notice_says_how_short_a_split_is(tiny_corpus: Path, tmp_path: Path):
    original = build(tmp_path / "c", tiny_corpus)
    train = original.path / "shards" / "00000" / "train.bin"
    size = train.stat().st_size
    train.write_bytes(train.read_bytes()[:1000])
    messages: list[str] = []
    build(tmp_path / "c", tiny_corpus, messages)
    assert f"(shards/00000/train.bin has 1000 bytes, expected {size}): rebuilding" in " ".join(messages)


def test_full_verification_catches_a_changed_id_the_cheap_check_misses(tiny_corpus: Path, tmp_path: Path):
    cache = build(tmp_path / "c", tiny_corpus)
    train = cache.path / "shards" / "00000" / "train.bin"
    ids = np.fromfile(train, dtype=np.uint16)
    ids[len(ids) // 3] = (ids[len(ids) // 3] + 1) % cache.meta["vocab_size"]  # still a valid id
    ids.tofile(train)

    assert verify_cache_entry(cache.path) is None  # sizes, sampled ids and tokenizer are fine
    problem = verify_cache_entry(cache.path, full=True)
    assert problem is not None and "train.bin" in problem and "checksum" in problem
    with pytest.raises(ValueError, match="train.bin"):
        TokenCache.load(cache.path).verify(full=True)


def test_an_entry_written_without_checksums_still_loads(tiny_corpus: Path, tmp_path: Path, monkeypatch):
    cache = build(tmp_path / "c", tiny_corpus)
    record_file = cache.path / "shards" / "00000" / "shard.json"
    record = json.loads(record_file.read_text())
    assert record.pop("checksums")  # a shard whose checksums are not recorded is checked for the rest
    record_file.write_text(json.dumps(record, indent=2))
    expected = np.array(cache.tokens("train"))

    def no_reading(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr("lmexp.data.cache.plan_source", no_reading)
    messages: list[str] = []
    again = build(tmp_path / "c", tiny_corpus, messages)
    assert any("hit" in m for m in messages) and np.array_equal(np.array(again.tokens("train")), expected)
    assert verify_cache_entry(again.path, full=True) is None


def test_a_full_disk_while_building_is_one_line_and_leaves_no_temporary(
    tiny_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("LMEXP_FAULT", "cache.write:enospc")
    lmexp.faults.reload()
    root = tmp_path / "c"
    try:
        with pytest.raises(StorageError) as caught:
            build(root, tiny_corpus)
    finally:
        monkeypatch.delenv("LMEXP_FAULT")
        lmexp.faults.reload()
    message = str(caught.value)
    assert "\n" not in message and "disk full" in message and str(root) in message and "needed" in message
    assert not list(root.rglob(f"{TEMPORARY_PREFIX}*")) and not list(root.rglob("manifest.json"))
    assert not list(root.rglob("shard.json"))  # no shard is half there
    build(root, tiny_corpus)  # with space again it builds


def test_the_cheap_check_reads_a_bounded_sample_of_a_long_split(tiny_corpus: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr("lmexp.data.shards.SAMPLE_WIDTH", 16)  # the tiny splits count as long
    cache = build(tmp_path / "c", tiny_corpus)
    train = cache.path / "shards" / "00000" / "train.bin"
    ids = np.fromfile(train, dtype=np.uint16)
    ids[len(ids) - 1] = 60000  # the last slice is always read
    ids.tofile(train)
    assert "train.bin holds id 60000" in (verify_cache_entry(cache.path) or "")
    ids[len(ids) - 1], ids[len(ids) // 2 + 3] = 1, 60000  # between slices: only the full check reads it
    ids.tofile(train)
    assert verify_cache_entry(cache.path) is None
    assert "train.bin holds id 60000" in (verify_cache_entry(cache.path, full=True) or "")
