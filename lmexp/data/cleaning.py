"""Text cleaning: Unicode normalization, control characters, empty/short/duplicate removal."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

Normalization = Literal["NFC", "NFKC", "none"]
Dedupe = Literal["documents", "lines", "none"]

BOM = "\ufeff"
DEDUPE_WINDOW = 2_000_000  # distinct hashes a cleaner keeps (about 200 MB); a cache shard holds far fewer
# Control characters (Unicode category Cc) except newline and tab, which carry layout.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass
class CleaningReport:
    """What cleaning did, so a surprising corpus size can be explained."""

    documents_in: int = 0
    normalized: int = 0
    control_chars_removed: int = 0
    byte_order_marks_removed: int = 0
    empty_dropped: int = 0
    too_short_dropped: int = 0
    duplicates_dropped: int = 0
    duplicate_lines_dropped: int = 0
    documents_out: int = 0
    chars_out: int = 0

    def summary(self) -> str:
        return (
            f"cleaning: {self.documents_in} documents in, {self.documents_out} kept "
            f"({self.chars_out:,} chars); dropped {self.empty_dropped} empty, "
            f"{self.too_short_dropped} too short, {self.duplicates_dropped} duplicate documents, "
            f"{self.duplicate_lines_dropped} duplicate lines; {self.normalized} normalized, "
            f"{self.control_chars_removed} control characters and {self.byte_order_marks_removed} byte-order marks removed"
        )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def total(cls, reports: Iterable[dict[str, int]]) -> CleaningReport:
        """The sum of several reports (one per shard) as one."""
        total = cls()
        for report in reports:
            for name, value in report.items():
                if hasattr(total, name):
                    setattr(total, name, getattr(total, name) + int(value))
        return total


def clean_text(text: str, normalization: Normalization = "NFC") -> tuple[str, bool, int]:
    """Normalize one document; returns (text, whether normalization changed it, controls removed).

    A byte-order mark (U+FEFF, which editors on Windows put at the start of UTF-8 files) is
    removed too: kept, it becomes a character token, or three byte tokens in BPE.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace(BOM, "")
    normalized = text if normalization == "none" else unicodedata.normalize(normalization, text)
    cleaned, removed = _CONTROL.subn("", normalized)
    return cleaned.strip("\n"), normalized != text, removed


class DocumentCleaner:
    """Cleans documents one at a time, keeping only 16-byte hashes of what it has seen.

    Memory grows with the number of distinct documents (or lines), never with their text, and
    stops at ``DEDUPE_WINDOW`` of them (the set then starts anew), so any stream, even one
    compressed file of billions of lines, goes through one cleaner in bounded memory.
    """

    def __init__(self, normalization: Normalization = "NFC", min_chars: int = 1, dedupe: Dedupe = "documents") -> None:
        self.normalization = normalization
        self.min_chars = min_chars
        self.dedupe = dedupe
        self.report = CleaningReport()
        self._seen_documents: set[bytes] = set()
        self._seen_lines: set[bytes] = set()

    def _remember(self, seen: set[bytes], key: bytes) -> None:
        if len(seen) >= DEDUPE_WINDOW:
            seen.clear()  # bounded memory: exact within windows of DEDUPE_WINDOW distinct documents (or lines)
        seen.add(key)

    def clean(self, raw: str) -> str | None:
        """The cleaned document, or None when it is dropped (the report says why)."""
        report = self.report
        report.documents_in += 1
        report.byte_order_marks_removed += raw.count(BOM)
        text, changed, removed = clean_text(raw, self.normalization)
        report.normalized += changed
        report.control_chars_removed += removed
        if self.dedupe == "lines":
            lines = []
            for line in text.split("\n"):
                key = hashlib.blake2b(line.encode(), digest_size=16).digest()
                if line.strip() and key in self._seen_lines:
                    report.duplicate_lines_dropped += 1
                    continue
                self._remember(self._seen_lines, key)
                lines.append(line)
            text = "\n".join(lines)
        if not text.strip():
            report.empty_dropped += 1
            return None
        if len(text) < self.min_chars:
            report.too_short_dropped += 1
            return None
        if self.dedupe != "none":
            key = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if key in self._seen_documents:
                report.duplicates_dropped += 1
                return None
            self._remember(self._seen_documents, key)
        report.documents_out += 1
        report.chars_out += len(text)
        return text


def clean_documents(
    texts: Iterable[str],
    normalization: Normalization = "NFC",
    min_chars: int = 1,
    dedupe: Dedupe = "documents",
) -> tuple[list[str], CleaningReport]:
    """Clean documents and drop empty, too-short and exact-duplicate ones.

    ``dedupe="lines"`` also drops every line seen before anywhere in the corpus (useful for
    scraped text with boilerplate; harmful for verse or code, where lines legitimately repeat).
    """
    cleaner = DocumentCleaner(normalization, min_chars, dedupe)
    kept = [text for text in map(cleaner.clean, texts) if text is not None]
    return kept, cleaner.report
