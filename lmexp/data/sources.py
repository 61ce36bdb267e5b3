"""Where text comes from: files, folders, globs, table columns and built-in corpora.

Every source yields plain-text documents. Plain text is split into paragraphs (blank-line
separated) so that cleaning, de-duplication and the train/val/test split work on units smaller
than a whole file; the cache joins them back with one blank line, which restores the text up
to the length of blank runs. A table row (JSONL, CSV, TSV, Parquet) is one document.

A paragraph longer than ``MAX_DOCUMENT_BYTES`` (M) is cut too, so that a corpus without blank
lines (one sentence per line) does not become one document that memory must hold. The cuts
depend only on the bytes and their absolute offsets, so a piece of a file read alone cuts where
the whole file does: for each k >= 1, at the first line break ending at or after byte k*M (the
line break is dropped) or, with no line break in the next M bytes, at the first character
boundary at or after it; and only where every line from the first one that starts after byte
(k-1)*M up to the cut holds text, not just spaces and tabs, so that no paragraph break is near
(``_forced_cut``). Documents then hold about M bytes plus a line, at most about 2M, and a
paragraph of at most M bytes (with the blank lines before it) is never cut. Offsets of a
compressed file are of its decompressed bytes. Left whole: a run of spaces and tabs longer than
M, and a table row or JSONL line, however long (one record).

Every reader streams: memory stays flat whatever the file size (bounded by the largest single
document). ``.gz`` and ``.zst`` files are read through a decompressing stream; the suffix before
the compression suffix names the format inside (``corpus.txt.gz``, ``rows.jsonl.zst``).

For a cache built in parallel, ``plan_pieces`` cuts files into pieces of about ``piece_bytes``
that ``read_piece`` reads independently, each cut at a document boundary; the pieces of a file,
read in order, yield exactly the file's documents.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import glob
import gzip
import hashlib
import io
import json
import os
import re
import sys
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from lmexp.atomic import TEMPORARY_PREFIX
from lmexp.errors import DataError, check_positive

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TABLE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": ",", ".tsv": "\t", ".parquet": "parquet"}
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")
# The same break in raw bytes, where a newline may still be written \r\n or \r (never split in
# two: a \r\n is one newline). The bytes of " \t\r\n" never occur inside a multi-byte UTF-8
# character, so byte offsets found here are character boundaries.
_BYTE_PARAGRAPH_BREAK = re.compile(rb"(?:\r\n|\r(?!\n)|\n)[ \t]*(?:\r\n|\r(?!\n)|\n)+")
_NOT_BLANK = re.compile(rb"[^ \t\r\n]")
# For forced cuts (_forced_cut): one line break; text (not only spaces and tabs) or another line
# break ahead; a line holding only spaces and tabs at the start, middle or end of a range.
_LINE_BREAK = re.compile(rb"\r\n|\r(?!\n)|\n")
_TEXT_AHEAD = re.compile(rb"[ \t]*[^ \t\r\n]")
_LINE_AHEAD = re.compile(rb"[ \t]*[\r\n]")
_BLANK_START = re.compile(rb"[ \t]*(?:[\r\n]|\Z)")
_BLANK_LINE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)[ \t]*[\r\n]")
_BLANK_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)[ \t]*\Z")

READ_BLOCK_BYTES = 1 << 20  # bytes read at a time; module constants so tests can shrink them
CUT_SCAN_BYTES = 1 << 16  # bytes read at a time while looking for a place to cut a piece
MAX_DOCUMENT_BYTES = 1 << 20  # a longer paragraph is cut (module docstring); read at call time
PARQUET_BATCH_ROWS = 1024

# What lmexp itself writes, never read as data when a folder is the source (resolve_files).
# The name of a run folder's mark file; the same as lmexp.run_folders.RUN_MARK, a higher layer
# that lmexp.data may not import.
RUN_MARK = ".lmexp-run.json"
CACHE_ENTRY_FILES = ("manifest.json", "meta.json", "plan.json")  # next to tokenizer.json: a token cache entry
SKIPPED_SUFFIXES = frozenset({".bin", ".ckpt", ".safetensors", ".pt", ".npy"})  # token ids, checkpoints, arrays


@dataclass(frozen=True)
class Document:
    """One unit of text and where it came from (shown in error messages)."""

    text: str
    origin: str


@dataclass(frozen=True)
class Piece:
    """A part of the source that can be read on its own: the unit of a cache shard.

    ``kind`` is "bytes" (a byte range ``[start, stop)`` of a plain text or JSONL file), "row_groups"
    (row groups ``[start, stop)`` of a Parquet file), "whole" (a compressed file or a CSV/TSV table,
    whose quoted newlines make byte cuts unsafe; ``stop`` is the file size) or "builtin" (a
    built-in corpus; ``path`` is its name). ``size`` is the source bytes it covers, for progress.
    """

    path: str
    start: int
    stop: int
    kind: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Piece:
        return cls(str(d["path"]), int(d["start"]), int(d["stop"]), str(d["kind"]), int(d["size"]))


def split_paragraphs(text: str) -> list[str]:
    """Split text on blank lines; the separator is restored as one blank line later."""
    return _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n").replace("\r", "\n"))


def _binary_error(where: str, offset: int, note: str = "") -> DataError:
    return DataError(
        f"{where} looks binary (NUL byte at offset {offset}{note}): pass text files only, "
        "or filter the folder with a glob such as 'corpus/**/*.txt'"
    )


def _utf8_error(where: str, byte: int, offset: int, note: str = "") -> DataError:
    return DataError(
        f"{where} is not valid UTF-8 (byte 0x{byte:02x} at offset {offset}{note}): "
        "convert it first, e.g. 'iconv -f latin1 -t utf-8 IN > OUT'"
    )


def decode_utf8(data: bytes, origin: str) -> str:
    """Decode bytes as UTF-8, naming the file and byte offset of binary or invalid input."""
    return _decode_at(data, origin, 0)


def _decode_at(data: bytes, where: str, offset: int, note: str = "") -> str:
    """``decode_utf8`` of bytes found at ``offset`` of the file, naming offsets in the file."""
    nul = data.find(b"\x00")
    if nul != -1:
        raise _binary_error(where, offset + nul, note)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _utf8_error(where, data[err.start], offset + err.start, note) from None


class _Utf8Stream:
    """Decode a byte stream block by block; a NUL or invalid byte is named by its offset in the file."""

    def __init__(self, where: str, offset: int = 0, note: str = ""):
        self.where, self.offset, self.note = where, offset, note
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def decode(self, block: bytes, final: bool = False) -> str:
        nul = block.find(b"\x00")
        if nul != -1:
            raise _binary_error(self.where, self.offset + nul, self.note)
        buffered = len(self._decoder.getstate()[0])  # the start of a character cut by the last block
        try:
            text = self._decoder.decode(block, final)
        except UnicodeDecodeError as err:
            # err.object is the buffered bytes followed by this block
            at = self.offset - buffered + err.start
            raise _utf8_error(self.where, err.object[err.start], at, self.note) from None
        self.offset += len(block)
        return text


# ---------------------------------------------------------------- opening files


def _formats(path: Path) -> tuple[str | None, str]:
    """(compression or None, the suffix that names the format inside), e.g. ("gzip", ".jsonl")."""
    suffix = path.suffix.lower()
    if suffix in COMPRESSION_SUFFIXES:
        return COMPRESSION_SUFFIXES[suffix], Path(path.stem).suffix.lower()
    return None, suffix


class _Decompressing(io.RawIOBase):
    """A decompressing stream whose corrupt or cut-short input becomes a DataError naming the file."""

    def __init__(
        self,
        stream: IO[bytes],
        path: Path,
        compression: str,
        errors: tuple[type[BaseException], ...],
        complete: Callable[[Path], bool] | None = None,
    ):
        self._stream, self._path, self._compression, self._errors = stream, path, compression, errors
        self._complete = complete  # checked once the stream ends

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._stream.read(size)
        except self._errors as err:
            raise self._error(str(err)) from None
        if not data and size != 0 and self._complete is not None:
            complete, self._complete = self._complete(self._path), None
            if not complete:
                raise self._error("it ends in the middle of a frame: cut short, e.g. by an interrupted copy")
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _error(self, why: str) -> DataError:
        return DataError(
            f"{self._path} is not a valid {self._compression} file ({why}): "
            "compress it again, or pass the uncompressed file"
        )


_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE = range(0x184D2A50, 0x184D2A60)


def _zstd_complete(path: Path) -> bool:
    """Whether a .zst file ends where a frame ends.

    zstandard's stream reader ends quietly at the end of a file cut short; walking the frame and
    block headers (a few bytes per 128 KiB block, no decompression) tells.
    """
    import zstandard

    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        position = 0
        while position < size:
            file.seek(position)
            head = file.read(18)  # the longest frame header
            magic = int.from_bytes(head[:4], "little")
            if magic in _ZSTD_SKIPPABLE:
                position += 8 + int.from_bytes(head[4:8], "little")
                continue
            if magic != _ZSTD_MAGIC:
                return False
            try:
                position += zstandard.frame_header_size(head)
            except zstandard.ZstdError:
                return False
            checksum = head[4] >> 2 & 1  # Content_Checksum_flag of the frame header descriptor
            last = 0
            while not last:
                file.seek(position)
                block = file.read(3)
                if len(block) < 3:
                    return False
                header = int.from_bytes(block, "little")
                last, kind, block_size = header & 1, header >> 1 & 3, header >> 3
                position += 3 + (1 if kind == 1 else block_size)  # an RLE block stores one byte
            position += 4 * checksum
        return position == size


@contextlib.contextmanager
def _open_bytes(path: Path) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed when its suffix says so."""
    compression, _ = _formats(path)
    if compression is None:
        with open(path, "rb") as file:
            yield file
    elif compression == "gzip":
        with gzip.open(path, "rb") as file:
            yield _Decompressing(file, path, "gzip", (gzip.BadGzipFile, EOFError, zlib.error))
    else:
        import zstandard  # imported here: only .zst corpora need it

        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as file:
            yield _Decompressing(file, path, "zstd", (zstandard.ZstdError,), _zstd_complete)


