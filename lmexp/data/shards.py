"""Cache shards: read, clean, split and encode one piece of the source into token files.

A shard is everything one piece of the source (``lmexp.data.sources.Piece``) contributes to the
token cache: ``train.bin``, ``val.bin`` and ``test.bin`` with the ids of its documents, and
``shard.json`` with their counts and checksums. Memory stays flat: documents stream from the
piece, only hashes of what was seen are kept (for de-duplication), and ids are written in
bounded chunks. A shard folder appears whole or not at all (``lmexp.atomic.replace_folder``),
so an incomplete shard is never trusted.

Which split a document joins is a function of (seed, document) alone, a keyed hash, so every
host and every later run agrees without seeing the rest of the corpus, and repeated documents
always land in the same split.

``python -m lmexp.data.shards ENTRY`` is a worker process (it imports no torch): it builds the
shards of a planned cache entry whose indices arrive on standard input, one at a time as it
finishes the last, and reports progress as JSON lines on standard output.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lmexp.atomic import replace_folder
from lmexp.data.cleaning import DocumentCleaner
from lmexp.data.sources import Piece, read_piece
from lmexp.data.tokenizer import CharTable, tokenizer_from_json
from lmexp.faults import fault_point

SPLITS = ("train", "val", "test")
DOCUMENT_SEPARATOR = "\n\n"
CHUNK_CHARS = 1 << 21  # text encoded per call: big enough for the tokenizer's threads, bounded memory
CHUNK_DOCUMENTS = 4096
HASH_BLOCK = 1 << 20
SAMPLE_SLICES = 8  # the cheap check reads this many strided slices of each file ...
SAMPLE_WIDTH = 4096  # ... of this many ids

Progress = Callable[[int, int], None]  # (source bytes read, documents read) since the last call


def split_of(text: str, seed: int, carve: dict[str, float]) -> str:
    """The split of a cleaned document: a keyed hash of its text, uniform in [0, 1), falls in
    ``val`` below the val fraction, in ``test`` below val + test, else in ``train``."""
    if not carve:
        return "train"
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode()[:64])
    position = int.from_bytes(digest.digest(), "little") / 2**64
    bound = 0.0
    for split in ("val", "test"):
        bound += carve.get(split, 0.0)
        if position < bound:
            return split
    return "train"


def shard_name(index: int) -> str:
    return f"{index:05d}"


def new_hash() -> Any:
    return hashlib.blake2b(digest_size=16)


def file_checksum(file: Path) -> str:
    digest = new_hash()
    with open(file, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return f"blake2b:{digest.hexdigest()}"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the cache and the memory traffic whenever the vocabulary fits."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class Encoder:
    """texts -> (their ids joined, their UTF-8 bytes). A character tokenizer is encoded with a
    numpy table (same ids, much faster), any other with the tokenizer's batch encoding."""

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype) -> None:
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.table = CharTable.of(tokenizer)

    @property
    def unknown(self) -> int:
        """Characters a character tokenizer did not know (trained on a sample, it can miss rare ones)."""
        return self.table.unknown if self.table is not None else 0

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, int]:
        if self.table is not None:
            ids, n_bytes = self.table.encode("".join(texts))  # each character encodes on its own
            return ids.astype(self.dtype), n_bytes
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        if not encodings:
            return np.zeros(0, self.dtype), 0
        ids = np.concatenate([np.asarray(e.ids, dtype=self.dtype) for e in encodings])
        return ids, len("".join(texts).encode("utf-8", "surrogatepass"))


class SplitWriter:
    """Appends one split's documents to its token file in bounded chunks."""

    def __init__(self, file: Path, encode: Encoder) -> None:
        self.file = file
        self.encode = encode
        self.handle = open(file, "wb")  # noqa: SIM115  (closed by close(); in the shard's temporary folder, renamed in whole)
        self.digest = new_hash()
        self.documents = self.tokens = self.bytes = 0
        self.pending: list[str] = []
        self.pending_chars = 0
        self.flushed = False

    def add(self, text: str) -> None:
        self.pending.append(text + DOCUMENT_SEPARATOR)
        self.pending_chars += len(text) + len(DOCUMENT_SEPARATOR)
        self.documents += 1
        if self.pending_chars >= CHUNK_CHARS or len(self.pending) >= CHUNK_DOCUMENTS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        ids, n_bytes = self.encode(self.pending)
        self.pending, self.pending_chars = [], 0
        data = ids.tobytes()
        self.handle.write(data)
        self.digest.update(data)
        self.tokens += ids.size
        self.bytes += n_bytes
        if not self.flushed:
            self.flushed = True
            self.handle.flush()
            fault_point("cache.write", path=self.file)

    def close(self) -> dict[str, Any]:
        self.flush()
        self.handle.close()
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes,
                "checksum": f"blake2b:{self.digest.hexdigest()}"}


