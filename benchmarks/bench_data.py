"""Token-cache build cost per tokenizer: where a cold build spends its time, and what a cache hit costs.

    python benchmarks/bench_data.py --source ../shared/data/tinyshakespeare.txt

Each tokenizer builds its cache ``--repeats`` times through the settings ``TextDataModule``
derives, each time into a fresh empty cache folder so every build is cold (the OS file cache
is warm: this measures lmexp, not the disk). The stages are timed by wrapping the cache
module's own steps, so there is no second implementation of the build to drift from it:

- read + clean: reading the source and ``clean_documents`` (reading is lazy, so they overlap);
- train: ``train_tokenizer`` on the train split;
- encode + write: ``encode_batch`` over every split and writing the ``.bin`` memmaps;
- other: the rest (split, saving the tokenizer, ``meta.json``, the rename, reloading).

The row shown is the repeat with the median total. MB/s divide the source size by the whole
build and by the encoding stage. A cache hit is the same call again (fingerprint, key,
``meta.json`` and tokenizer load), the median of several. Without ``--source`` the built-in
offline ``python-docs`` corpus is used. Results are printed and appended to BENCHMARKS.md.
The WordPiece trainer of ``tokenizers`` is not deterministic (its vocabulary can differ from
build to build), so its token count may vary slightly between runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lmexp.data.cache as cache_module  # noqa: E402
from benchmarks.report import BENCHMARKS_FILE, append_entry, markdown_table  # noqa: E402
from lmexp.data.datamodule import TextDataModule  # noqa: E402
from lmexp.data.sources import BUILTIN_SOURCES, read_documents, resolve_files  # noqa: E402

# Stage name -> the cache module attribute whose calls make up that stage.
STAGES = {"read + clean": "clean_documents", "train": "train_tokenizer", "encode + write": "_encode_all"}
HIT_REPEATS = 7


def source_megabytes(source: str) -> float:
    """Size of the files behind a source; for a built-in corpus, its text in UTF-8."""
    if source in BUILTIN_SOURCES:
        return sum(len(doc.text.encode()) for doc in read_documents(source)) / 1e6
    return sum(path.stat().st_size for path in resolve_files(source)) / 1e6


@contextmanager
def timed_stages() -> Iterator[dict[str, float]]:
    """Wrap the cache module's stage functions so each call adds its seconds to the yielded dict."""
    seconds = dict.fromkeys(STAGES, 0.0)
    originals = {stage: getattr(cache_module, name) for stage, name in STAGES.items()}

    def timed(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[stage] += time.perf_counter() - started

        return wrapper

    for stage, fn in originals.items():
        setattr(cache_module, STAGES[stage], timed(stage, fn))
    try:
        yield seconds
    finally:
        for stage, fn in originals.items():
            setattr(cache_module, STAGES[stage], fn)


def cold_build(data: TextDataModule, scratch: Path) -> tuple[dict[str, float], cache_module.TokenCache, Path]:
    """One build into a fresh empty folder under ``scratch``; returns stage seconds, the cache, its folder."""
    root = Path(tempfile.mkdtemp(dir=scratch))
    with timed_stages() as seconds:
        started = time.perf_counter()
        cache = cache_module.build_token_cache(root, data.cache_settings(), log=lambda _: None)
        total = time.perf_counter() - started
    return {**seconds, "other": total - sum(seconds.values()), "total": total}, cache, root


def hit_milliseconds(data: TextDataModule, root: Path) -> float:
    """Median cost of asking again for a cache that exists, as prepare_data/setup do on every run."""
    times = []
    for _ in range(HIT_REPEATS):
        started = time.perf_counter()
        cache_module.build_token_cache(root, data.cache_settings(), log=lambda _: None)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def measure(source: str, kind: str, vocab_size: int, repeats: int, megabytes: float) -> list[str]:
    data = TextDataModule(source=source, tokenizer=kind, vocab_size=vocab_size, task="causal_lm")
    with tempfile.TemporaryDirectory(prefix="lmexp-bench-data-") as scratch:
        runs = [cold_build(data, Path(scratch)) for _ in range(repeats)]
        seconds, cache, root = sorted(runs, key=lambda run: run[0]["total"])[len(runs) // 2]
        hit_ms = hit_milliseconds(data, root)
    tokens = sum(split["tokens"] for split in cache.meta["splits"].values())
    return [
        kind,
        f"{megabytes:.2f}",
        str(cache.meta["vocab_size"]),
        f"{tokens:,}",
        f"{seconds['total']:.2f}",
        *(f"{seconds[stage]:.2f}" for stage in (*STAGES, "other")),
        f"{megabytes / seconds['total']:.2f}",
        f"{megabytes / seconds['encode + write']:.2f}",
        f"{hit_ms:.1f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="python-docs", help="text file, folder, glob or built-in corpus name")
    parser.add_argument("--tokenizers", default="char,bpe,wordpiece", help="comma-separated: char, bpe, wordpiece")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(BENCHMARKS_FILE))
    args = parser.parse_args()
    kinds = [kind.strip() for kind in args.tokenizers.split(",") if kind.strip()]
    unknown = sorted(set(kinds) - {"char", "bpe", "wordpiece"})
    if unknown:
        parser.error(f"--tokenizers has unknown {unknown}: choose from char, bpe, wordpiece")
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be at least 1")

    megabytes = source_megabytes(args.source)
    rows = [measure(args.source, kind, args.vocab_size, args.repeats, megabytes) for kind in kinds]
    append_entry(
        f"Token cache build, {args.source} ({megabytes:.2f} MB)",
        f"python benchmarks/bench_data.py --source {args.source} --tokenizers {','.join(kinds)} "
        f"--vocab-size {args.vocab_size} --repeats {args.repeats}",
        markdown_table(
            [
                "tokenizer", "source MB", "vocab", "tokens", "cold build (s)", "read + clean (s)", "train (s)",
                "encode + write (s)", "other (s)", "build MB/s", "encode MB/s", "cache hit (ms)",
            ],
            rows,
        ),
        Path(args.output),
    )


if __name__ == "__main__":
    main()
