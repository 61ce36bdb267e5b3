from pathlib import Path

import pytest

from lmexp.data.cleaning import clean_documents, clean_text
from lmexp.data.sources import read_documents, split_paragraphs
from lmexp.errors import DataError


def test_clean_text_normalizes_and_strips_controls():
    text, changed, removed = clean_text("cafe\u0301\x07 ok\r\nnext\x00", "NFC")
    assert text == "caf\u00e9 ok\nnext"
    assert changed and removed == 2


def test_clean_documents_reports_every_drop():
    docs = ["hello world", "", "   ", "hi", "hello world", "another doc"]
    kept, report = clean_documents(docs, min_chars=5)
    assert kept == ["hello world", "another doc"]
    counts = (report.documents_in, report.empty_dropped, report.too_short_dropped, report.duplicates_dropped)
    assert counts == (6, 2, 1, 1)
    assert report.documents_out == 2 and report.chars_out == len("hello world") + len("another doc")
    assert "2 kept" in report.summary()


def test_line_dedupe_drops_repeated_lines_only_when_asked():
    docs = ["a line\nshared", "other\nshared"]
    assert clean_documents(docs, dedupe="documents")[0] == docs
    kept, report = clean_documents(docs, dedupe="lines")
    assert kept == ["a line\nshared", "other"] and report.duplicate_lines_dropped == 1


def test_paragraph_split_round_trips():
    text = "one\ntwo\n\nthree\n\n\nfour"
    assert split_paragraphs(text) == ["one\ntwo", "three", "four"]


def test_reads_folder_glob_jsonl_and_tsv(tmp_path: Path):
    (tmp_path / "a.txt").write_text("alpha\n\nbeta")
    (tmp_path / "b.jsonl").write_text('{"text": "gamma"}\n\n{"text": "delta"}\n')
    (tmp_path / "c.tsv").write_text("label\tsentence\n1\tepsilon\n0\tzeta\n")
    assert [d.text for d in read_documents(str(tmp_path / "a.txt"))] == ["alpha", "beta"]
    assert [d.text for d in read_documents(str(tmp_path / "b.jsonl"))] == ["gamma", "delta"]
    assert [d.text for d in read_documents(str(tmp_path / "c.tsv"), text_column="sentence")] == ["epsilon", "zeta"]
    assert [d.text for d in read_documents(str(tmp_path / "*.txt"))] == ["alpha", "beta"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("eta")
    (tmp_path / "c.tsv").unlink()
    assert [d.text for d in read_documents(str(tmp_path))] == ["alpha", "beta", "gamma", "delta", "eta"]


def test_builtin_offline_corpus_has_text():
    docs = list(read_documents("python-docs"))
    assert len(docs) > 500 and sum(len(d.text) for d in docs) > 200_000


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"abc\x00def", r"looks binary \(NUL byte at offset 3\)"),
        (b"caf\xe9 au lait", r"not valid UTF-8 \(byte 0xe9 at offset 3\)"),
    ],
)
def test_binary_and_non_utf8_name_file_and_offset(tmp_path: Path, content: bytes, match: str):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as err:
        list(read_documents(str(path)))
    assert str(path) in str(err.value)


def test_missing_column_lists_columns(tmp_path: Path):
    path = tmp_path / "t.csv"
    path.write_text("label,sentence\n1,hi\n")
    with pytest.raises(DataError, match=r"no column 'text' \(columns: \['label', 'sentence'\]\)"):
        list(read_documents(str(path)))


def test_missing_source_names_the_fix(tmp_path: Path):
    with pytest.raises(DataError, match=r"does not exist: pass an existing file, folder or glob.*python-docs"):
        list(read_documents(str(tmp_path / "nope.txt")))


def test_table_cells_keep_quoted_newlines_unicode_separators_and_nulls(tmp_path: Path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text('text\n"first line\nsecond line"\nplain\n')
    assert [d.text for d in read_documents(str(csv_path))] == ["first line\nsecond line", "plain"]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "a\u2028b"}\n{"text": null}\n')
    assert [d.text for d in read_documents(str(jsonl))] == ["a\u2028b", ""]


def test_a_table_cell_may_hold_a_whole_document(tmp_path: Path):
    big = "word " * 60_000  # 300 KB, beyond the csv module's default field limit of 128 KB
    (tmp_path / "big.tsv").write_text(f"label\tsentence\n1\t{big}\n")
    assert [len(d.text) for d in read_documents(str(tmp_path / "big.tsv"), text_column="sentence")] == [len(big)]


def test_byte_order_marks_are_stripped_and_counted(tmp_path: Path):
    from lmexp.data.tokenizer import train_tokenizer

    path = tmp_path / "bom.txt"
    path.write_bytes("\ufefffirst paragraph\n\nsecond one\n".encode("utf-8"))
    texts = [doc.text for doc in read_documents(str(path))]
    kept, report = clean_documents(texts)
    assert kept == ["first paragraph", "second one"] and report.byte_order_marks_removed == 1
    assert "1 byte-order marks removed" in report.summary()
    assert "\ufeff" not in train_tokenizer(kept, "char").get_vocab()

    table = tmp_path / "bom.tsv"
    table.write_bytes("\ufefftext\tlabel\nhello\t1\n".encode("utf-8"))  # the header's first name stays "text"
    assert [doc.text for doc in read_documents(str(table))] == ["hello"]
