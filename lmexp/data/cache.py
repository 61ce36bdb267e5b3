"""Token cache on disk: clean, split, train the tokenizer and encode once; memory-map afterwards.

A cache entry is a folder named by a hash of everything that decides its contents (source
identity, cleaning, split and tokenizer settings). It is written to a temporary folder and
renamed into place, so a crash never leaves a half-written entry that a later run would trust.
Every load checks the entry cheaply (metadata, file sizes, a sample of the ids, the tokenizer);
``verify_cache_entry(path, full=True)`` also compares each file with the checksum recorded at
build time. An entry that fails is set aside and rebuilt, with a one-line notice.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lmexp.atomic import TEMPORARY_PREFIX, replace_folder, storage_error
from lmexp.data.cleaning import clean_documents
from lmexp.data.sources import read_documents
from lmexp.data.tokenizer import tokenizer_from_json, train_tokenizer
from lmexp.errors import DataError
from lmexp.faults import fault_point

SPLITS = ("train", "val", "test")
DOCUMENT_SEPARATOR = "\n\n"
CACHE_FORMAT = 1
_ENCODE_CHUNK = 4096  # documents per encode_batch call
_SAMPLE_SLICES = 8  # the cheap check reads this many strided slices of each split ...
_SAMPLE_WIDTH = 4096  # ... of this many ids
_HASH_BLOCK = 1 << 20


def cache_key(settings: dict[str, Any]) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the cache and the memory traffic whenever the vocabulary fits."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class CacheDamaged(DataError):
    """A cache entry whose files do not match its metadata; the message says which and how."""


@dataclass
class TokenCache:
    """A built cache entry: the tokenizer, one memory-mapped token array per split, and stats."""

    path: Path
    tokenizer: Tokenizer
    meta: dict[str, Any]

    @classmethod
    def load(cls, path: Path) -> TokenCache:
        """Open the entry at ``path`` after the cheap check; ``CacheDamaged`` if it fails."""
        meta, tokenizer, problem = _inspect(path, full=False)
        if problem is not None:
            raise CacheDamaged(problem)
        assert meta is not None and tokenizer is not None
        return cls(path, tokenizer, meta)

    def verify(self, full: bool = True) -> None:
        """Raise ``CacheDamaged`` naming the first file that does not match the metadata."""
        problem = verify_cache_entry(self.path, full=full)
        if problem is not None:
            raise CacheDamaged(f"token cache entry {self.path} is damaged: {problem}")

    def tokens(self, split: str) -> np.ndarray:
        count = self.meta["splits"][split]["tokens"]
        if count == 0:
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(self.path / f"{split}.bin", dtype=self.meta["dtype"], mode="r", shape=(count,))

    def bytes_per_token(self, split: str) -> float:
        stats = self.meta["splits"][split]
        return stats["bytes"] / max(stats["tokens"], 1)


def verify_cache_entry(path: str | os.PathLike, full: bool = False) -> str | None:
    """What is wrong with the cache entry at ``path``, or None when it checks out.

    The cheap check (every load) reads the metadata, compares each split's size with its token
    count, looks at a bounded sample of ids and loads the tokenizer. ``full`` also reads every id
    and compares each file with the checksum recorded at build time (entries written before
    checksums were recorded are checked for everything else).
    """
    return _inspect(Path(path), full)[2]


def _inspect(path: Path, full: bool) -> tuple[dict[str, Any] | None, Tokenizer | None, str | None]:
    """(metadata, tokenizer, problem): the problem is None when the entry checks out."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None, "meta.json is missing"
    except (OSError, ValueError) as err:
        return None, None, f"meta.json is unreadable: {_first_line(err)}"
    problem = _meta_problem(meta)
    if problem is not None:
        return None, None, problem
    dtype = np.dtype(meta["dtype"])
    for split in SPLITS:
        count = meta["splits"][split]["tokens"]
        file = path / f"{split}.bin"
        try:
            size = file.stat().st_size
        except OSError:
            if count == 0:
                continue
            return None, None, f"{file.name} is missing, expected {count * dtype.itemsize} bytes"
        if size != count * dtype.itemsize:
            return None, None, f"{file.name} has {size} bytes, expected {count * dtype.itemsize}"
        if count == 0:
            continue
        try:
            largest = _largest_id(np.memmap(file, dtype=dtype, mode="r", shape=(count,)), full)
        except (OSError, ValueError) as err:
            unreadable = f"{file.name} is unreadable: {_first_line(err)}"
            return None, None, _checksum_problem(path, meta, file.name) or unreadable
        if largest >= meta["vocab_size"]:
            return None, None, f"{file.name} holds id {largest}, beyond the vocabulary of {meta['vocab_size']}"
    try:
        tokenizer = tokenizer_from_json((path / "tokenizer.json").read_text(encoding="utf-8"))
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        # A read that fails is where a checksum says most: name the file that changed.
        unreadable = f"tokenizer.json is unreadable: {_first_line(err)}"
        return None, None, _checksum_problem(path, meta, "tokenizer.json") or unreadable
    if tokenizer.get_vocab_size() != meta["vocab_size"]:
        return None, None, (f"tokenizer.json has {tokenizer.get_vocab_size()} tokens, "
                            f"expected {meta['vocab_size']}")
    if full:
        problem = _checksum_problem(path, meta)
        if problem is not None:
            return None, None, problem
    return meta, tokenizer, None


