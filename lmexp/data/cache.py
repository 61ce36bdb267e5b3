"""Token cache on disk: clean, split, train the tokenizer and encode once; memory-map afterwards.

A cache entry is a folder named by a hash of everything that decides its contents (source
identity, cleaning, split, shard size and tokenizer settings)::

    <key>/plan.json       the shards: which pieces of the source each reads, and the settings
    <key>/tokenizer.json  trained once on a bounded sample of the train split
    <key>/shards/NNNNN/   train.bin, val.bin, test.bin and shard.json of one piece
    <key>/manifest.json   written last, once every shard is there: the entry is complete
    <key>/build.log       progress and outcome of every build step, for runs without a terminal

The build streams: memory stays flat whatever the corpus size. Shards are built by worker
processes on every core, and a subset of them (``part=(k, N)``) by each of several machines
sharing the folder. Each shard appears whole or not at all; every load checks the entry cheaply
(sizes, a sample of the ids, the tokenizer) and ``verify_cache_entry(path, full=True)`` also
compares every file with its checksum. A damaged shard is set aside and rebuilt alone, with a
one-line notice. Entries written by earlier versions (one ``meta.json`` and one file per split)
still load.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lmexp.atomic import TEMPORARY_PREFIX, remove_stale_temporaries, storage_error, write_text
from lmexp.data.cleaning import CleaningReport
from lmexp.data.shards import (
    DOCUMENT_SEPARATOR,
    SPLITS,
    build_shard,
    cleaned_documents,
    file_checksum,
    files_problem,
    first_line,
    new_cleaner,
    read_plan,
    shard_name,
    shard_problem,
    split_of,
    token_dtype,
)
from lmexp.data.sources import MAX_DOCUMENT_BYTES, Piece, plan_source
from lmexp.data.tokenizer import tokenizer_from_json, train_tokenizer
from lmexp.data.tokens import ShardedTokens
from lmexp.errors import DataError, StorageError

__all__ = [
    "DOCUMENT_SEPARATOR", "SPLITS", "CacheDamaged", "PrepareReport", "TokenCache", "build_token_cache",
    "cache_key", "prepare_token_cache", "split_documents", "token_dtype", "verify_cache_entry",
]

CACHE_FORMAT = 2
LEGACY_FORMAT = 1  # one meta.json and one file per split, built in memory
SHARD_SETTINGS = ("split_files", "shard_mb", "tokenizer_sample_mb")  # settings earlier versions did not have
PROGRESS_SECONDS = 10.0  # a progress line this often when no terminal shows a bar
MAX_SHARDS = 4096  # beyond, shards grow: files and memory maps stay bounded
SAMPLE_SHARDS = 64  # a large corpus's tokenizer sample comes from the heads of this many shards
WORKER_COMMAND = [sys.executable, "-m", "lmexp.data.shards"]  # + the entry; shard indices on its stdin


def cache_key(settings: dict[str, Any], cache_format: int = CACHE_FORMAT) -> str:
    reading = {"max_document_bytes": MAX_DOCUMENT_BYTES} if cache_format >= 2 else {}  # where long text is cut
    payload = json.dumps({"format": cache_format, **reading, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def legacy_cache_key(settings: dict[str, Any]) -> str | None:
    """The key an earlier version gave the same corpus, or None where it could not have built it."""
    if settings.get("split_files"):
        return None
    return cache_key({k: v for k, v in settings.items() if k not in SHARD_SETTINGS}, LEGACY_FORMAT)


class CacheDamaged(DataError):
    """A cache entry whose files do not match its metadata; the message says which and how."""


@dataclass
class TokenCache:
    """A built cache entry: the tokenizer, each split's ids memory-mapped over the shards, and stats."""

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

    def shard_folders(self) -> list[tuple[Path, dict[str, Any]]]:
        """(folder, its per-split counts) of every shard; an earlier version's entry is one shard."""
        if "shards" not in self.meta:
            return [(self.path, self.meta["splits"])]
        return [(self.path / "shards" / shard["name"], shard["splits"]) for shard in self.meta["shards"]]

    def tokens(self, split: str) -> np.ndarray | ShardedTokens:
        dtype = np.dtype(self.meta["dtype"])
        parts = [
            np.memmap(folder / f"{split}.bin", dtype=dtype, mode="r", shape=(splits[split]["tokens"],))
            for folder, splits in self.shard_folders() if splits[split]["tokens"] > 0
        ]
        if not parts:
            return np.zeros(0, dtype=dtype)
        return parts[0] if len(parts) == 1 else ShardedTokens(parts)

    def bytes_per_token(self, split: str) -> float:
        stats = self.meta["splits"][split]
        return stats["bytes"] / max(stats["tokens"], 1)


