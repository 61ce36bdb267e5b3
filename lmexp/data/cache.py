"""Token cache on disk: clean, split, train the tokenizer and encode once; memory-map afterwards.

A cache entry is a folder named by a hash of everything that decides its contents (source
identity, cleaning, split and tokenizer settings). It is written to a temporary folder and
renamed into place, so a crash never leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lmexp.data.cleaning import clean_documents
from lmexp.data.sources import read_documents
from lmexp.data.tokenizer import load_tokenizer, train_tokenizer
from lmexp.errors import DataError

SPLITS = ("train", "val", "test")
DOCUMENT_SEPARATOR = "\n\n"
CACHE_FORMAT = 1
_ENCODE_CHUNK = 4096  # documents per encode_batch call


def cache_key(settings: dict[str, Any]) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the cache and the memory traffic whenever the vocabulary fits."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class TokenCache:
    """A built cache entry: the tokenizer, one memory-mapped token array per split, and stats."""

    path: Path
    tokenizer: Tokenizer
    meta: dict[str, Any]

    @classmethod
    def load(cls, path: Path) -> TokenCache:
        meta = json.loads((path / "meta.json").read_text())
        return cls(path, load_tokenizer(path), meta)

    def tokens(self, split: str) -> np.ndarray:
        count = self.meta["splits"][split]["tokens"]
        if count == 0:
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(self.path / f"{split}.bin", dtype=self.meta["dtype"], mode="r", shape=(count,))

    def bytes_per_token(self, split: str) -> float:
        stats = self.meta["splits"][split]
        return stats["bytes"] / max(stats["tokens"], 1)


def split_documents(
    documents: Sequence[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Assign whole documents to splits with a seeded shuffle (same seed, same split)."""
    n = len(documents)
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise DataError(
            f"the corpus has {n} documents after cleaning, too few for a train split with "
            f"val_fraction={val_fraction} and test_fraction={test_fraction}: add text or lower the fractions"
        )
    bounds = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
    # Keep the corpus order inside each split so neighbouring paragraphs stay neighbours.
    return {name: [documents[i] for i in np.sort(idx)] for name, idx in bounds.items()}


def _encode_split(
    tokenizer: Tokenizer, documents: list[str], out: Path, dtype: np.dtype, progress: Callable[[int], None]
) -> tuple[int, int]:
    n_tokens = n_bytes = 0
    with open(out, "wb") as f:
        for start in range(0, len(documents), _ENCODE_CHUNK):
            chunk = [doc + DOCUMENT_SEPARATOR for doc in documents[start : start + _ENCODE_CHUNK]]
            encodings = tokenizer.encode_batch(chunk, add_special_tokens=False)
            ids = np.concatenate([np.asarray(e.ids, dtype=dtype) for e in encodings])
            ids.tofile(f)
            n_tokens += ids.size
            n_bytes += sum(len(doc.encode()) for doc in chunk)
            progress(len(chunk))
    return n_tokens, n_bytes


def build_token_cache(
    root: Path,
    settings: dict[str, Any],
    *,
    log: Callable[[str], None] = print,
    tokenizer: Tokenizer | None = None,
) -> TokenCache:
    """Return the cache entry for ``settings``, building it if it does not exist yet.

    ``settings`` must hold: source, text_column, normalization, min_chars, dedupe,
    val_fraction, test_fraction, seed, tokenizer, vocab_size, special_tokens, and a
    ``fingerprint`` of the source contents. A given ``tokenizer`` (a pretrained model's) encodes
    the text instead of one trained on it; ``settings["tokenizer"]`` must then identify it.
    """
    path = root / cache_key(settings)
    if (path / "meta.json").is_file():
        cache = TokenCache.load(path)
        log(f"token cache hit: {path} ({cache.meta['splits']['train']['tokens']:,} train tokens)")
        return cache

    started = time.perf_counter()
    texts = (doc.text for doc in read_documents(settings["source"], settings["text_column"]))
    documents, report = clean_documents(
        texts, settings["normalization"], settings["min_chars"], settings["dedupe"]
    )
    log(report.summary())
    if not documents:
        raise DataError(
            f"data.source {settings['source']!r} is empty after cleaning ({report.documents_in} documents "
            f"in, {report.empty_dropped} empty, {report.too_short_dropped} shorter than "
            f"min_chars={settings['min_chars']}): check the source or lower data.min_chars"
        )
    splits = split_documents(documents, settings["val_fraction"], settings["test_fraction"], settings["seed"])
    if tokenizer is None:
        tokenizer = train_tokenizer(
            splits["train"], settings["tokenizer"], settings["vocab_size"], settings["special_tokens"]
        )
    dtype = token_dtype(tokenizer.get_vocab_size())
    # Text that spells a special token ("[MASK]" in a document) is text, not the special id.
    tokenizer.encode_special_tokens = True

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=root))
    try:
        stats = _encode_all(tokenizer, splits, tmp, dtype)
        tokenizer.save(str(tmp / "tokenizer.json"))
        meta = {
            "settings": settings,
            "dtype": dtype.name,
            "vocab_size": tokenizer.get_vocab_size(),
            "splits": stats,
            "cleaning": report.to_dict(),
            "build_seconds": round(time.perf_counter() - started, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race: its entry is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cache = TokenCache.load(path)
    total = sum(s["tokens"] for s in stats.values())
    log(
        f"token cache built in {meta['build_seconds']:.1f}s: {path} ({total:,} tokens, "
        f"vocab {meta['vocab_size']}, {dtype.name})"
    )
    return cache


def _encode_all(tokenizer: Tokenizer, splits: dict[str, list[str]], folder: Path, dtype: np.dtype) -> dict:
    from rich.progress import Progress

    total = sum(len(docs) for docs in splits.values())
    stats: dict[str, dict[str, int]] = {}
    # A bar only where encoding takes long enough to watch.
    with Progress(transient=True, disable=total < 50 * _ENCODE_CHUNK) as bar:
        task = bar.add_task("tokenizing", total=total)
        for name in SPLITS:
            tokens, n_bytes = _encode_split(
                tokenizer, splits[name], folder / f"{name}.bin", dtype, lambda n: bar.advance(task, n)
            )
            stats[name] = {"documents": len(splits[name]), "tokens": tokens, "bytes": n_bytes}
    return stats
