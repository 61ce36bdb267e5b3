"""Tokenizers trained with Hugging Face ``tokenizers``: character-level, byte-level BPE, WordPiece."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lmexp.data.contract import Task
from lmexp.errors import ConfigError

TokenizerKind = Literal["char", "bpe", "wordpiece"]

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
MLM_SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]


def special_tokens_for(kind: TokenizerKind, task: Task) -> list[str]:
    """Special tokens a tokenizer needs: masked LM needs the BERT set, otherwise only [UNK]."""
    if task in ("masked_lm", "classification"):
        return list(MLM_SPECIAL_TOKENS)
    # Byte-level BPE can encode any string, so it needs no unknown token.
    return [] if kind == "bpe" else [UNK]


def train_tokenizer(
    texts: Iterable[str],
    kind: TokenizerKind = "char",
    vocab_size: int = 4096,
    special_tokens: list[str] | None = None,
) -> Tokenizer:
    """Train a tokenizer on an iterator of documents.

    ``char`` keeps every character seen as one token (``vocab_size`` is then ignored: the
    alphabet decides it); ``bpe`` is GPT-2-style byte-level BPE; ``wordpiece`` is BERT's.
    """
    specials = list(special_tokens or [])
    if kind == "char":
        return _char_tokenizer(texts, specials)
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token=UNK))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        if UNK not in specials:
            specials.insert(0, UNK)
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        raise ConfigError(f"tokenizer {kind!r} is unknown: choose one of char, bpe, wordpiece")
    if vocab_size < 32:
        raise ConfigError(f"vocab_size={vocab_size} is too small for {kind}: use at least 32")
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _char_tokenizer(texts: Iterable[str], specials: list[str]) -> Tokenizer:
    """Every character seen is one token: a BPE model with no merges.

    Built directly instead of with ``BpeTrainer(vocab_size=1)``, which gives the same
    tokenizer.json (special tokens first, then characters by code point) but is over 20x
    slower, since it turns every document into per-character symbols only to merge none.
    """
    alphabet: set[str] = set()
    for text in texts:
        alphabet.update(text)
    vocab: dict[str, int] = {}
    for token in [*specials, *sorted(alphabet)]:  # sorted() orders by code point, as the trainer does
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK if UNK in specials else None))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(specials)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``tokenizer.json`` (or the one inside a folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"tokenizer file {str(path)!r} does not exist: pass a tokenizer.json or its folder")
    return tokenizer_from_json(path.read_text(encoding="utf-8"))


def tokenizer_from_json(text: str) -> Tokenizer:
    """Rebuild a saved tokenizer. Text that spells a special token ("[MASK]" in a prompt) stays
    text, as when the cache was encoded: that setting is not part of tokenizer.json."""
    tokenizer = Tokenizer.from_str(text)
    tokenizer.encode_special_tokens = True
    return tokenizer


def encode_prompt(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[str]]:
    """Token ids of a prompt, and the pieces of it the tokenizer does not know.

    A character tokenizer maps an unseen character to ``[UNK]`` (which decodes to nothing) or
    drops it; WordPiece maps a whole unknown word to ``[UNK]``. Either way the model sees less
    than the user typed, so callers say which pieces were lost.
    """
    encoding = tokenizer.encode(text, add_special_tokens=False)
    unk_id = tokenizer.token_to_id(UNK)
    unknown = [text[start:end] for token_id, (start, end) in zip(encoding.ids, encoding.offsets) if token_id == unk_id]
    # Without an unknown token, unseen characters vanish (and the offsets around them are not
    # reliable): ask about each distinct character instead.
    unknown += [
        char for char in dict.fromkeys(text)
        if not char.isspace() and not tokenizer.encode(char, add_special_tokens=False).ids
    ]
    return encoding.ids, list(dict.fromkeys(unknown))


def describe_unknown(unknown: list[str]) -> str:
    """One clause naming what ``encode_prompt`` could not encode."""
    shown = ", ".join(repr(piece) for piece in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
    return (
        f"not in the tokenizer's vocabulary, so the model sees [UNK] or nothing in their place: {shown}; "
        "use characters that occur in the training text"
    )


def tokenizer_identity(tokenizer: Tokenizer) -> str:
    """A short fingerprint of a tokenizer's full definition, for cache keys."""
    import hashlib

    return "json:" + hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def resolve_tokenizer(setting: str) -> Tokenizer | None:
    """``char``/``bpe``/``wordpiece`` -> None (train that kind); anything else is a path to a
    ``tokenizer.json`` (or its folder) to use as it is."""
    if setting in get_args(TokenizerKind):
        return None
    if not (setting.endswith(".json") or Path(setting).expanduser().is_dir() or "/" in setting):
        raise ConfigError(
            f"data.tokenizer={setting!r} is not supported: choose one of char, bpe, wordpiece (trained on the "
            "data), or give the path of a tokenizer.json"
        )
    return load_tokenizer(Path(setting).expanduser())


class CharTable:
    """Encodes text for a character tokenizer with one array lookup per code point.

    A character tokenizer (a BPE model with no merges, no normalizer and no pre-tokenizer) maps
    each code point to its id on its own, so a whole chunk of documents can be encoded at once
    with numpy: the same ids as ``Tokenizer.encode``, many times faster. Unknown characters become
    the unknown token, or vanish when the tokenizer has none, as in ``tokenizers``.
    """

    def __init__(self, table: np.ndarray, unk_id: int | None) -> None:
        self.table = table  # code point -> id, -1 for unknown; the last entry is -1 for anything beyond
        self.unk_id = unk_id
        self.unknown = 0  # characters outside the alphabet encoded so far

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> CharTable | None:
        """The table for ``tokenizer`` when it is a character tokenizer, else None."""
        spec = json.loads(tokenizer.to_str())
        model = spec.get("model") or {}
        if (
            model.get("type") != "BPE" or model.get("merges") or model.get("dropout") or model.get("fuse_unk")
            or model.get("byte_fallback") or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix") or spec.get("normalizer") or spec.get("pre_tokenizer")
            or spec.get("post_processor") or not tokenizer.encode_special_tokens
            or any(not token.get("special") for token in spec.get("added_tokens") or [])
        ):
            return None
        vocab: dict[str, int] = model.get("vocab") or {}
        singles = {ord(token): token_id for token, token_id in vocab.items() if len(token) == 1}
        if not singles:
            return None
        table = np.full(max(singles) + 2, -1, dtype=np.int64)
        table[list(singles)] = list(singles.values())
        unk = model.get("unk_token")
        return cls(table, vocab.get(unk) if unk is not None else None)

    def encode(self, text: str) -> tuple[np.ndarray, int]:
        """(ids, UTF-8 bytes of ``text``)."""
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        n_bytes = int(codes.size + np.count_nonzero(codes >= 0x80) + np.count_nonzero(codes >= 0x800)
                      + np.count_nonzero(codes >= 0x10000))
        ids = self.table[np.minimum(codes, self.table.size - 1)]
        unknown = ids < 0
        if unknown.any():
            self.unknown += int(np.count_nonzero(unknown))
            ids = ids[~unknown] if self.unk_id is None else np.where(unknown, self.unk_id, ids)
        return ids, n_bytes
