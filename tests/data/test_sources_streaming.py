"""Streaming readers, compressed and Parquet sources, pieces for shards, and what a folder source skips."""

import gzip
import io
import itertools
import json
import random
import tracemalloc
from pathlib import Path

import pytest

from lmexp.data import sources
from lmexp.data.sources import (
    Piece,
    plan_pieces,
    plan_source,
    read_documents,
    read_piece,
    read_rows,
    resolve_files,
    source_fingerprint,
    split_paragraphs,
    stream_paragraphs,
    table_columns,
)
from lmexp.errors import DataError

# Pieces of text chosen to hit every edge: CR, CRLF, blank lines with spaces, long newline runs, multi-byte characters.
ATOMS = ["a", "b", "word ", " ", "\t", "\n", "\n", "\r", "\r\n", "\n\n", "\n\n\n\n", "\n \t\n", "\r\n\r\n"]
ATOMS += ["é", "€", "𝄞"]


def random_text(rng: random.Random, atoms: int) -> str:
    return "".join(rng.choice(ATOMS) for _ in range(atoms))


def texts(docs) -> list[str]:
    return [doc.text for doc in docs]


def test_streamed_paragraphs_equal_the_whole_text_split(tmp_path: Path, monkeypatch):
    rng = random.Random(0)
    path = tmp_path / "t.txt"
    for trial in range(150):
        text = random_text(rng, rng.randint(0, 60))
        expected = split_paragraphs(text)
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert list(stream_paragraphs(chunks)) == expected, (text, chunks)
        path.write_bytes(text.encode())
        monkeypatch.setattr(sources, "READ_BLOCK_BYTES", 1 + trial % 5)  # blocks cut characters and CRLFs
        assert texts(read_documents(str(path))) == expected, text


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"ab\n\n" * 20 + b"caf\xe9 au lait", r"not valid UTF-8 \(byte 0xe9 at offset 83\)"),
        (b"ab\n\n" * 20 + b"x\xe2\x82(", r"not valid UTF-8 \(byte 0xe2 at offset 81\)"),  # a character cut by a block
        (b"ab\n\n" * 20 + b"x\xe2\x82", r"not valid UTF-8 \(byte 0xe2 at offset 81\)"),  # cut short by the end
        (b"ab\n\n" * 20 + b"xy\x00", r"looks binary \(NUL byte at offset 82\)"),
    ],
    ids=["invalid", "cut-character", "truncated", "nul"],
)
def test_bad_bytes_in_a_later_block_are_named_by_their_offset_in_the_file(tmp_path, monkeypatch, content, match):
    monkeypatch.setattr(sources, "READ_BLOCK_BYTES", 7)
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as err:
        list(read_documents(str(path)))
    assert str(path) in str(err.value)
    # the same offset when the bad byte is read by a later piece of the file
    pieces = plan_pieces([path], 10)
    assert len(pieces) > 1
    with pytest.raises(DataError, match=match):
        for piece in pieces:
            list(read_piece(piece))


def compress(data: bytes, suffix: str) -> bytes:
    if suffix == ".gz":
        return gzip.compress(data)
    import zstandard

    half = len(data) // 2  # two frames, as parallel compressors write
    return zstandard.ZstdCompressor().compress(data[:half]) + zstandard.ZstdCompressor().compress(data[half:])


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".zstd"])
def test_compressed_text_and_tables_stream(tmp_path: Path, monkeypatch, suffix: str):
    monkeypatch.setattr(sources, "READ_BLOCK_BYTES", 5)
    text = "first paragraph\n\nsecond\r\n\r\nthird é\n"
    (tmp_path / f"corpus.txt{suffix}").write_bytes(compress(text.encode(), suffix))
    assert texts(read_documents(str(tmp_path / f"corpus.txt{suffix}"))) == split_paragraphs(text)

    rows = "".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n" for i in range(40))
    jsonl = tmp_path / f"rows.jsonl{suffix}"
    jsonl.write_bytes(compress(rows.encode(), suffix))
    assert texts(read_documents(str(jsonl))) == [f"row {i}" for i in range(40)]
    assert [origin for origin, _ in read_rows(jsonl)][-1] == f"{jsonl}:40"
    assert table_columns(jsonl) == ["text", "label"]

    table = tmp_path / f"t.csv{suffix}"
    table.write_bytes(compress('\ufefftext,label\n"two\nlines",1\nplain,0\n'.encode(), suffix))
    assert texts(read_documents(str(table))) == ["two\nlines", "plain"]
    assert table_columns(table) == ["text", "label"]

    bad = tmp_path / f"bad.txt{suffix}"
    bad.write_bytes(compress(b"abcdefgh\xff", suffix))
    with pytest.raises(DataError, match=r"byte 0xff at offset 8 of the decompressed data"):
        list(read_documents(str(bad)))
    assert all(p.kind == "whole" for p in plan_pieces(sorted(tmp_path.iterdir()), 4))