def _blocks(stream: IO[bytes], limit: int | None = None) -> Iterator[bytes]:
    """Blocks of READ_BLOCK_BYTES until the end of the stream or ``limit`` bytes."""
    while limit is None or limit > 0:
        block = stream.read(READ_BLOCK_BYTES if limit is None else min(READ_BLOCK_BYTES, limit))
        if not block:
            return
        if limit is not None:
            limit -= len(block)
        yield block


def _location(path: Path) -> tuple[str, str]:
    """(name for messages, note after an offset): offsets of a compressed file are in its decompressed data."""
    return str(path), "" if _formats(path)[0] is None else " of the decompressed data"


# ---------------------------------------------------------------- plain text


def _blank_tail(text: str) -> int:
    """Where the run of spaces, tabs and newlines that ends ``text`` starts."""
    end = len(text)
    while end and text[end - 1] in " \t\n":
        end -= 1
    return end


def stream_paragraphs(chunks: Iterable[str]) -> Iterator[str]:
    """``split_paragraphs`` of the concatenated chunks, holding only the current paragraph in memory.

    A paragraph longer than a chunk is kept as a list of chunks and joined once, so reading one
    huge paragraph stays linear.
    """
    head: list[str] = []  # the current paragraph so far, up to its last non-blank character
    tail = ""  # the blank run after it: the start of a break that the next chunk may finish
    carry_cr = False  # a \r at the end of a chunk may be the first half of \r\n
    for chunk in chunks:
        if carry_cr:
            chunk = "\r" + chunk
        carry_cr = chunk.endswith("\r")
        if carry_cr:
            chunk = chunk[:-1]
        if "\r" in chunk:
            chunk = chunk.replace("\r\n", "\n").replace("\r", "\n")
        text = tail + chunk  # a break can only start in tail or after it: head ends with a non-blank
        start = 0
        for match in _PARAGRAPH_BREAK.finditer(text):
            if match.end() == len(text):
                break  # more newlines may follow in the next chunk
            if head:
                yield "".join([*head, text[: match.start()]])
                head = []
            else:
                yield text[start : match.start()]
            start = match.end()
        cut = _blank_tail(text)
        if cut > start:
            head.append(text[start:cut])
            tail = text[cut:]
        else:
            tail = text[start:]
    if carry_cr:
        tail += "\n"
    paragraphs = _PARAGRAPH_BREAK.split(tail)
    paragraphs[0] = "".join([*head, paragraphs[0]])
    yield from paragraphs


