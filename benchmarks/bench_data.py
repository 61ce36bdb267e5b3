"""Token-cache build cost per tokenizer: where a cold build spends its time, and what a cache hit costs.

    python benchmarks/bench_data.py --source ../shared/data/tinyshakespeare.txt

Each tokenizer builds its cache ``--repeats`` times through the settings ``TextDataModule``
derives, each time into a fresh empty cache folder so every build is cold (the OS file cache
is warm: this measures lmexp, not the disk). The stages are the ones the build records in its
``manifest.json``, so there is no second implementation of the build to drift from it:

- tokenizer: reading the sample and training the tokenizer on it (a given tokenizer: saving it);
- shards: reading, cleaning, encoding and writing every shard, summed over the shards (with
  several workers this exceeds the time they take together);
- other: the rest (planning the shards, starting workers, the manifest, loading the entry).

The row shown is the repeat with the median total. MB/s divide the source size by the whole
build and by the shard stage. A cache hit is the same call again (fingerprint, key, manifest
and tokenizer load), the median of several. Without ``--source`` the built-in offline
``python-docs`` corpus is used. Results are printed and appended to BENCHMARKS.md.
The WordPiece trainer of ``tokenizers`` is not deterministic (its vocabulary can differ from
build to build), so its token count may vary slightly between runs.

    python benchmarks/bench_data.py --sweep 100,1000,4000

``--sweep`` measures corpora too large for a table of stages: sizes in MB of a corpus generated
from a real text (``--text``, unique paragraphs of random lines, seeded) in ``--scratch`` (a
temporary folder, deleted afterwards unless ``--keep``). Per size and tokenizer, the lmexp build
runs in a fresh process that imports torch first, and so does the anchor, Hugging Face
``datasets`` as nanoGPT's ``prepare.py`` uses it with ``--procs`` processes and the tokenizer the
lmexp build trained (the same ids); then lmexp again with that tokenizer given
(``data.tokenizer=PATH``: no training, the anchor's exact task). Each row gives the time, the peak memory of the whole process
tree (workers included), and lmexp's ratios to the anchor; see ``benchmarks/data_sweep.py``.
``datasets`` comes with the ``bench`` extra.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lmexp.data.cache as cache_module  # noqa: E402
from benchmarks import data_sweep  # noqa: E402
from benchmarks.report import BENCHMARKS_FILE, append_entry, markdown_table  # noqa: E402
from lmexp.data.datamodule import TextDataModule  # noqa: E402
from lmexp.data.sources import BUILTIN_SOURCES, read_documents, resolve_files  # noqa: E402

STAGES = ("tokenizer", "shards")  # the keys of the manifest's "seconds"
HIT_REPEATS = 7


def source_megabytes(source: str) -> float:
    """Size of the files behind a source; for a built-in corpus, its text in UTF-8."""
    if source in BUILTIN_SOURCES:
        return sum(len(doc.text.encode()) for doc in read_documents(source)) / 1e6
    return sum(path.stat().st_size for path in resolve_files(source)) / 1e6


def quiet(_: str) -> None:
    """The build's log, unwanted while it is timed."""


def cold_build(data: TextDataModule, scratch: Path) -> tuple[dict[str, float], cache_module.TokenCache, Path]:
    """One build into a fresh empty folder under ``scratch``; returns stage seconds, the cache, its folder."""
    root = Path(tempfile.mkdtemp(dir=scratch))
    started = time.perf_counter()
    cache = cache_module.build_token_cache(root, data.cache_settings(), log=quiet, workers=data.workers)
    total = time.perf_counter() - started
    recorded = cache.meta.get("seconds") or {}
    seconds = {stage: float(recorded.get(stage) or 0.0) for stage in STAGES}
    return {**seconds, "other": total - sum(seconds.values()), "total": total}, cache, root


def hit_milliseconds(data: TextDataModule, root: Path) -> float:
    """Median cost of asking again for a cache that exists, as prepare_data/setup do on every run."""
    times = []
    for _ in range(HIT_REPEATS):
        started = time.perf_counter()
        cache_module.build_token_cache(root, data.cache_settings(), log=quiet)
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
        str(len(cache.meta.get("shards") or [None])),
        f"{seconds['total']:.2f}",
        *(f"{seconds[stage]:.2f}" for stage in (*STAGES, "other")),
        f"{megabytes / seconds['total']:.2f}",
        f"{megabytes / max(seconds['shards'], 1e-9):.2f}",
        f"{hit_ms:.1f}",
    ]