def _meta_problem(meta: Any) -> str | None:
    """What the metadata lacks for the entry to be read, or None."""
    if not isinstance(meta, dict):
        return "meta.json holds no metadata object"
    if meta.get("dtype") not in ("uint16", "uint32"):
        return f"meta.json has dtype {meta.get('dtype')!r}, expected uint16 or uint32"
    if not isinstance(meta.get("vocab_size"), int):
        return "meta.json has no vocab_size"
    splits = meta.get("splits")
    for split in SPLITS:
        stats = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(stats, dict) or not isinstance(stats.get("tokens"), int) or stats["tokens"] < 0:
            return f"meta.json has no token count for the {split} split"
    return None


def _largest_id(tokens: np.ndarray, full: bool) -> int:
    """The largest id in ``tokens`` (``full``) or in a few strided slices of it (bounded cost)."""
    if full or tokens.size <= _SAMPLE_SLICES * _SAMPLE_WIDTH:
        return int(tokens.max())
    starts = np.unique(np.linspace(0, tokens.size - _SAMPLE_WIDTH, _SAMPLE_SLICES, dtype=np.int64))
    return max(int(tokens[start : start + _SAMPLE_WIDTH].max()) for start in starts)


def _checksum_problem(path: Path, meta: dict[str, Any], only: str | None = None) -> str | None:
    """The first file (or file ``only``) that differs from its recorded checksum, or None (also
    when none are recorded)."""
    for name, recorded in (meta.get("checksums") or {}).items():
        if only is not None and name != only:
            continue
        try:
            actual = _file_checksum(path / name)
        except OSError as err:
            return f"{name} is unreadable: {_first_line(err)}"
        if actual != recorded:
            return f"{name} does not match its checksum"
    return None


def _new_hash() -> Any:
    return hashlib.blake2b(digest_size=16)


def _file_checksum(file: Path) -> str:
    digest = _new_hash()
    with open(file, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return f"blake2b:{digest.hexdigest()}"


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


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
) -> tuple[int, int, str]:
    """Write the split's ids to ``out``: (tokens, text bytes, checksum of the file)."""
    n_tokens = n_bytes = 0
    digest = _new_hash()
    with open(out, "wb") as f:
        for start in range(0, len(documents), _ENCODE_CHUNK):
            chunk = [doc + DOCUMENT_SEPARATOR for doc in documents[start : start + _ENCODE_CHUNK]]
            encodings = tokenizer.encode_batch(chunk, add_special_tokens=False)
            ids = np.concatenate([np.asarray(e.ids, dtype=dtype) for e in encodings])
            ids.tofile(f)
            digest.update(ids.tobytes())
            n_tokens += ids.size
            n_bytes += sum(len(doc.encode()) for doc in chunk)
            progress(len(chunk))
            if start == 0:
                f.flush()
                fault_point("cache.write", path=out)
    return n_tokens, n_bytes, f"blake2b:{digest.hexdigest()}"


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
    if path.exists():
        try:
            cache = TokenCache.load(path)
        except CacheDamaged as damage:
            log(f"token cache entry {path} is damaged ({damage}): rebuilding")
            _set_aside(path)
        else:
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
    meta: dict[str, Any] = {}

    def fill(folder: Path) -> None:
        try:
            stats = _encode_all(tokenizer, splits, folder, dtype)
            tokenizer.save(str(folder / "tokenizer.json"))
            meta.update(
                settings=settings,
                dtype=dtype.name,
                vocab_size=tokenizer.get_vocab_size(),
                splits={
                    name: {key: split[key] for key in ("documents", "tokens", "bytes")} for name, split in stats.items()
                },
                checksums={
                    **{f"{name}.bin": split["checksum"] for name, split in stats.items()},
                    "tokenizer.json": _file_checksum(folder / "tokenizer.json"),
                },
                cleaning=report.to_dict(),
                build_seconds=round(time.perf_counter() - started, 3),
            )
            (folder / "meta.json").write_text(json.dumps(meta, indent=2))
        except OSError as err:
            # At most one token per byte of text: an upper bound on the space the ids take.
            needed = sum(len(doc.encode()) + len(DOCUMENT_SEPARATOR) for doc in documents) * dtype.itemsize
            raise storage_error(err, path, needed) from None

    try:
        replace_folder(path, fill)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        # Another process moved its identical entry in first: use it.
    cache = TokenCache.load(path)
    total = sum(s["tokens"] for s in meta["splits"].values())
    log(
        f"token cache built in {meta['build_seconds']:.1f}s: {path} ({total:,} tokens, "
        f"vocab {meta['vocab_size']}, {dtype.name})"
    )
    return cache


def _set_aside(path: Path) -> None:
    """Take a damaged entry out of its place in one rename (no reader can open it after), then
    delete it; a kill in between leaves a temporary that the next build removes."""
    aside = path.with_name(f"{TEMPORARY_PREFIX}{os.getpid()}-damaged-{path.name}")
    shutil.rmtree(aside, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):  # another process set it aside first
        os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _encode_all(tokenizer: Tokenizer, splits: dict[str, list[str]], folder: Path, dtype: np.dtype) -> dict:
    from rich.progress import Progress

    total = sum(len(docs) for docs in splits.values())
    stats: dict[str, dict[str, Any]] = {}
    # A bar only where encoding takes long enough to watch.
    with Progress(transient=True, disable=total < 50 * _ENCODE_CHUNK) as bar:
        task = bar.add_task("tokenizing", total=total)
        for name in SPLITS:
            tokens, n_bytes, checksum = _encode_split(
                tokenizer, splits[name], folder / f"{name}.bin", dtype, lambda n: bar.advance(task, n)
            )
            stats[name] = {"documents": len(splits[name]), "tokens": tokens, "bytes": n_bytes, "checksum": checksum}
    return stats