def _forced_cut(window: bytes | bytearray, middle: int) -> tuple[int, int, str] | None:
    """Where the length rule cuts the paragraph around ``middle`` of ``window``, or None.

    ``window`` holds the bytes ``[(k-1)M, (k+1)M)`` of the file (fewer at its end) and ``middle`` is
    M, all offsets being relative to the window. The cut is the first line break ending at or
    after ``middle``, followed (after spaces and tabs) by text; with no line break there, or only
    spaces after it up to the window's end, a character boundary at or after ``middle``. It is
    made only if every line from the first line break in the window up to the cut holds text
    besides spaces and tabs: then no paragraph break is near, the cut splits one paragraph that
    runs through the whole window, and a paragraph shorter than M (with the blank lines before it)
    is never cut. Returns (where to insert, where the next document starts, the text to insert):
    "\\n" before the line break, or "\\n\\n" at the boundary, turns the cut into a paragraph break.
    """
    size = len(window)
    if size <= middle:
        return None
    line = _LINE_BREAK.search(window, middle - 1, size)  # a \r\n may end at middle ...
    if line is not None and line.end() <= middle:  # ... but this one ends before it
        line = _LINE_BREAK.search(window, middle, size)
    if line is not None and _TEXT_AHEAD.match(window, line.end(), size):
        stop, cut = line.start(), (line.start(), line.end(), "\n")
    elif line is not None and _LINE_AHEAD.match(window, line.end(), size):
        return None  # a blank line follows: the paragraph ends there
    else:  # one long line around middle: cut it at a character boundary
        stop = size if line is None else line.start()
        at = middle
        while at < stop and window[at] & 0xC0 == 0x80:  # UTF-8 continuation bytes
            at += 1
        if at >= stop:
            return None
        cut = (at, at, "\n\n")
    first = _LINE_BREAK.search(window, 0, stop)
    begin = 0 if first is None else first.end()
    lines_hold_text = not (
        _BLANK_START.match(window, begin, stop)
        or _BLANK_LINE.search(window, begin, stop)
        or _BLANK_END.search(window, begin, stop)
    )
    return cut if lines_hold_text else None