def cleaned_documents(piece: Piece, fixed_split: str | None, plan: dict[str, Any], cleaner: DocumentCleaner,
                      progress: Progress | None = None) -> Iterator[tuple[str, str]]:
    """(split, cleaned text) for each kept document of ``piece``, in source order. A piece of an
    explicit split file keeps ``fixed_split``; the others are carved by ``split_of``."""
    carve, seed = plan["carve"], plan["seed"]
    for document in read_piece(piece, plan["text_column"]):
        if progress is not None:
            # Characters stand in for bytes (exact for ASCII); the shard reports its true size at the end.
            progress(len(document.text) + len(DOCUMENT_SEPARATOR), 1)
        text = cleaner.clean(document.text)
        if text is not None:
            yield (fixed_split or split_of(text, seed, carve)), text


def new_cleaner(plan: dict[str, Any]) -> DocumentCleaner:
    cleaning = plan["cleaning"]
    return DocumentCleaner(cleaning["normalization"], cleaning["min_chars"], cleaning["dedupe"])


def build_shard(entry: Path, plan: dict[str, Any], index: int, tokenizer: Tokenizer,
                progress: Progress | None = None) -> dict[str, Any]:
    """Build shard ``index`` of the planned entry into ``entry/shards/NNNNN``; returns its record.
    A shard holds one piece of a large file, or several small files read one after another."""
    shard = plan["shards"][index]
    pieces = [Piece.from_dict(piece) for piece in shard["pieces"]]
    dtype = np.dtype(plan["dtype"])
    encode = Encoder(tokenizer, dtype)
    record: dict[str, Any] = {}
    started = time.perf_counter()
    budget = [0]  # source bytes this piece may still report: characters stand in for bytes

    def counted(size: int, documents: int) -> None:
        step = min(size, budget[0])
        budget[0] -= step
        if progress is not None:
            progress(step, documents)

    def fill(folder: Path) -> None:
        cleaner = new_cleaner(plan)
        writers = {split: SplitWriter(folder / f"{split}.bin", encode) for split in SPLITS}
        try:
            for piece in pieces:
                budget[0] = piece.size
                for split, text in cleaned_documents(piece, shard["split"], plan, cleaner, counted):
                    writers[split].add(text)
                if progress is not None and budget[0]:
                    progress(budget[0], 0)  # the piece is read: its whole size is done
            stats = {split: writer.close() for split, writer in writers.items()}
        finally:
            for writer in writers.values():
                writer.handle.close()
        record.update(
            format=2,
            index=index,
            pieces=shard["pieces"],
            tokenizer=plan["tokenizer"],
            dtype=dtype.name,
            splits={split: {key: s[key] for key in ("documents", "tokens", "bytes")} for split, s in stats.items()},
            checksums={f"{split}.bin": s["checksum"] for split, s in stats.items()},
            unknown_characters=encode.unknown,
            cleaning=cleaner.report.to_dict(),
            seconds=round(time.perf_counter() - started, 3),
        )
        (folder / "shard.json").write_text(json.dumps(record, indent=2))  # inside the temporary folder

    folder = entry / "shards" / shard_name(index)
    try:
        replace_folder(folder, fill, shared=True)
    except OSError as err:
        # Another machine renamed the same shard in between our look and our rename: the
        # shards are identical, keep theirs.
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (folder / "shard.json").exists():
            raise
    return record