@pytest.mark.parametrize(("suffix", "kind"), [(".gz", "gzip"), (".zst", "zstd")])
def test_a_compressed_file_cut_short_names_the_file(tmp_path: Path, suffix: str, kind: str):
    path = tmp_path / f"c.txt{suffix}"
    whole = compress(b"hello world\n\n" * 2000 + bytes(range(32, 127)) * 50, suffix)
    path.write_bytes(whole[: len(whole) - 7])
    with pytest.raises(DataError, match=rf"c\.txt\{suffix} is not a valid {kind} file"):
        list(read_documents(str(path)))
    path.write_bytes(b"plain text, not compressed")
    with pytest.raises(DataError, match=rf"c\.txt\{suffix} is not a valid {kind} file"):
        list(read_documents(str(path)))


def test_jsonl_errors_keep_their_messages(tmp_path: Path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "a"}\n\n[1, 2]\n')
    with pytest.raises(DataError, match=r"r\.jsonl:3 is a JSON list, not an object"):
        list(read_documents(str(path)))
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"r\.jsonl:2 has no column 'text' \(columns: \['body'\]\).*data\.text_column"):
        list(read_documents(str(path)))


def write_parquet(path: Path, values: list, row_group_size: int, extra: bool = True) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"text": pa.array(values, type=pa.string())}
    if extra:
        columns["id"] = pa.array(range(len(values)))
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