def _pieces_of(buffer: bytearray, base: int, start: int, stop: int) -> Iterator[bytes]:
    """The bytes ``[start, stop)`` of the file from ``buffer`` (which holds them from offset ``base``), in blocks."""
    for at in range(start, stop, READ_BLOCK_BYTES):
        yield bytes(buffer[at - base : min(stop, at + READ_BLOCK_BYTES) - base])


def _text_blocks(stream: IO[bytes], start: int, stop: int | None) -> Iterator[bytes | str]:
    """The bytes ``[start, stop)`` of a text stream (to its end if ``stop`` is None), in blocks,
    with the text of each forced cut (``_forced_cut``) inserted in its place.

    Cut k is decided from the bytes ``[(k-1)M, (k+1)M)`` alone, so reading starts up to 2M before
    ``start`` (the stream must then be seekable) and may look up to M past ``stop``; only the cuts
    whose next document starts in ``(start, stop]`` are made. At most about 2M bytes are held.
    """
    length = max(1, MAX_DOCUMENT_BYTES)
    k = max(1, start // length)  # the first cut that may start a document after start
    base = (k - 1) * length  # the file offset of buffer[0]
    if base:
        stream.seek(base)
    buffer = bytearray()
    at = start  # the next byte to hand out
    ended = False
    while stop is None or k * length <= stop:
        window_end = (k + 1) * length
        while not ended and base + len(buffer) < window_end:
            block = stream.read(min(READ_BLOCK_BYTES, window_end - base - len(buffer)))
            buffer += block
            ended = not block
        if base + len(buffer) <= k * length:
            break
        cut = _forced_cut(buffer, length)
        if cut is not None and start < base + cut[1] and (stop is None or base + cut[1] <= stop):
            yield from _pieces_of(buffer, base, at, base + cut[0])
            at = base + cut[0]
            yield cut[2]
        # a later cut inserts its text at (k+1)M - 1 or after
        upto = window_end - 1 if stop is None else min(window_end - 1, stop)
        yield from _pieces_of(buffer, base, at, upto)
        at = max(at, upto)
        del buffer[:length]
        base += length
        k += 1
    while True:  # past the last cut
        top = base + len(buffer) if stop is None else min(base + len(buffer), stop)
        yield from _pieces_of(buffer, base, at, top)
        at = max(at, top)
        if ended or (stop is not None and at >= stop):
            return
        base += len(buffer)
        buffer = bytearray(stream.read(READ_BLOCK_BYTES if stop is None else min(READ_BLOCK_BYTES, stop - base)))
        ended = not buffer


def _read_text(path: Path, start: int = 0, stop: int | None = None) -> Iterator[Document]:
    where, note = _location(path)
    origin = str(path)
    # A piece that ends before the file does ends at a paragraph break (or a forced cut, which
    # reads as one): its last paragraph is the empty one after it, which the whole file does not have.
    cut_short = stop is not None and stop < path.stat().st_size
    with _open_bytes(path) as stream:
        decoder = _Utf8Stream(where, start, note)

        def chunks() -> Iterator[str]:
            for block in _text_blocks(stream, start, stop):
                yield block if isinstance(block, str) else decoder.decode(block)
            yield decoder.decode(b"", final=True)

        held: str | None = None
        for paragraph in stream_paragraphs(chunks()):
            if held is not None:
                yield Document(held, origin)
            held = paragraph
        if held is not None and not (cut_short and held == ""):
            yield Document(held, origin)


# ---------------------------------------------------------------- tables


def _lines(stream: IO[bytes], offset: int, limit: int | None) -> Iterator[tuple[int, bytes]]:
    """(offset in the file, line without its \\n) for each \\n-separated line, the last one too."""
    pending: list[bytes] = []
    line_at = position = offset
    for block in _blocks(stream, limit):
        parts = block.split(b"\n")
        if len(parts) > 1:
            yield line_at, b"".join([*pending, parts[0]]) if pending else parts[0]
            line_at = position + len(parts[0]) + 1
            for part in parts[1:-1]:
                yield line_at, part
                line_at += len(part) + 1
            pending = []
        if parts[-1]:
            pending.append(parts[-1])
        position += len(block)
    yield line_at, b"".join(pending)


def _line_number(path: Path, offset: int) -> int:
    """The line that starts at ``offset`` of a plain file (read only to name a bad line)."""
    newlines = 0
    with open(path, "rb") as stream:
        for block in _blocks(stream, offset):
            newlines += block.count(b"\n")
    return newlines + 1


def _jsonl_rows(
    path: Path, start: int = 0, stop: int | None = None
) -> Iterator[tuple[str, dict[str, Any], tuple[int, int]]]:
    """(origin, row, (line number in the range, byte offset)) per record of a JSONL file or of its
    byte range ``[start, stop)``.

    A range after the file's start does not know its line numbers without reading the file up to
    it: its origins name the line's byte offset, and only an error message counts the lines
    (``_line_name``).
    """
    where, note = _location(path)
    with _open_bytes(path) as stream:
        if start:
            stream.seek(start)
        # Split on \n only: str.splitlines() also breaks inside a line at U+2028 and friends.
        for line_no, (line_at, raw) in enumerate(_lines(stream, start, None if stop is None else stop - start), 1):
            line = _decode_at(raw, where, line_at, note)
            if line_at == 0:
                line = line.removeprefix("\ufeff")  # a byte-order mark
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{_line_name(path, start, (line_no, line_at))} is not valid JSON ({err.msg}): "
                    "fix or remove that line"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{_line_name(path, start, (line_no, line_at))} is a JSON {type(row).__name__}, "
                    "not an object: one object per line"
                )
            yield (f"{path}:{line_no}" if start == 0 else f"{path} at byte {line_at}"), row, (line_no, line_at)