def sizes(text: str) -> list[int]:
    """A comma-separated list of positive whole numbers (MB)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of whole MB, e.g. 100,1000,4000") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} needs sizes of at least 1 MB, e.g. 100,1000,4000")
    return values


DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="python-docs", help="text file, folder, glob or built-in corpus name")
    parser.add_argument("--tokenizers", help="comma-separated: char, bpe, wordpiece (default: all three; "
                        "with --sweep: char,bpe)")
    parser.add_argument("--vocab-size", type=int, help="default 4096; with --sweep 2048")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(BENCHMARKS_FILE))
    sweep = parser.add_argument_group("corpus-size sweep")
    sweep.add_argument("--sweep", type=sizes, help="corpus sizes in MB, e.g. 100,1000,4000")
    sweep.add_argument("--text", default=str(DEFAULT_TEXT), help="the real text the corpus is drawn from")
    sweep.add_argument("--scratch", help="folder for the corpus, caches and anchor files (default: a new one in /tmp)")
    sweep.add_argument("--keep", action="store_true", help="keep --scratch (a later run reuses its corpus)")
    sweep.add_argument("--seed", type=int, default=0, help="seed of the generated corpus")
    sweep.add_argument("--workers", type=int, help="lmexp build workers (default: its own, all cores)")
    sweep.add_argument("--shard-mb", type=int, help="lmexp source MB per cache shard (default: its own, 64)")
    sweep.add_argument("--procs", type=int, default=len(os.sched_getaffinity(0)),
                       help="datasets map(num_proc=...) (default: the cores this process may use)")
    sweep.add_argument("--sizes-only-lmexp", type=sizes, default=[], help="sizes (MB) at which only the lmexp build runs (no anchor, no tokenizer-given row)")
    sweep.add_argument("--timeout", type=float, default=4 * 3600, help="seconds each build may take before it is killed")
    args = parser.parse_args()
    kinds = [kind.strip() for kind in (args.tokenizers or ("char,bpe" if args.sweep else "char,bpe,wordpiece"))
             .split(",") if kind.strip()]
    unknown = sorted(set(kinds) - {"char", "bpe", "wordpiece"})
    if unknown:
        parser.error(f"--tokenizers has unknown {unknown}: choose from char, bpe, wordpiece")
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be at least 1")
    if args.sweep:
        run_sweep(parser, args, kinds)
        return
    vocab_size = args.vocab_size or 4096

    megabytes = source_megabytes(args.source)
    rows = [measure(args.source, kind, vocab_size, args.repeats, megabytes) for kind in kinds]
    append_entry(
        f"Token cache build, {args.source} ({megabytes:.2f} MB)",
        f"python benchmarks/bench_data.py --source {args.source} --tokenizers {','.join(kinds)} "
        f"--vocab-size {vocab_size} --repeats {args.repeats}",
        markdown_table(
            [
                "tokenizer", "source MB", "vocab", "tokens", "shards", "cold build (s)", "tokenizer (s)", "shards (s)",
                "other (s)", "build MB/s", "shards MB/s", "cache hit (ms)",
            ],
            rows,
        ),
        Path(args.output),
    )


def run_sweep(parser: argparse.ArgumentParser, args: argparse.Namespace, kinds: list[str]) -> None:
    """``--sweep``: every size and tokenizer through lmexp and the datasets anchor (benchmarks/data_sweep.py)."""
    if not Path(args.text).is_file():
        parser.error(f"--text {args.text} is not a file: pass a real text file to draw the corpus from")
    if args.procs < 1 or any(value is not None and value < 1 for value in (args.workers, args.shard_mb)):
        parser.error("--procs, --workers and --shard-mb must be at least 1")
    args.tokenizers, args.vocab_size = kinds, args.vocab_size or 2048
    cores = len(os.sched_getaffinity(0))
    args.baselines = {}
    rows = data_sweep.sweep(args)
    text = Path(args.text).name
    append_entry(
        f"Token cache build at {', '.join(f'{size} MB' for size in sorted(args.sweep))} (corpus from {text}), "
        "lmexp and a datasets anchor",
        "python benchmarks/bench_data.py " + shlex.join(sys.argv[1:]),
        markdown_table(data_sweep.SWEEP_HEADER, data_sweep.sweep_table(rows, cores))
        + f"\n\nMB/s per core: MB/s over the {cores} cores this run could use (both tools may use all of them: "
        "tokenizers encodes on several threads). Peak RSS tree: the summed VmRSS of the build process and its "
        "workers, sampled every 0.1 s (a page shared by forked workers counts once per process); PSS: the same "
        "with each shared page divided among its sharers, every 0.5 s (the tree's own footprint); both count the "
        "resident pages of memory-mapped files. "
        f"Imports alone: {data_sweep.baseline_note(args.baselines)}. Seconds start after these imports. "
        "lmexp trains its tokenizer (on a sample of at most 100 MB) and encodes; 'lmexp, tokenizer given' and the "
        "anchor only encode, with the tokenizer lmexp trained: those two rows compare the same work.",
        Path(args.output),
    )


if __name__ == "__main__":
    main()