def test_parquet_rows_are_documents(tmp_path: Path):
    path = tmp_path / "t.parquet"
    write_parquet(path, ["one\n\ntwo", None, "three"], row_group_size=2)
    docs = list(read_documents(str(path)))
    assert texts(docs) == ["one\n\ntwo", "", "three"]  # a row is not split into paragraphs; null is empty
    assert [d.origin for d in docs] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert table_columns(path) == ["text", "id"]
    assert [row for _, row in read_rows(path)][1] == {"text": None, "id": 1}
    missing = r"t\.parquet has no column 'body' \(columns: \['text', 'id'\]\).*data\.text_column"
    with pytest.raises(DataError, match=missing):
        list(read_documents(str(path), text_column="body"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet is not a readable Parquet file"):
        list(read_documents(str(tmp_path / "junk.parquet")))


def test_parquet_pieces_are_runs_of_row_groups(tmp_path: Path):
    path = tmp_path / "t.parquet"
    values = [f"document {i} " * (i % 7 + 1) for i in range(100)]
    write_parquet(path, values, row_group_size=10)
    pieces = plan_pieces([path], 300)
    assert len(pieces) > 1 and all(p.kind == "row_groups" for p in pieces)
    assert pieces[0].start == 0 and pieces[-1].stop == 10
    assert all(a.stop == b.start for a, b in itertools.pairwise(pieces))
    assert all(p.size > 0 for p in pieces)
    read = [doc for piece in pieces for doc in read_piece(piece)]
    assert read == list(read_documents(str(path)))  # texts and row-number origins
    assert plan_pieces([path], 1 << 30) == [Piece(str(path), 0, 10, "row_groups", pieces[0].size + sum(
        p.size for p in pieces[1:]))]


def check_pieces(path: Path, piece_bytes: int) -> list[Piece]:
    pieces = plan_pieces([path], piece_bytes)
    size = path.stat().st_size
    assert pieces[0].start == 0 and pieces[-1].stop == size
    assert all(a.stop == b.start for a, b in itertools.pairwise(pieces))
    assert all(p.kind == "bytes" and p.size == p.stop - p.start and p.path == str(path) for p in pieces)
    assert all(p.size >= piece_bytes for p in pieces[:-1])
    whole = list(read_documents(str(path)))
    assert [doc for piece in pieces for doc in read_piece(piece)] == whole  # exactly, with no empty extras
    return pieces


def test_text_pieces_read_in_order_give_the_whole_file(tmp_path: Path, monkeypatch):
    rng = random.Random(1)
    path = tmp_path / "t.txt"
    several = 0
    for trial in range(200):
        monkeypatch.setattr(sources, "CUT_SCAN_BYTES", 1 + trial % 4)
        monkeypatch.setattr(sources, "READ_BLOCK_BYTES", 1 + trial % 6)
        path.write_bytes(random_text(rng, rng.randint(0, 80)).encode())
        several += len(check_pieces(path, rng.randint(1, 20))) > 1
    assert several > 100
    path.write_bytes(b"one long paragraph\nwith single newlines only\n" * 50)
    assert len(check_pieces(path, 10)) == 1  # shorter than MAX_DOCUMENT_BYTES: nowhere to cut
    path.write_bytes(b"x\n\n\n  \ny\r\n\r\n\r\nz" * 30)  # a break right after the nominal cut is not the whole file's
    for piece_bytes in range(1, 12):
        check_pieces(path, piece_bytes)


# Long paragraphs: lines of text (no blank line), long lines, spaces around line breaks, CR, CRLF and
# multi-byte characters next to the cut points, and now and then a paragraph break.
LONG_ATOMS = ["word", "a", " ", "\t", "\n", "\n", "\r\n", "\r", "é", "€", "𝄞", "xyzxyzxyzxyz", " \n ", "\n\n"]


def long_text(rng: random.Random, atoms: int, blank_lines: bool) -> str:
    choices = LONG_ATOMS if blank_lines else LONG_ATOMS[:-1]
    return "".join(rng.choice(choices) for _ in range(atoms))


def reference_documents(raw: bytes, size: int) -> list[str]:
    """The documents of the whole file by the module's rule, computed on all of its bytes at once."""
    parts, at = [], 0
    for k in range(1, len(raw) // size + 2):
        cut = sources._forced_cut(raw[(k - 1) * size : (k + 1) * size], size)
        if cut is not None:
            parts += [raw[at : (k - 1) * size + cut[0]].decode(), cut[2]]
            at = (k - 1) * size + cut[0]
    parts.append(raw[at:].decode())
    return split_paragraphs("".join(parts))


def paragraph_spans(raw: bytes) -> list[int]:
    """The byte length of each paragraph with the break before it."""
    pieces = sources._BYTE_PARAGRAPH_BREAK.split(raw)
    breaks = [m.end() - m.start() for m in sources._BYTE_PARAGRAPH_BREAK.finditer(raw)]
    return [len(p) + b for p, b in zip(pieces, [0, *breaks], strict=True)]


def squeeze(text: str) -> str:
    return "".join(text.split())


def test_long_paragraphs_are_cut_the_same_whole_or_in_pieces(tmp_path: Path, monkeypatch):
    rng = random.Random(3)
    path = tmp_path / "t.txt"
    cut = unchanged = 0
    for trial in range(1500):
        size = rng.randint(1, 40)
        monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", size)
        monkeypatch.setattr(sources, "READ_BLOCK_BYTES", rng.randint(1, 9))
        monkeypatch.setattr(sources, "CUT_SCAN_BYTES", rng.randint(1, 9))
        text = long_text(rng, rng.randint(0, 120), blank_lines=trial % 3 == 0)
        raw = text.encode()
        path.write_bytes(raw)
        docs = texts(read_documents(str(path)))
        assert docs == reference_documents(raw, size), (size, text)
        assert squeeze("".join(docs)) == squeeze(text)  # cuts only drop or add blank space
        if max(paragraph_spans(raw)) <= size:  # no paragraph longer than the limit: today's documents
            assert docs == split_paragraphs(text), (size, text)
            unchanged += 1
        cut += docs != split_paragraphs(text)
        check_pieces(path, rng.randint(1, 30))
    assert cut > 500 and unchanged > 100


@pytest.mark.parametrize(
    "content",
    [
        "".join(f"sentence number {i} of a corpus without blank lines.\n" for i in range(60)),
        "".join(f"line {i}\r\n" for i in range(80)),  # CRLF
        "".join(f"line {i}\r" for i in range(80)),  # old Mac line ends
        "one huge line with no line break at all, " * 40,
        "€𝄞é" * 300,  # only multi-byte characters, one line
        "".join(f"  indented {i} 𝄞€ \n" for i in range(70)) + "\n\n" + "tail line\n" * 40,
    ],
    ids=["sentences", "crlf", "cr", "one-line", "multibyte", "mixed"],
)
def test_files_without_blank_lines_are_cut_into_bounded_documents(tmp_path: Path, monkeypatch, content: str):
    path = tmp_path / "t.txt"
    path.write_bytes(content.encode())
    longest_line = max(len(line.encode()) for line in content.replace("\r", "\n").split("\n"))
    for size in (7, 16, 64, 200):
        monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", size)
        docs = texts(read_documents(str(path)))
        assert docs == reference_documents(content.encode(), size)
        assert len(docs) > 1 and squeeze("".join(docs)) == squeeze(content)
        assert max(len(doc.encode()) for doc in docs) <= 2 * size + longest_line
        assert all(doc.encode().decode() == doc for doc in docs)  # no character cut in two
        for piece_bytes in (1, 5, size, 3 * size):
            check_pieces(path, piece_bytes)


def test_the_cut_rule_on_a_small_example(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 20)
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i:02d}\n" for i in range(12)))  # 8 bytes a line
    # The first line break ending at or after bytes 20, 40, 60, 80 ends a document.
    assert texts(read_documents(str(path))) == [
        "line 00\nline 01\nline 02",
        "line 03\nline 04\nline 05",
        "line 06\nline 07",
        "line 08\nline 09\nline 10",
        "line 11\n",
    ]
    assert [(p.start, p.stop) for p in plan_pieces([path], 30)] == [(0, 48), (48, 88), (88, 96)]
    path.write_text("x" * 50)  # no line break: cut at bytes 20 and 40
    assert texts(read_documents(str(path))) == ["x" * 20, "x" * 20, "x" * 10]
    path.write_text("short\nparagraph\n\n" + "another\none\n\n" + "end")  # paragraphs under the limit
    assert texts(read_documents(str(path))) == ["short\nparagraph", "another\none", "end"]


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_text_is_cut_like_plain_text(tmp_path: Path, monkeypatch, suffix: str):
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 50)
    monkeypatch.setattr(sources, "READ_BLOCK_BYTES", 7)
    content = "".join(f"sentence {i} é\r\n" for i in range(200)).encode()
    (tmp_path / "a.txt").write_bytes(content)
    (tmp_path / f"a.txt{suffix}").write_bytes(compress(content, suffix))
    plain = texts(read_documents(str(tmp_path / "a.txt")))
    assert len(plain) > 20
    assert texts(read_documents(str(tmp_path / f"a.txt{suffix}"))) == plain


def test_planning_a_file_without_blank_lines_reads_little(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 1 << 12)
    path = tmp_path / "lines.txt"
    path.write_bytes(b"".join(b"sentence %d of a corpus with one sentence a line.\n" % i for i in range(40_000)))
    read = 0

    class Counting(io.FileIO):
        def read(self, size=-1):
            nonlocal read
            data = super().read(size)
            read += len(data)
            return data

    monkeypatch.setattr(sources, "open", lambda p, mode="r": Counting(p, mode.replace("b", "")), raising=False)
    pieces = plan_pieces([path], 100_000)
    assert len(pieces) > 15
    assert all(p.size <= 100_000 + 2 * 4096 for p in pieces)  # each cut lies within a window of the nominal one
    assert read <= len(pieces) * 3 * 4096  # about two windows per cut, not the rest of the file
    monkeypatch.undo()
    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 1 << 12)
    check_pieces(path, 100_000)