def _line_name(path: Path, start: int, position: tuple[int, int]) -> str:
    """``file:line`` of a line of a range starting at ``start``, from (its number in the range, its offset)."""
    line_no, line_at = position
    return f"{path}:{line_no}" if start == 0 else f"{path}:{_line_number(path, line_at)}"


class _CheckedBytes(io.RawIOBase):
    """Pass a byte stream through, refusing NUL bytes and invalid UTF-8 with their offsets."""

    def __init__(self, stream: IO[bytes], decoder: _Utf8Stream):
        self._stream, self._decoder = stream, decoder

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._stream.read(len(buffer))
        self._decoder.decode(data, final=not data)
        buffer[: len(data)] = data
        return len(data)


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a cell may hold a whole document
    where, note = _location(path)
    with _open_bytes(path) as stream:
        checked = io.BufferedReader(_CheckedBytes(stream, _Utf8Stream(where, 0, note)), READ_BLOCK_BYTES)
        # utf-8-sig: a byte-order mark would become part of the first column's name;
        # newline="": the csv module keeps quoted newlines itself.
        text = io.TextIOWrapper(checked, encoding="utf-8-sig", newline="")
        reader = csv.DictReader(text, delimiter=delimiter)
        for row in reader:
            yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}


def _parquet_file(path: Path) -> Any:
    import pyarrow  # imported here: only Parquet sources need it
    import pyarrow.parquet

    try:
        return pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(
            f"{path} is not a readable Parquet file ({err}): check the file, or pass it as JSONL or CSV"
        ) from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with contextlib.closing(_parquet_file(path)) as parquet:
        row = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}:{row}", record


def _read_parquet(path: Path, text_column: str, row_groups: range | None = None) -> Iterator[Document]:
    """The text column's cells, one document each (a null is an empty document)."""
    with contextlib.closing(_parquet_file(path)) as parquet:
        columns = parquet.schema_arrow.names
        if text_column not in columns:
            raise DataError(
                f"{path} has no column {text_column!r} (columns: {columns}): "
                "set data.text_column to the column that holds the text"
            )
        if row_groups is not None and not row_groups:
            return
        metadata = parquet.metadata
        row = sum(metadata.row_group(i).num_rows for i in range(row_groups.start)) if row_groups else 0
        batches = parquet.iter_batches(
            batch_size=PARQUET_BATCH_ROWS,
            columns=[text_column],
            row_groups=None if row_groups is None else list(row_groups),
        )
        for batch in batches:
            for value in batch.column(0).to_pylist():
                row += 1
                yield Document(cell_text(value), f"{path}:{row}")


def _table_kind(path: Path) -> str:
    compression, inner = _formats(path)
    kind = TABLE_SUFFIXES.get(inner)
    if kind is None:
        raise DataError(
            f"{path} is not a table: use a .jsonl, .csv, .tsv or .parquet file "
            "(.jsonl, .csv and .tsv may be .gz or .zst)"
        )
    if kind == "parquet" and compression is not None:
        raise DataError(f"{path}: Parquet compresses inside the file; pass the .parquet file uncompressed")
    return kind


def read_rows(path: Path) -> Iterator[tuple[str, dict[str, object]]]:
    """(``file:line``, row) for each record of a ``.jsonl``/``.csv``/``.tsv``/``.parquet`` table.

    A Parquet row's "line" is its row number, from 1. Streams: memory does not grow with the file.
    """
    kind = _table_kind(path)
    if kind == "jsonl":
        for origin, row, _ in _jsonl_rows(path):
            yield origin, row
    elif kind == "parquet":
        yield from _parquet_rows(path)
    else:
        yield from _csv_rows(path, kind)


def table_columns(path: Path) -> list[str]:
    """Column names of a table (a JSONL file's: the first record's keys), for error messages."""
    if _table_kind(path) == "parquet":
        with contextlib.closing(_parquet_file(path)) as parquet:
            return list(parquet.schema_arrow.names)
    rows = read_rows(path)
    try:
        for _, row in rows:
            return list(row)
    finally:
        rows.close()  # closes the file now, not when the generator is collected
    return []