def shard_problem(folder: Path, plan: dict[str, Any], full: bool = False) -> str | None:
    """What is wrong with a built shard, or None: its record, file sizes, a sample of the ids
    (every id with ``full``, and the checksums), and that it was encoded with the entry's tokenizer."""
    name = f"shards/{folder.name}"
    try:
        record = json.loads((folder / "shard.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{name}/shard.json is missing"
    except (OSError, ValueError) as err:
        return f"{name}/shard.json is unreadable: {first_line(err)}"
    if not isinstance(record, dict) or not isinstance(record.get("splits"), dict):
        return f"{name}/shard.json holds no shard record"
    if record.get("tokenizer") != plan["tokenizer"]:
        return f"{name} was encoded with another tokenizer"
    return files_problem(folder, record, plan["vocab_size"], full, prefix=f"{name}/")


def files_problem(folder: Path, record: dict[str, Any], vocab_size: int, full: bool, prefix: str = "") -> str | None:
    """Sizes, sampled (or all) ids and checksums of the split files that ``record`` describes."""
    dtype = np.dtype(record["dtype"])
    for split in SPLITS:
        stats = record["splits"].get(split)
        if not isinstance(stats, dict) or not isinstance(stats.get("tokens"), int) or stats["tokens"] < 0:
            return f"{prefix}{'shard.json' if prefix else 'meta.json'} has no token count for the {split} split"
        count = stats["tokens"]
        file = folder / f"{split}.bin"
        try:
            size = file.stat().st_size
        except OSError:
            if count == 0:
                continue
            return f"{prefix}{file.name} is missing, expected {count * dtype.itemsize} bytes"
        if size != count * dtype.itemsize:
            return f"{prefix}{file.name} has {size} bytes, expected {count * dtype.itemsize}"
        if count == 0:
            continue
        try:
            largest = largest_id(np.memmap(file, dtype=dtype, mode="r", shape=(count,)), full)
        except (OSError, ValueError) as err:
            unreadable = f"{prefix}{file.name} is unreadable: {first_line(err)}"
            return checksum_problem(folder, record, file.name, prefix) or unreadable
        if largest >= vocab_size:
            return f"{prefix}{file.name} holds id {largest}, beyond the vocabulary of {vocab_size}"
    if full:
        names = [f"{split}.bin" for split in SPLITS]
        for name in names:
            problem = checksum_problem(folder, record, name, prefix)
            if problem is not None:
                return problem
    return None


def largest_id(tokens: np.ndarray, full: bool) -> int:
    """The largest id in ``tokens`` (``full``) or in a few strided slices of it (bounded cost)."""
    if full or tokens.size <= SAMPLE_SLICES * SAMPLE_WIDTH:
        return int(tokens.max())
    starts = np.unique(np.linspace(0, tokens.size - SAMPLE_WIDTH, SAMPLE_SLICES, dtype=np.int64))
    return max(int(tokens[start : start + SAMPLE_WIDTH].max()) for start in starts)


def checksum_problem(folder: Path, record: dict[str, Any], name: str, prefix: str = "") -> str | None:
    """Whether file ``name`` differs from its recorded checksum (None also when none is recorded)."""
    recorded = (record.get("checksums") or {}).get(name)
    if recorded is None:
        return None
    try:
        actual = file_checksum(folder / name)
    except OSError as err:
        return f"{prefix}{name} is unreadable: {first_line(err)}"
    return None if actual == recorded else f"{prefix}{name} does not match its checksum"


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def read_plan(entry: Path) -> dict[str, Any]:
    return json.loads((entry / "plan.json").read_text(encoding="utf-8"))


def _worker(entry: Path, indices: Iterator[int]) -> None:
    """Build each shard index read from ``indices`` (the builder sends the next one when this
    worker reports the last one done); progress and outcomes go out as JSON lines."""
    plan = read_plan(entry)
    tokenizer = tokenizer_from_json((entry / "tokenizer.json").read_text(encoding="utf-8"))
    parent = os.getppid()
    pending = [0, 0]
    last = time.monotonic()

    def say(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    def progress(size: int, documents: int) -> None:
        nonlocal last
        pending[0] += size
        pending[1] += documents
        if time.monotonic() - last > 0.5:
            if os.getppid() != parent:  # the builder that started us is gone: stop, leave no shard
                raise SystemExit(3)
            say({"bytes": pending[0], "documents": pending[1]})
            pending[:] = [0, 0]
            last = time.monotonic()

    say({"ready": True})
    for index in indices:
        build_shard(entry, plan, index, tokenizer, progress)
        say({"bytes": pending[0], "documents": pending[1], "done": index})
        pending[:] = [0, 0]


def _indices_from(stream: Any) -> Iterator[int]:
    for line in stream:
        if line.strip():
            yield int(line)


def main(argv: list[str]) -> int:
    """``python -m lmexp.data.shards ENTRY``: build the shard indices given one per line on
    standard input, until it closes."""
    if len(argv) != 1:
        print("usage: python -m lmexp.data.shards ENTRY  (shard indices on standard input, one per line)",
              file=sys.stderr)
        return 2
    try:
        _worker(Path(argv[0]), _indices_from(sys.stdin))
    except Exception as err:  # noqa: BLE001  (reported to the builder, which raises it in its own process)
        sys.stdout.write(json.dumps({"error": type(err).__name__, "message": str(err)}) + "\n")
        sys.stdout.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