def test_jsonl_pieces_read_in_order_give_the_whole_file(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(sources, "CUT_SCAN_BYTES", 3)
    rng = random.Random(2)
    path = tmp_path / "r.jsonl"
    lines = [
        json.dumps({"text": random_text(rng, rng.randint(0, 12))}) if rng.random() > 0.1 else "" for _ in range(60)
    ]
    path.write_text("\n".join(lines) + "\n", newline="")
    whole = list(read_documents(str(path)))
    for piece_bytes in (1, 7, 50, 400, 10_000):
        pieces = plan_pieces([path], piece_bytes)
        assert all(a.stop == b.start for a, b in itertools.pairwise(pieces)) and pieces[-1].stop == path.stat().st_size
        read = [list(read_piece(piece)) for piece in pieces]
        assert texts(doc for docs in read for doc in docs) == texts(whole)
        assert read[0] == whole[: len(read[0])]  # the first piece knows its line numbers
    # a bad line in a later piece is named by its line in the file
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(30)) + "{oops\n")
    pieces = plan_pieces([path], 40)
    with pytest.raises(DataError, match=r"r\.jsonl:31 is not valid JSON"):
        list(read_piece(pieces[-1]))
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(30)) + '{"body": 1}\n')
    with pytest.raises(DataError, match=r"r\.jsonl:31 has no column 'text'"):
        list(read_piece(plan_pieces([path], 40)[-1]))