def cell_text(value: object) -> str:
    """A table cell as text; a missing value (JSON null, short CSV row) is empty, not "None"."""
    return "" if value is None else str(value)


def _missing_column(where: str, text_column: str, columns: list[str]) -> DataError:
    return DataError(
        f"{where} has no column {text_column!r} (columns: {columns}): "
        "set data.text_column to the column that holds the text"
    )


def _read_range(path: Path, text_column: str, start: int = 0, stop: int | None = None) -> Iterator[Document]:
    """The documents of a file, or of the byte range ``[start, stop)`` of a plain text or JSONL file."""
    kind = TABLE_SUFFIXES.get(_formats(path)[1])
    if kind is None:
        yield from _read_text(path, start, stop)
    elif kind == "jsonl":
        for origin, row, position in _jsonl_rows(path, start, stop):
            if text_column not in row:  # each JSON line has its own fields
                raise _missing_column(_line_name(path, start, position), text_column, list(row))
            yield Document(cell_text(row[text_column]), origin)
    elif kind == "parquet":
        _table_kind(path)  # refuses a compressed Parquet file
        yield from _read_parquet(path, text_column)
    else:
        for origin, row in _csv_rows(path, kind):
            if text_column not in row:  # a CSV's columns are the file's
                raise _missing_column(str(path), text_column, list(row))
            yield Document(cell_text(row[text_column]), origin)


def _read_file(path: Path, text_column: str) -> Iterator[Document]:
    yield from _read_range(path, text_column)


# ---------------------------------------------------------------- built-in and named corpora


def _python_docs() -> Iterator[Document]:
    """The running Python's documentation topics (``help('topics')``): English prose, offline."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for paragraph in split_paragraphs(topics[name]):
            yield Document(paragraph, f"python-docs:{name}")


def _python_stdlib() -> Iterator[Document]:
    """The running Python's standard-library sources (top-level modules): code, offline."""
    import sysconfig

    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        yield from _read_file(path, "text")


def data_dir_candidates() -> list[Path]:
    """Folders searched for named datasets before any download."""
    folders = [Path(p) for p in os.environ.get("LMEXP_DATA_DIR", "").split(os.pathsep) if p]
    return [*folders, lmexp_cache_dir() / "datasets"]


def lmexp_cache_dir() -> Path:
    return Path(os.environ.get("LMEXP_CACHE_DIR") or Path.home() / ".cache" / "lmexp")


def _tinyshakespeare_path() -> Path:
    for folder in data_dir_candidates():
        if (folder / "tinyshakespeare.txt").is_file():
            return folder / "tinyshakespeare.txt"
    target = lmexp_cache_dir() / "datasets" / "tinyshakespeare.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(TINY_SHAKESPEARE_URL, timeout=30) as response:
            data = response.read()
    except OSError as err:
        raise DataError(
            f"tinyshakespeare is not in {[str(f) for f in data_dir_candidates()]} and downloading "
            f"it failed ({err}): download input.txt by hand and pass --data.source PATH, "
            "or put tinyshakespeare.txt in a folder named by LMEXP_DATA_DIR"
        ) from None
    tmp = target.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


BUILTIN_SOURCES: dict[str, Callable[[], Iterator[Document]]] = {
    "python-docs": _python_docs,
    "python-stdlib": _python_stdlib,
}
NAMED_DATASETS: dict[str, Callable[[], Path]] = {"tinyshakespeare": _tinyshakespeare_path}


# ---------------------------------------------------------------- which files a source means


def _skipped_name(name: str) -> bool:
    """Hidden files, lmexp's temporaries, MLflow's SQLite store, token ids, checkpoints, arrays."""
    return (
        name.startswith((".", TEMPORARY_PREFIX, "mlflow.db"))
        or os.path.splitext(name)[1].lower() in SKIPPED_SUFFIXES
    )


def _lmexp_folder(name: str, folders: list[str], files: list[str]) -> bool:
    """A hidden folder, or one lmexp wrote: MLflow runs, a run folder, a token cache entry or one of its shards."""
    if name.startswith(".") or name == "mlruns" or RUN_MARK in files or "shard.json" in files:
        return True
    names = set(files)
    return ("tokenizer.json" in names and any(n in names for n in CACHE_ENTRY_FILES)) or (
        "plan.json" in names and "shards" in folders
    )


def _walk(root: Path, excluded: set[str]) -> list[Path]:
    found = []
    top = True
    for folder, folders, files in os.walk(root):  # does not follow links to folders, like rglob
        if not top and _lmexp_folder(os.path.basename(folder), folders, files):
            folders[:] = []
            continue
        top = False
        if excluded:
            folders[:] = [n for n in folders if os.path.realpath(os.path.join(folder, n)) not in excluded]
        for name in files:
            path = os.path.join(folder, name)
            if _skipped_name(name) or not os.path.isfile(path):
                continue
            if excluded and os.path.realpath(path) in excluded:
                continue
            found.append(Path(path))
    return sorted(found)


