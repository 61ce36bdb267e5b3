"""Where text comes from: files, folders, globs, table columns and built-in corpora.

Every source yields plain-text documents. Plain text is split into paragraphs (blank-line
separated) so that cleaning, de-duplication and the train/val/test split work on units smaller
than a whole file; the cache joins them back with one blank line, which restores the text up
to the length of blank runs.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmexp.errors import DataError

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TABLE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": ",", ".tsv": "\t"}
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")


@dataclass(frozen=True)
class Document:
    """One unit of text and where it came from (shown in error messages)."""

    text: str
    origin: str


def split_paragraphs(text: str) -> list[str]:
    """Split text on blank lines; the separator is restored as one blank line later."""
    return _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n").replace("\r", "\n"))


def decode_utf8(data: bytes, origin: str) -> str:
    """Decode bytes as UTF-8, naming the file and byte offset of binary or invalid input."""
    nul = data.find(b"\x00")
    if nul != -1:
        raise DataError(
            f"{origin} looks binary (NUL byte at offset {nul}): pass text files only, "
            "or filter the folder with a glob such as 'corpus/**/*.txt'"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{origin} is not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}): "
            "convert it first, e.g. 'iconv -f latin1 -t utf-8 IN > OUT'"
        ) from None


def read_rows(path: Path) -> Iterator[tuple[str, dict[str, object]]]:
    """(``file:line``, row) for each record of a ``.jsonl``/``.csv``/``.tsv`` table."""
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path} is not a table: use a .jsonl, .csv or .tsv file")
    # A byte-order mark would become part of the first column's name (or the first JSON line).
    text = decode_utf8(path.read_bytes(), str(path)).removeprefix("\ufeff")
    if kind == "jsonl":
        # Split on newlines only: str.splitlines() also breaks inside a line at U+2028 and friends.
        for line_no, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no} is not valid JSON ({err.msg}): fix or remove that line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no} is a JSON {type(row).__name__}, not an object: one object per line")
            yield f"{path}:{line_no}", row
        return
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a cell may hold a whole document
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=kind)  # keeps quoted newlines
    for row in reader:
        yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}


def table_columns(path: Path) -> list[str]:
    """Column names of a table (a JSONL file's: the first record's keys), for error messages."""
    for _, row in read_rows(path):
        return list(row)
    return []


def _read_table(path: Path, text_column: str) -> Iterator[Document]:
    for origin, row in read_rows(path):
        if text_column not in row:
            # A CSV's columns are the file's; each JSON line has its own fields.
            where = origin if TABLE_SUFFIXES[path.suffix.lower()] == "jsonl" else str(path)
            raise DataError(
                f"{where} has no column {text_column!r} (columns: {list(row)}): "
                "set data.text_column to the column that holds the text"
            )
        yield Document(cell_text(row[text_column]), origin)


def cell_text(value: object) -> str:
    """A table cell as text; a missing value (JSON null, short CSV row) is empty, not "None"."""
    return "" if value is None else str(value)


def _read_file(path: Path, text_column: str) -> Iterator[Document]:
    if path.suffix.lower() in TABLE_SUFFIXES:
        yield from _read_table(path, text_column)
        return
    text = decode_utf8(path.read_bytes(), str(path))
    for paragraph in split_paragraphs(text):
        yield Document(paragraph, str(path))


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
    return folders + [lmexp_cache_dir() / "datasets"]


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


def resolve_files(source: str) -> list[Path]:
    """Turn a file, folder or glob into a sorted list of files, or explain why it can't."""
    if source in NAMED_DATASETS:
        return [NAMED_DATASETS[source]()]
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"data.source folder {source!r} contains no files: put text files in it")
        return files
    if glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data.source glob {source!r} matches no files: check the pattern")
        return files
    names = sorted([*BUILTIN_SOURCES, *NAMED_DATASETS])
    raise DataError(
        f"data.source {source!r} does not exist: pass an existing file, folder or glob, "
        f"or a built-in corpus name ({', '.join(names)})"
    )


def read_documents(source: str, text_column: str = "text") -> Iterator[Document]:
    """Yield the documents of a source (see the module docstring for what a document is)."""
    if source in BUILTIN_SOURCES:
        yield from BUILTIN_SOURCES[source]()
        return
    for path in resolve_files(source):
        yield from _read_file(path, text_column)


def source_fingerprint(source: str) -> str:
    """A cheap identity of the source's current contents, for cache keys (paths, sizes, mtimes)."""
    digest = hashlib.sha256(source.encode())
    if source in BUILTIN_SOURCES:
        digest.update(f"{sys.version}:{sys.prefix}".encode())
        return digest.hexdigest()
    for path in resolve_files(source):
        stat = path.stat()
        digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()