def test_plans_are_per_file_and_serialisable(tmp_path: Path):
    (tmp_path / "a.txt").write_text("small\n\nfile")
    (tmp_path / "b.txt").write_text("paragraph one\n\n" * 100)
    (tmp_path / "c.tsv").write_text("text\n" + "row\n" * 500)
    (tmp_path / "d.txt.gz").write_bytes(gzip.compress(b"zipped\n\n" * 500))
    pieces = plan_source(str(tmp_path), 200)
    assert [Path(p.path).name for p in pieces if p.kind != "bytes"] == ["c.tsv", "d.txt.gz"]
    assert [Path(p.path).name for p in pieces].count("a.txt") == 1  # small files are their own piece
    assert [Path(p.path).name for p in pieces].count("b.txt") > 3
    assert [Path(p.path).name for p in pieces] == sorted(Path(p.path).name for p in pieces)
    assert [Piece.from_dict(json.loads(json.dumps(p.to_dict()))) for p in pieces] == pieces
    assert plan_source(str(tmp_path), 200) == pieces  # deterministic
    assert [doc for p in pieces for doc in read_piece(p)] == list(read_documents(str(tmp_path)))

    (builtin,) = plan_source("python-docs", 200)
    assert builtin == Piece("python-docs", 0, 0, "builtin", 0)
    first = list(itertools.islice(read_piece(builtin), 50))
    assert first == list(itertools.islice(read_documents("python-docs"), 50))
    with pytest.raises(DataError, match="no longer exists"):
        list(read_piece(Piece(str(tmp_path / "gone.txt"), 0, 5, "bytes", 5)))