@dataclass
class PrepareReport:
    """What one call of ``prepare_token_cache`` found and did."""

    entry: Path
    built: list[int] = field(default_factory=list)
    present: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)  # shards nobody has built yet (other parts)
    complete: bool = False
    cache: TokenCache | None = field(default=None, repr=False)  # the entry, opened, when complete

    def summary(self) -> str:
        """One line: the entry, and what is left to build."""
        counts = (f"{_shards(len(self.built))} built, {len(self.present)} already present, "
                  f"{len(self.missing)} missing")
        if self.complete:
            return f"token cache {self.entry}: {counts}: complete"
        return (f"token cache {self.entry}: {counts}: {_shards(len(self.missing))} still to build: "
                "run the other --shard parts")


def _shards(count: int) -> str:
    return f"{count} shard{'' if count == 1 else 's'}"


def verify_cache_entry(path: str | os.PathLike, full: bool = False) -> str | None:
    """What is wrong with the cache entry at ``path``, or None when it checks out.

    The cheap check (every load) reads the metadata, compares each file's size with its token
    count, looks at a bounded sample of ids and loads the tokenizer. ``full`` also reads every id
    and compares each file with the checksum recorded at build time.
    """
    return _inspect(Path(path), full)[2]


def _inspect(path: Path, full: bool) -> tuple[dict[str, Any] | None, Tokenizer | None, str | None]:
    """(metadata, tokenizer, problem): the problem is None when the entry checks out."""
    legacy = not (path / "manifest.json").exists() and (path / "meta.json").exists()
    name = "meta.json" if legacy else "manifest.json"
    try:
        meta = json.loads((path / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None, "manifest.json is missing: the build did not finish"
    except (OSError, ValueError) as err:
        return None, None, f"{name} is unreadable: {first_line(err)}"
    problem = _meta_problem(meta, name)
    if problem is not None:
        return None, None, problem
    if legacy:
        problem = files_problem(path, meta, meta["vocab_size"], full)
    else:
        plan = {"tokenizer": meta["checksums"]["tokenizer.json"], "vocab_size": meta["vocab_size"]}
        problem = next(
            (p for shard in meta["shards"] if (p := shard_problem(path / "shards" / shard["name"], plan, full))), None
        )
    if problem is not None:
        return None, None, problem
    try:
        tokenizer = tokenizer_from_json((path / "tokenizer.json").read_text(encoding="utf-8"))
    except Exception as err:  # noqa: BLE001  (tokenizers raises a bare Exception for a malformed file)
        unreadable = f"tokenizer.json is unreadable: {first_line(err)}"
        return None, None, _tokenizer_checksum_problem(path, meta) or unreadable
    if tokenizer.get_vocab_size() != meta["vocab_size"]:
        return None, None, (f"tokenizer.json has {tokenizer.get_vocab_size()} tokens, "
                            f"expected {meta['vocab_size']}")
    if full:
        problem = _tokenizer_checksum_problem(path, meta)
        if problem is not None:
            return None, None, problem
    return meta, tokenizer, None


def _tokenizer_checksum_problem(path: Path, meta: dict[str, Any]) -> str | None:
    recorded = (meta.get("checksums") or {}).get("tokenizer.json")
    if recorded is None:
        return None
    try:
        return None if file_checksum(path / "tokenizer.json") == recorded else "tokenizer.json does not match its checksum"
    except OSError as err:
        return f"tokenizer.json is unreadable: {first_line(err)}"


def _meta_problem(meta: Any, name: str) -> str | None:
    """What the metadata lacks for the entry to be read, or None."""
    if not isinstance(meta, dict):
        return f"{name} holds no metadata object"
    if meta.get("dtype") not in ("uint16", "uint32"):
        return f"{name} has dtype {meta.get('dtype')!r}, expected uint16 or uint32"
    if not isinstance(meta.get("vocab_size"), int):
        return f"{name} has no vocab_size"
    splits = meta.get("splits")
    for split in SPLITS:
        stats = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(stats, dict) or not isinstance(stats.get("tokens"), int) or stats["tokens"] < 0:
            return f"{name} has no token count for the {split} split"
    if name == "manifest.json":
        shards = meta.get("shards")
        if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s for s in shards):
            return "manifest.json has no list of shards"
        if not isinstance((meta.get("checksums") or {}).get("tokenizer.json"), str):
            return "manifest.json has no checksum of tokenizer.json"
    return None


def split_documents(
    documents: list[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Assign documents to splits as the cache does (a keyed hash of each document), in memory."""
    carve = {"val": val_fraction, "test": test_fraction}
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for document in documents:
        splits[split_of(document, seed, carve)].append(document)
    return splits


# ----------------------------------------------------------------------------------- building
class BuildProgress:
    """Documents, MB, MB/s and ETA of a build: a bar in a terminal, a line every
    ``PROGRESS_SECONDS`` otherwise, and always a line in the entry's ``build.log``."""

    def __init__(self, total_bytes: int, log: Callable[[str], None], log_file: Path, workers: int) -> None:
        self.total = max(total_bytes, 1)
        self.log = log
        self.log_file = log_file
        self.workers = workers
        self.done = self.documents = 0
        self.started = self.last = time.monotonic()
        self.bar: Any = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

            self.bar = Progress(TextColumn("tokenizing"), BarColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                                transient=True)
            self.task = self.bar.add_task("tokenizing", total=self.total)
            self.bar.start()

    def advance(self, size: int, documents: int) -> None:
        self.done += size
        self.documents += documents
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            line = self.line()
            append_log(self.log_file, line)
            if self.bar is None:
                self.log(line)

    def line(self) -> str:
        seconds = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / seconds
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = f"{left / 60:.1f} min" if math.isfinite(left) else "unknown"
        return (f"token cache: {self.documents:,} documents, {self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB "
                f"({100 * self.done / self.total:.0f}%), {rate / 1e6:.2f} MB/s on {self.workers} worker(s) "
                f"({rate / 1e6 / self.workers:.2f} MB/s each), ETA {eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def append_log(log_file: Path, line: str) -> None:
    """A line in the entry's build log. Appended, not written atomically: a log that loses its
    last line in a crash loses nothing the build depends on."""
    with contextlib.suppress(OSError), open(log_file, "a", encoding="utf-8") as handle:
        handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_token_cache(
    root: Path,
    settings: dict[str, Any],
    *,
    log: Callable[[str], None] = print,
    tokenizer: Tokenizer | None = None,
    workers: int | None = None,
) -> TokenCache:
    """Return the cache entry for ``settings``, building what is missing of it.

    ``settings`` must hold: source, fingerprint (of the source contents), text_column,
    normalization, min_chars, dedupe, val_fraction, test_fraction, seed, tokenizer, vocab_size,
    special_tokens; and may hold split_files ({split: {"source", "fingerprint"}} for explicit
    val/test files), shard_mb and tokenizer_sample_mb. A given ``tokenizer`` (a pretrained
    model's) encodes the text instead of one trained on it; ``settings["tokenizer"]`` must then
    identify it.
    """
    report = prepare_token_cache(root, settings, log=log, tokenizer=tokenizer, workers=workers)
    return report.cache or TokenCache.load(report.entry)


def prepare_token_cache(
    root: Path,
    settings: dict[str, Any],
    *,
    log: Callable[[str], None] = print,
    tokenizer: Tokenizer | None = None,
    part: tuple[int, int] | None = None,
    workers: int | None = None,
) -> PrepareReport:
    """Build the shards of this entry that ``part`` = (k, N) names (those whose index is k mod N;
    all of them when None) unless they are there already, and the manifest once every shard is."""
    root = Path(root)
    if part is not None and not (part[1] >= 1 and 0 <= part[0] < part[1]):
        raise DataError(f"shard part {part[0]}/{part[1]} is out of range: use k/N with 0 <= k < N")
    legacy = legacy_cache_key(settings)
    if legacy is not None and (root / legacy / "meta.json").exists():
        try:
            cache = TokenCache.load(root / legacy)
        except CacheDamaged:
            pass  # rebuilt below in today's layout
        else:
            log(f"token cache hit: {cache.path} ({cache.meta['splits']['train']['tokens']:,} train tokens, "
                "one file per split as earlier versions wrote it)")
            return PrepareReport(cache.path, complete=True, cache=cache)
    entry = root / cache_key(settings)
    announced = None
    if (entry / "manifest.json").exists():
        try:
            cache = TokenCache.load(entry)
        except CacheDamaged as damage:
            announced = str(damage)
            log(f"token cache entry {entry} is damaged ({damage}): rebuilding")
            (entry / "manifest.json").unlink(missing_ok=True)
        else:
            log(f"token cache hit: {entry} ({cache.meta['splits']['train']['tokens']:,} train tokens)")
            return PrepareReport(entry, present=list(range(len(cache.meta["shards"]))), complete=True, cache=cache)
    started = time.perf_counter()
    try:
        plan, tokenizer = _plan_and_tokenizer(root, entry, settings, tokenizer, log if announced is None else _quiet)
    except OSError as err:
        raise storage_error(err, entry) from None
    count = len(plan["shards"])
    mine = [i for i in range(count) if part is None or i % part[1] == part[0]]
    report = PrepareReport(entry)
    shards = entry / "shards"
    remove_stale_temporaries(shards)
    pending = []
    for index in mine:
        folder = shards / shard_name(index)
        if not folder.exists():
            pending.append(index)
            continue
        problem = shard_problem(folder, plan)
        if problem is None:
            report.present.append(index)
            continue
        if problem != announced:
            log(f"token cache entry {entry} is damaged ({problem}): rebuilding")
        _set_aside(folder)
        pending.append(index)
    used = 0
    if pending:
        used = _build_shards(entry, plan, pending, tokenizer, workers, log)
        report.built = pending
    # Every shard is checked before the manifest vouches for it: another part's may be damaged.
    sound = set(report.built) | set(report.present)
    report.missing = [i for i in range(count) if i not in sound and shard_problem(shards / shard_name(i), plan)]
    if not report.missing:
        _write_manifest(entry, plan, settings, time.perf_counter() - started, used, log)
        report.complete = True
    append_log(entry / "build.log", report.summary())
    return report


def _quiet(_: str) -> None:
    """A log for a step whose news was given already."""


def _plan_and_tokenizer(root: Path, entry: Path, settings: dict[str, Any], given: Tokenizer | None,
                        log: Callable[[str], None]) -> tuple[dict[str, Any], Tokenizer]:
    """The entry's plan and tokenizer: read when there, else made once (under a lock, so that
    machines sharing the folder all encode with the same tokenizer)."""
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root)
    entry.mkdir(exist_ok=True)
    with FileLock(str(entry / ".plan.lock")):
        if (entry / "plan.json").exists() and (entry / "tokenizer.json").exists():
            # A read that fails (a network filesystem's hiccup) raises: only contents that do not
            # check out are damage, which discards every machine's shards.
            try:
                plan = read_plan(entry)
                if plan.get("format") == CACHE_FORMAT and plan.get("tokenizer") == file_checksum(entry / "tokenizer.json"):
                    return plan, tokenizer_from_json((entry / "tokenizer.json").read_text(encoding="utf-8"))
            except ValueError:
                pass
            log(f"token cache entry {entry} is damaged (plan.json or tokenizer.json does not check out): rebuilding")
            for name in ("manifest.json", "plan.json"):
                (entry / name).unlink(missing_ok=True)
            _set_aside(entry / "shards")
        plan = _plan(root, settings)
        append_log(entry / "build.log", f"planned {len(plan['shards'])} shard(s) of {plan['source_bytes'] / 1e6:,.1f} MB")
        started = time.perf_counter()
        tokenizer = given if given is not None else _train_on_sample(plan, settings, log)
        tokenizer.encode_special_tokens = True  # text that spells "[MASK]" is text, not the special id
        write_text(entry / "tokenizer.json", tokenizer.to_str(pretty=True), shared=True)
        plan.update(
            tokenizer=file_checksum(entry / "tokenizer.json"),
            vocab_size=tokenizer.get_vocab_size(),
            dtype=token_dtype(tokenizer.get_vocab_size()).name,
            tokenizer_seconds=round(time.perf_counter() - started, 3),
        )
        write_text(entry / "plan.json", json.dumps(plan, indent=1), shared=True)
        return plan, tokenizer


def _plan(root: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Cut every source into pieces of about ``shard_mb``, then group them into shards: a large
    file gives several, small files share one. Past ``MAX_SHARDS`` shards the size grows, so a
    corpus of any size keeps a bounded number of files and memory maps."""
    split_files = settings.get("split_files") or {}
    sources = [(None, settings["source"])] + [(split, split_files[split]["source"]) for split in ("val", "test")
                                               if split in split_files]
    shard_bytes = max(1, int(float(settings.get("shard_mb") or 16) * 1_000_000))
    while True:
        shards = _group([(split, piece) for split, source in sources
                         for piece in plan_source(source, shard_bytes, exclude=(root,))], shard_bytes)
        if len(shards) <= MAX_SHARDS:
            break
        shard_bytes *= 2
    carve = {split: settings[f"{split}_fraction"] for split in ("val", "test")
             if split not in split_files and settings[f"{split}_fraction"] > 0}
    return {
        "format": CACHE_FORMAT,
        "settings": settings,
        "shard_bytes": shard_bytes,
        "shards": shards,
        "carve": carve,
        "seed": settings["seed"],
        "text_column": settings["text_column"],
        "cleaning": {key: settings[key] for key in ("normalization", "min_chars", "dedupe")},
        "source_bytes": sum(shard["size"] for shard in shards),
    }


def _group(pieces: list[tuple[str | None, Piece]], shard_bytes: int) -> list[dict[str, Any]]:
    """Consecutive pieces of one split, together up to ``shard_bytes``, make a shard."""
    shards: list[dict[str, Any]] = []
    for split, piece in pieces:
        last = shards[-1] if shards else None
        if last is None or last["split"] != split or last["size"] + piece.size > shard_bytes:
            last = {"split": split, "pieces": [], "size": 0}
            shards.append(last)
        last["pieces"].append(piece.to_dict())
        last["size"] += piece.size
    return shards


def _train_on_sample(plan: dict[str, Any], settings: dict[str, Any], log: Callable[[str], None]) -> Tokenizer:
    """Train the tokenizer on at most ``tokenizer_sample_mb`` of train text: a smaller corpus
    whole, a larger one from the head of up to ``SAMPLE_SHARDS`` shards spread over it."""
    budget = int(float(settings.get("tokenizer_sample_mb") or 100) * 1_000_000)
    train = [shard for shard in plan["shards"] if shard["split"] is None]
    total = sum(shard["size"] for shard in train)
    if total > budget and len(train) > SAMPLE_SHARDS:
        train = [train[round(i * (len(train) - 1) / (SAMPLE_SHARDS - 1))] for i in range(SAMPLE_SHARDS)]
    quota = budget / max(len(train), 1) if total > budget else math.inf
    reports: list[CleaningReport] = []
    seen = [0, 0]  # documents, characters

    def sample() -> Iterator[str]:
        for shard in train:
            taken = 0
            cleaner = new_cleaner(plan)
            reports.append(cleaner.report)
            for piece in shard["pieces"]:
                for split, text in cleaned_documents(Piece.from_dict(piece), None, plan, cleaner):
                    if split != "train":
                        continue
                    yield text
                    taken += len(text)
                    seen[0] += 1
                    seen[1] += len(text)
                    if taken >= quota:
                        break
                if taken >= quota:
                    break

    tokenizer = train_tokenizer(sample(), settings["tokenizer"], settings["vocab_size"], settings["special_tokens"])
    report = CleaningReport.total(r.to_dict() for r in reports)
    if seen[0] == 0:
        raise DataError(
            f"data.source {settings['source']!r} is empty after cleaning ({report.documents_in} documents "
            f"in, {report.empty_dropped} empty, {report.too_short_dropped} shorter than "
            f"min_chars={settings['min_chars']}, none in the train split): check the source or lower data.min_chars"
        )
    log(f"tokenizer {settings['tokenizer']} trained on {seen[0]:,} train documents ({seen[1] / 1e6:,.1f} MB of text)")
    return tokenizer


def _build_shards(entry: Path, plan: dict[str, Any], indices: list[int], tokenizer: Tokenizer,
                  workers: int | None, log: Callable[[str], None]) -> int:
    """Build ``indices`` (returns the number of workers that did): in this process for one shard or one worker (the tokenizer's own
    threads then use every core), else in worker processes that each take every n-th shard."""
    workers = max(1, min(workers or default_workers(), len(indices)))
    total = sum(plan["shards"][i]["size"] for i in indices)
    progress = BuildProgress(total, log, entry / "build.log", workers)
    append_log(entry / "build.log", f"building {len(indices)} shard(s) of {total / 1e6:,.1f} MB on {workers} worker(s)")
    try:
        if workers == 1:
            for index in indices:
                build_shard(entry, plan, index, tokenizer, progress.advance)
        else:
            _run_workers(entry, indices, workers, progress)
    except OSError as err:
        # At most one token per byte of text: an upper bound on the space the ids take.
        raise storage_error(err, entry, total * np.dtype(plan["dtype"]).itemsize) from None
    finally:
        progress.close()
    append_log(entry / "build.log", progress.line())
    return workers


def _run_workers(entry: Path, indices: list[int], workers: int, progress: BuildProgress) -> None:
    """Start ``workers`` shard builders (``python -m lmexp.data.shards``), hand each the next
    shard as it finishes the last (so none idles while another has a queue), relay their
    progress, and raise the first failure in this process; a failure stops the others."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    queue = list(indices)
    selector = selectors.DefaultSelector()
    processes: list[subprocess.Popen] = []

    def hand_out(process: subprocess.Popen) -> None:
        assert process.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # a worker that died: its exit status tells
            if queue:
                process.stdin.write(f"{queue.pop(0)}\n")
                process.stdin.flush()
            else:
                process.stdin.close()  # no more shards: the worker ends

    with tempfile.TemporaryFile("w+") as errors:
        failure: BaseException | None = None
        try:
            for _ in range(workers):
                process = subprocess.Popen([*WORKER_COMMAND, str(entry)], env=env,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True)
                processes.append(process)
                selector.register(process.stdout, selectors.EVENT_READ, process)
            # Read the pipes' bytes directly: a buffered readline could keep a second line (a
            # worker's "done") where select no longer sees it, and the worker would wait for ever.
            pending = {process.stdout.fileno(): b"" for process in processes if process.stdout is not None}
            while pending and failure is None:
                for key, _ in selector.select(timeout=1.0):
                    descriptor = key.fileobj.fileno()
                    data = os.read(descriptor, 1 << 16)
                    if not data:
                        selector.unregister(key.fileobj)
                        del pending[descriptor]
                        continue
                    *lines, pending[descriptor] = (pending[descriptor] + data).split(b"\n")
                    for line in lines:
                        failure = _relay(line, key.data, progress, hand_out)
                        if failure is not None:
                            break
                    if failure is not None:
                        break
        except BaseException:
            failure = failure or sys.exc_info()[1]
            raise
        finally:
            for process in processes:
                if failure is not None:
                    process.kill()
                with contextlib.suppress(OSError, ValueError):
                    if process.stdin is not None:
                        process.stdin.close()
                process.wait()
                if process.stdout is not None:
                    process.stdout.close()
        if failure is not None:
            raise failure
        failed = [p for p in processes if p.returncode != 0]
        if failed or queue:
            errors.seek(0)
            lines = [line for line in errors.read().splitlines() if line.strip()]
            status = failed[0].returncode if failed else 0
            raise DataError(f"a token cache worker exited with status {status} "
                            f"({lines[-1] if lines else 'no message'}): run again; the shards built so far are kept")


def _relay(line: bytes, process: subprocess.Popen, progress: BuildProgress,
           hand_out: Callable[[subprocess.Popen], None]) -> BaseException | None:
    """Act on one line from a worker: progress, a request for the next shard, or its failure."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if "error" in message:
        return _worker_error(message)
    progress.advance(int(message.get("bytes", 0)), int(message.get("documents", 0)))
    if "ready" in message or "done" in message:
        hand_out(process)
    return None


def _worker_error(message: dict[str, Any]) -> BaseException:
    """A worker's exception as one of ours, with its one-line message."""
    text = message.get("message", "")
    if message.get("error") == "StorageError":
        return StorageError(text)
    if message.get("error") in ("DataError", "CacheDamaged", "ConfigError"):
        return DataError(text)
    if message.get("error") in ("OSError", "FileNotFoundError", "PermissionError"):
        return OSError(errno.EIO, text)
    return DataError(f"a token cache worker failed ({message.get('error')}: {text})")


def _write_manifest(entry: Path, plan: dict[str, Any], settings: dict[str, Any], seconds: float, workers: int,
                    log: Callable[[str], None]) -> None:
    """Sum the shards into the manifest; writing it marks the entry complete."""
    shards = []
    unknown = 0
    for index in range(len(plan["shards"])):
        record = json.loads((entry / "shards" / shard_name(index) / "shard.json").read_text(encoding="utf-8"))
        shards.append({"name": shard_name(index), "splits": record["splits"], "cleaning": record["cleaning"],
                       "seconds": record.get("seconds")})
        unknown += int(record.get("unknown_characters") or 0)
    splits = {split: {key: sum(s["splits"][split][key] for s in shards) for key in ("documents", "tokens", "bytes")}
              for split in SPLITS}
    cleaning = CleaningReport.total(s["cleaning"] for s in shards)
    if splits["train"]["documents"] == 0:
        raise DataError(
            f"data.source {settings['source']!r} is empty after cleaning ({cleaning.documents_in} documents "
            f"in, {cleaning.empty_dropped} empty, {cleaning.too_short_dropped} shorter than "
            f"min_chars={settings['min_chars']}): check the source or lower data.min_chars"
        )
    log(cleaning.summary())
    if unknown:
        log(f"token cache: {unknown:,} characters were not in the {settings['tokenizer']} tokenizer's alphabet "
            f"(trained on {settings.get('tokenizer_sample_mb') or 100} MB of the text) and became [UNK] or nothing: "
            "raise data.tokenizer_sample_mb to learn them")
    manifest = {
        "format": CACHE_FORMAT,
        "settings": settings,
        "dtype": plan["dtype"],
        "vocab_size": plan["vocab_size"],
        "splits": splits,
        "shards": shards,
        "checksums": {"tokenizer.json": plan["tokenizer"]},
        "cleaning": cleaning.to_dict(),
        "unknown_characters": unknown,
        "seconds": {"tokenizer": plan.get("tokenizer_seconds"),
                    "shards": round(sum(s["seconds"] or 0 for s in shards), 3)},
        "build_seconds": round(seconds, 3),
        "workers": workers,  # of the process that built the last shards (0: none were left to build)
        "source_bytes": plan["source_bytes"],
    }
    write_text(entry / "manifest.json", json.dumps(manifest, indent=1), shared=True)
    total = sum(s["tokens"] for s in splits.values())
    line = (f"token cache built in {seconds:.1f}s: {entry} ({total:,} tokens in {len(shards)} shard(s), "
            f"vocab {plan['vocab_size']}, {plan['dtype']})")
    append_log(entry / "build.log", line)
    log(line)


def _set_aside(path: Path) -> None:
    """Take a damaged folder out of its place in one rename (no reader can open it after), then
    delete it; a kill in between leaves a temporary that the next build removes."""
    aside = path.with_name(f"{TEMPORARY_PREFIX}{os.getpid()}-damaged-{path.name}")
    shutil.rmtree(aside, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):  # another process set it aside first
        os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)