def resolve_files(source: str, exclude: Sequence[str | os.PathLike[str]] = ()) -> list[Path]:
    """Turn a file, folder or glob into a sorted list of files, or explain why it can't.

    A folder's own lmexp outputs are left out, so a cache or runs written inside the data never
    become data: hidden files and folders, temporaries, ``mlflow.db*``, ``mlruns/``, run folders
    (those holding RUN_MARK), token cache entries, and ``.bin``/``.ckpt``/``.safetensors``/``.pt``/
    ``.npy`` files. ``exclude`` names more files or folders to leave out (of a folder or a glob),
    e.g. the cache root.
    """
    if source in NAMED_DATASETS:
        return [NAMED_DATASETS[source]()]
    excluded = {os.path.realpath(os.path.expanduser(p)) for p in exclude}
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = _walk(path, excluded)
        if not files:
            raise DataError(
                f"data.source folder {source!r} contains no files (lmexp's own outputs are skipped): "
                "put text files in it"
            )
        return files
    if glob.has_magic(source):
        matches = (Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
        files = sorted(
            p for p in matches
            if p.is_file() and not _skipped_name(p.name) and not _inside(p, excluded)
        )
        if not files:
            raise DataError(f"data.source glob {source!r} matches no files: check the pattern")
        return files
    names = sorted([*BUILTIN_SOURCES, *NAMED_DATASETS])
    raise DataError(
        f"data.source {source!r} does not exist: pass an existing file, folder or glob, "
        f"or a built-in corpus name ({', '.join(names)})"
    )


def _inside(path: Path, excluded: set[str]) -> bool:
    if not excluded:
        return False
    real = os.path.realpath(path)
    return any(real == e or real.startswith(e.rstrip(os.sep) + os.sep) for e in excluded)


def read_documents(
    source: str, text_column: str = "text", exclude: Sequence[str | os.PathLike[str]] = ()
) -> Iterator[Document]:
    """Yield the documents of a source (see the module docstring for what a document is)."""
    if source in BUILTIN_SOURCES:
        yield from BUILTIN_SOURCES[source]()
        return
    for path in resolve_files(source, exclude):
        yield from _read_file(path, text_column)


def source_fingerprint(source: str, exclude: Sequence[str | os.PathLike[str]] = ()) -> str:
    """A cheap identity of the source's current contents, for cache keys (paths, sizes, mtimes)."""
    digest = hashlib.sha256(source.encode())
    if source in BUILTIN_SOURCES:
        digest.update(f"{sys.version}:{sys.prefix}".encode())
        return digest.hexdigest()
    for path in resolve_files(source, exclude):
        stat = path.stat()
        digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- pieces


def _jsonl_cut(stream: IO[bytes], nominal: int) -> int | None:
    """Just after the first \\n at or after ``nominal - 1``, or None when the file ends first."""
    base = max(nominal - 1, 0)
    stream.seek(base)
    while block := stream.read(CUT_SCAN_BYTES):
        newline = block.find(b"\n")
        if newline != -1:
            return base + newline + 1
        base += len(block)
    return None


class _BreakFinder:
    """The end of the first whole paragraph break after a non-blank byte, fed a file's bytes in order.

    Reading the whole text finds that break too (no break can span a non-blank byte), with the
    same end (runs of newlines are taken whole), so a piece cut there starts a paragraph.
    """

    def __init__(self, offset: int):
        self.base = offset  # the file offset of buffer[0]
        self.buffer = b""  # the blank run after the last non-blank byte: an unfinished break
        self.started = False  # whether a non-blank byte was seen

    def feed(self, block: bytes) -> int | None:
        if not self.started:  # skip blank bytes: the offset may lie in a break
            found = _NOT_BLANK.search(block)
            if found is None:
                self.base += len(block)
                return None
            self.started = True
            self.base += found.end()
            block = block[found.end() :]
        buffer = self.buffer + block
        match = _BYTE_PARAGRAPH_BREAK.search(buffer)
        if match and match.end() < len(buffer):
            return self.base + match.end()
        keep = len(buffer)
        while keep and buffer[keep - 1] in b" \t\r\n":
            keep -= 1
        self.base += keep
        self.buffer = buffer[keep:]
        return None


def _text_cut(stream: IO[bytes], size: int, nominal: int) -> int | None:
    """A document boundary at or after ``nominal``: the end of the first paragraph break found
    there (``_BreakFinder``) or the first forced cut at or after it (``_forced_cut``), whichever
    comes first; None when the file ends first.

    Forced cuts bound the scan: it reads the bytes from the window before ``nominal`` to the
    cut, about 2M bytes in a corpus without blank lines, and less when a paragraph break comes
    before the next multiple of M.
    """
    length = max(1, MAX_DOCUMENT_BYTES)
    k = max(1, -(-nominal // length))  # forced cuts at or after nominal are cut k or later
    finder = _BreakFinder(nominal)
    stream.seek(nominal)
    seen = bytearray()  # the bytes [nominal, k*length): a break there comes before any forced cut
    while nominal + len(seen) < min(k * length, size):
        block = stream.read(min(CUT_SCAN_BYTES, k * length - nominal - len(seen)))
        if not block:
            break
        seen += block
        paragraph = finder.feed(block)
        if paragraph is not None:
            return paragraph
    if k * length >= size:
        return None
    stream.seek((k - 1) * length)
    window = bytearray(stream.read(nominal - (k - 1) * length)) + seen  # the bytes [(k-1)M, kM)
    while True:
        stream.seek((k - 1) * length + len(window))
        new = stream.read((k + 1) * length - (k - 1) * length - len(window))
        window += new
        paragraph = finder.feed(new) if new else None
        cut = _forced_cut(window, length)
        found = [at for at in (paragraph, None if cut is None else (k - 1) * length + cut[1]) if at is not None]
        if found:
            return min(found)  # each lies before (k+1)M, where later forced cuts start
        if (k + 1) * length >= size:
            return None
        del window[:length]
        k += 1


def _byte_pieces(path: Path, size: int, piece_bytes: int, jsonl: bool) -> list[Piece]:
    pieces, start = [], 0
    with open(path, "rb") as stream:
        while size - start > piece_bytes:
            nominal = start + piece_bytes
            cut = _jsonl_cut(stream, nominal) if jsonl else _text_cut(stream, size, nominal)
            if cut is None or cut >= size:
                break
            pieces.append(Piece(str(path), start, cut, "bytes", cut - start))
            start = cut
    pieces.append(Piece(str(path), start, size, "bytes", size - start))
    return pieces


def _row_group_pieces(path: Path, size: int, piece_bytes: int) -> list[Piece]:
    with contextlib.closing(_parquet_file(path)) as parquet:
        metadata = parquet.metadata
        groups = metadata.num_row_groups
        if groups == 0:
            return [Piece(str(path), 0, 0, "row_groups", size)]
        pieces, start, covered = [], 0, 0
        for i in range(groups):
            group = metadata.row_group(i)
            covered += sum(group.column(j).total_compressed_size for j in range(group.num_columns))
            if covered >= piece_bytes or i == groups - 1:
                pieces.append(Piece(str(path), start, i + 1, "row_groups", covered))
                start, covered = i + 1, 0
        return pieces


def plan_pieces(files: Sequence[Path], piece_bytes: int) -> list[Piece]:
    """Cut files into pieces of about ``piece_bytes`` source bytes, in file order.

    Plain text and JSONL are cut into byte ranges at document boundaries (the end of a paragraph
    break or a forced cut of a long paragraph) or line ends; Parquet into
    runs of row groups; a compressed file or a CSV/TSV table (quoted newlines make byte cuts
    unsafe) is one piece, and so is a file smaller than ``piece_bytes``. Files are never merged,
    so the same files and ``piece_bytes`` give the same pieces anywhere.
    """
    check_positive("piece_bytes", piece_bytes)
    pieces: list[Piece] = []
    for file in files:
        path = Path(file)
        size = path.stat().st_size
        compression, inner = _formats(path)
        kind = TABLE_SUFFIXES.get(inner)
        if compression is None and kind == "parquet":
            pieces += _row_group_pieces(path, size, piece_bytes)
        elif compression is not None or kind in (",", "\t", "parquet"):
            pieces.append(Piece(str(path), 0, size, "whole", size))
        else:
            pieces += _byte_pieces(path, size, piece_bytes, jsonl=kind == "jsonl")
    return pieces


def plan_source(source: str, piece_bytes: int, exclude: Sequence[str | os.PathLike[str]] = ()) -> list[Piece]:
    """The pieces of a source: ``plan_pieces`` of its files, or one "builtin" piece for a built-in corpus."""
    if source in BUILTIN_SOURCES:
        return [Piece(source, 0, 0, "builtin", 0)]
    return plan_pieces(resolve_files(source, exclude), piece_bytes)


def read_piece(piece: Piece, text_column: str = "text") -> Iterator[Document]:
    """The documents of one piece; the pieces of a file, read in order, give the file's documents."""
    if piece.kind == "builtin":
        if piece.path not in BUILTIN_SOURCES:
            raise DataError(f"{piece.path!r} is not a built-in corpus ({', '.join(sorted(BUILTIN_SOURCES))})")
        yield from BUILTIN_SOURCES[piece.path]()
        return
    path = Path(piece.path)
    if not path.is_file():
        raise DataError(f"{path} no longer exists: the source changed after it was planned; prepare the data again")
    if piece.kind == "bytes":
        yield from _read_range(path, text_column, piece.start, piece.stop)
    elif piece.kind == "row_groups":
        yield from _read_parquet(path, text_column, range(piece.start, piece.stop))
    elif piece.kind == "whole":
        yield from _read_file(path, text_column)
    else:
        raise DataError(
            f"piece of {path} has unknown kind {piece.kind!r}: expected bytes, row_groups, whole or builtin"
        )