def test_a_folder_source_never_reads_lmexp_outputs(tmp_path: Path):
    data = tmp_path / "corpus"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("alpha\n\nbeta")
    (data / "sub" / "b.md").write_text("gamma")
    files = resolve_files(str(data))
    fingerprint = source_fingerprint(str(data))

    entry = data / "cache" / "0123abcd"  # a token cache entry
    (entry / "shards" / "00000").mkdir(parents=True)
    for name in ("tokenizer.json", "manifest.json", "plan.json"):
        (entry / name).write_text("{}")
    (entry / "shards" / "00000" / "train.bin").write_bytes(b"\x00\x01" * 8)
    (entry / "shards" / "00000" / "shard.json").write_text("{}")
    old = data / "cache" / "old-format"  # a format-1 entry
    old.mkdir()
    (old / "tokenizer.json").write_text("{}")
    (old / "meta.json").write_text("{}")
    (old / "val.bin").write_bytes(b"\x00\x00")
    run = data / "runs" / "gpt-1"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".lmexp-run.json").write_text("{}")
    (run / "config.yaml").write_text("model: gpt\n")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"\x00")
    (data / "mlruns" / "0").mkdir(parents=True)
    (data / "mlruns" / "0" / "meta.yaml").write_text("name: x\n")
    (data / "mlflow.db").write_bytes(b"SQLite format 3\x00")
    (data / "mlflow.db-journal").write_bytes(b"\x00")
    (data / ".lmexp-tmp-123-x.txt").write_text("half written")
    (data / "model.safetensors").write_bytes(b"\x00")
    (data / "ids.npy").write_bytes(b"\x93NUMPY")
    (data / ".git").mkdir()
    (data / ".git" / "HEAD").write_text("ref: refs/heads/main\n")

    assert resolve_files(str(data)) == files
    assert texts(read_documents(str(data))) == ["alpha", "beta", "gamma"]
    assert source_fingerprint(str(data)) == fingerprint

    elsewhere = data / "my-cache"  # a cache root the caller names
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("not data")
    assert source_fingerprint(str(data)) != fingerprint
    assert source_fingerprint(str(data), exclude=(elsewhere,)) == fingerprint
    assert resolve_files(str(data / "**" / "*.txt"), exclude=(elsewhere,)) == [data / "a.txt"]
    assert texts(read_documents(str(data), exclude=[str(elsewhere)])) == ["alpha", "beta", "gamma"]
    assert [p.path for p in plan_source(str(data), 1 << 20, exclude=(elsewhere,))] == [str(f) for f in files]


def test_memory_stays_flat_on_a_large_file(tmp_path: Path):
    path = tmp_path / "big.txt"
    paragraph = ("A line of ordinary prose, long enough to matter. " * 40 + "\n\n").encode()
    with open(path, "wb") as out:
        block = paragraph * 256
        while out.tell() < 50_000_000:
            out.write(block)
    tracemalloc.start()
    try:
        count = chars = 0
        for doc in read_documents(str(path)):
            count += 1
            chars += len(doc.text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count > 20_000 and chars > 45_000_000
    assert peak < 20_000_000, f"peak traced memory {peak / 1e6:.1f} MB while streaming a 50 MB file"


def test_memory_stays_flat_on_a_file_without_blank_lines(tmp_path: Path):
    path = tmp_path / "lines.txt"
    lines = [f"Sentence {i} of a corpus laid out one sentence a line, with no blank line.\n" for i in range(1000)]
    block = "".join(lines).encode()
    longest_line = max(len(line) for line in lines)
    with open(path, "wb") as out:
        while out.tell() < 30_000_000:
            out.write(block)
    tracemalloc.start()
    try:
        count = chars = longest = 0
        for doc in read_documents(str(path)):
            count += 1
            chars += len(doc.text)
            longest = max(longest, len(doc.text))  # ASCII: characters are bytes
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count >= 30_000_000 // sources.MAX_DOCUMENT_BYTES and chars > 29_000_000
    assert longest <= sources.MAX_DOCUMENT_BYTES + longest_line
    assert peak < 20_000_000, f"peak traced memory {peak / 1e6:.1f} MB while streaming a 30 MB file without blank lines"
