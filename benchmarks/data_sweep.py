"""Token cache build at corpus sizes from 100 MB to gigabytes, beside a Hugging Face ``datasets`` anchor.

Driven by ``python benchmarks/bench_data.py --sweep 100,1000,4000`` (see its docstring). This
module holds the three parts that the per-tokenizer table mode does not need:

- the corpus: unique paragraphs of 3-25 lines drawn with a seeded RNG from a real text file,
  written once at the largest size; a smaller size is a prefix of it cut at a paragraph boundary;
- the measured children: each build runs in a fresh ``python -m benchmarks.data_sweep`` process
  that imports torch first (a training process has it loaded, so its memory counts), and writes
  its result as JSON. ``lmexp`` builds the token cache; ``anchor`` does what nanoGPT's
  ``prepare.py`` does with ``datasets`` (``load_dataset("text", sample_by="paragraph")``,
  ``map(num_proc=N)`` with the same ``tokenizer.json`` into uint16 rows, then one uint16 memmap
  counted, allocated and filled in shards, each shard's ids taken from the flat Arrow column);
- the meter: every 0.1 s the parent sums VmRSS over the child and all of its descendants, so
  worker processes count, and every 0.5 s their PSS (smaps_rollup, dearer to read); ``wait4``
  adds the child's CPU seconds.

Summed RSS counts a page shared by forked workers (``datasets``' workers are forks of a process
with torch loaded) once per worker; PSS divides each shared page among the processes sharing it,
so the summed PSS is the tree's own footprint. Both count the file pages of memory-mapped files
(the ``.bin`` being written, ``datasets``' Arrow files) that are resident.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MB = 1_000_000
SAMPLE_SECONDS = 0.1
PSS_EVERY = 5  # samples: smaps_rollup costs about 1 ms per process with torch loaded
PARAGRAPH_LINES = (3, 25)


# ----------------------------------------------------------------------------- the corpus
@dataclass
class Corpus:
    """One generated file and the byte offsets at which each requested size ends."""

    path: Path
    ends: dict[int, int]  # size in MB -> bytes of the prefix (a paragraph boundary at or past it)
    seconds: float


def generate_corpus(text: Path, sizes_mb: list[int], folder: Path, seed: int = 0) -> Corpus:
    """Write unique paragraphs of random lines of ``text`` until the largest size is reached.

    A file from an earlier run with the same text, seed and largest size is reused (``--keep``).
    """
    import numpy as np

    largest = max(sizes_mb)
    stem = f"corpus-{text.stem}-seed{seed}-{largest}MB"
    path, record = folder / f"{stem}.txt", folder / f"{stem}.json"
    identity = {"text": str(text.resolve()), "text_bytes": text.stat().st_size, "seed": seed, "largest_mb": largest}
    if record.exists() and path.exists():
        saved = json.loads(record.read_text())
        if saved["identity"] == identity and path.stat().st_size == saved["bytes"]:
            ends = {int(size): end for size, end in saved["ends"].items()}
            if all(size in ends for size in sizes_mb):
                return Corpus(path, ends, 0.0)

    started = time.perf_counter()
    lines = [line.rstrip() for line in text.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line.strip()]
    if len(lines) < 100:
        raise SystemExit(f"--text {text} has {len(lines)} non-empty lines: give a real text of a few thousand")
    line_bytes = [len(line.encode()) for line in lines]
    rng = np.random.default_rng(seed)
    targets = sorted({size * MB: size for size in sizes_mb}.items())
    ends: dict[int, int] = {}
    seen: set[int] = set()  # hashes of the paragraphs written: cleaning would drop a repeat
    written = 0
    low, high = PARAGRAPH_LINES
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        while targets:
            counts = rng.integers(low, high + 1, size=20_000).tolist()
            picks = rng.integers(0, len(lines), size=sum(counts)).tolist()
            pieces, at = [], 0
            for count in counts:
                chosen = picks[at : at + count]
                at += count
                paragraph = "\n".join([lines[i] for i in chosen])
                key = hash(paragraph)
                if key in seen:
                    continue
                seen.add(key)
                pieces.append(paragraph)
                written += sum([line_bytes[i] for i in chosen]) + count - 1 + 2
                while targets and written >= targets[0][0]:
                    ends[targets.pop(0)[1]] = written
                if not targets:
                    break
            out.write("\n\n".join(pieces) + "\n\n")
    if path.stat().st_size != written:
        raise AssertionError(f"{path} has {path.stat().st_size} bytes, the generator counted {written}")
    record.write_text(json.dumps({"identity": identity, "bytes": written, "ends": ends}, indent=2))
    return Corpus(path, ends, time.perf_counter() - started)


def prefix_file(corpus: Corpus, size_mb: int, folder: Path) -> Path:
    """The first ``size_mb`` of the corpus as a file of its own (the corpus itself at its full size)."""
    end = corpus.ends[size_mb]
    if end == corpus.path.stat().st_size:
        return corpus.path
    target = folder / f"{corpus.path.stem}-prefix-{size_mb}MB.txt"
    if target.exists() and target.stat().st_size == end:
        return target
    with open(corpus.path, "rb") as src, open(target, "wb") as dst:
        left = end
        while left:
            left -= os.copy_file_range(src.fileno(), dst.fileno(), min(left, 1 << 30))
    return target


# ----------------------------------------------------------------------------- the meter
def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it, from /proc/<pid>/task/<tid>/children."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            tids = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
            except OSError:
                continue
    return found


def memory_kb(pid: int, field: str = "VmRSS", file: str = "status") -> int:
    """One memory figure of one process in kB (VmRSS from status, Pss from smaps_rollup); 0 once it has gone."""
    try:
        with open(f"/proc/{pid}/{file}") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Measured:
    """What the parent saw of one child: its result JSON and what it cost."""

    status: str  # "ok", "timeout", "killed by SIGKILL (out of memory?)", "failed (exit 1)"
    wall: float
    cpu: float
    peak_rss_gb: float
    peak_pss_gb: float
    max_processes: int
    largest_maxrss_gb: float
    result: dict[str, Any] = field(default_factory=dict)
    error_tail: str = ""


def run_measured(kind: str, options: dict[str, Any], folder: Path, timeout: float,
                 env: dict[str, str] | None = None) -> Measured:
    """Run ``python -m benchmarks.data_sweep <kind>`` and sample its process tree until it ends."""
    result_file, log_file = folder / f"{kind}-result.json", folder / f"{kind}-stderr.log"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks.data_sweep", kind, json.dumps({**options, "out": str(result_file)})]
    peak_rss = peak_pss = most = samples = 0
    status = "ok"
    started = time.perf_counter()
    with open(log_file, "w") as log:
        child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            while True:
                pid, wait_status, usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    break
                tree = descendants(child.pid)
                peak_rss = max(peak_rss, sum(memory_kb(p) for p in tree))
                if samples % PSS_EVERY == 0:
                    peak_pss = max(peak_pss, sum(memory_kb(p, "Pss", "smaps_rollup") for p in tree))
                samples += 1
                most = max(most, len(tree))
                if time.perf_counter() - started > timeout:
                    status = "timeout"
                    os.killpg(child.pid, signal.SIGKILL)
                    _, wait_status, usage = os.wait4(child.pid, 0)
                    break
                time.sleep(SAMPLE_SECONDS)
        except BaseException:
            os.killpg(child.pid, signal.SIGKILL)
            os.wait4(child.pid, 0)
            raise
        finally:
            child.returncode = -1  # reaped by wait4 above, not by Popen
        with contextlib.suppress(ProcessLookupError):  # workers left behind by a killed child
            os.killpg(child.pid, signal.SIGKILL)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(wait_status)
    if status == "ok" and code != 0:
        status = "killed by SIGKILL (out of memory?)" if code == -signal.SIGKILL else f"failed (exit {code})"
    result = json.loads(result_file.read_text()) if status == "ok" and result_file.exists() else {}
    tail = "" if status == "ok" else "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
    return Measured(status, wall, usage.ru_utime + usage.ru_stime, peak_rss / 1e6 * 1.024, peak_pss / 1e6 * 1.024,
                    most, usage.ru_maxrss / 1e6 * 1.024, result, tail)


# ----------------------------------------------------------------------------- the children
def child_lmexp(options: dict[str, Any]) -> dict[str, Any]:
    """Build the lmexp token cache for ``options["source"]`` into a fresh cache folder."""
    started = time.perf_counter()
    import torch  # noqa: F401  (a training process has it loaded: its memory is part of the figure)

    # isort: split
    from lmexp.data import datamodule

    imported = time.perf_counter()
    entry = _build_lmexp(datamodule, options)
    built = time.perf_counter()
    manifest = entry / "manifest.json"
    meta = json.loads((manifest if manifest.exists() else entry / "meta.json").read_text())
    shutil.copy(entry / "tokenizer.json", options["tokenizer_out"])
    stages = meta.get("seconds") if isinstance(meta.get("seconds"), dict) else {}
    shards = len(meta.get("shards") or [None])
    # The build starts at most one worker per shard; an entry without shards was built in one process.
    workers = meta.get("workers") or (min(options.get("workers") or len(os.sched_getaffinity(0)), shards)
                                      if manifest.exists() else 1)
    return {
        "import_seconds": imported - started,
        "seconds": built - imported,
        "tokens": sum(split["tokens"] for split in meta["splits"].values()),
        "vocab_size": meta["vocab_size"],
        "workers": f"{workers} ({shards} shards)" if manifest.exists() else str(workers),
        "stages": {name: round(float(value), 2) for name, value in stages.items() if value is not None},
        "format": "manifest" if manifest.exists() else "meta",
    }


def _build_lmexp(datamodule: Any, options: dict[str, Any]) -> Path:
    """The one place that knows the lmexp API: the sharded build where it exists, else the single-folder one."""
    arguments = {"source": options["source"], "tokenizer": options["tokenizer"],
                 "vocab_size": options["vocab_size"], "task": "causal_lm", "cache_dir": options["cache_dir"]}
    data_class = datamodule.TextDataModule

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if hasattr(data_class, "prepare_cache"):
        shard_mb = {"shard_mb": options["shard_mb"]} if options.get("shard_mb") else {}
        data = data_class(**arguments, workers=options.get("workers"), **shard_mb)
        return Path(data.prepare_cache(log=log).entry)
    from lmexp.data.cache import build_token_cache

    data = data_class(**arguments)
    return build_token_cache(Path(options["cache_dir"]), data.cache_settings(), log=log).path


def child_anchor(options: dict[str, Any]) -> dict[str, Any]:
    """nanoGPT's prepare.py with ``datasets``: paragraphs -> map(num_proc) -> one uint16 memmap."""
    started = time.perf_counter()
    import torch  # noqa: F401  (the same baseline as the lmexp child)

    # isort: split
    import datasets
    import numpy as np
    from datasets.packaged_modules.text.text import TextConfig
    from tokenizers import Tokenizer

    imported = time.perf_counter()
    tokenizer = Tokenizer.from_file(options["tokenizer_json"])
    tokenizer.encode_special_tokens = True  # as lmexp encodes: the ids are the same
    sample_by = "paragraph" if "sample_by" in TextConfig.__dataclass_fields__ else "line"
    dataset = datasets.load_dataset("text", data_files={"train": options["source"]}, sample_by=sample_by,
                                    split="train", cache_dir=options["hf_cache"])
    loaded = time.perf_counter()

    def encode(batch: dict[str, list[str]]) -> dict[str, list]:
        encodings = tokenizer.encode_batch([text + "\n\n" for text in batch["text"]], add_special_tokens=False)
        ids = [encoding.ids for encoding in encodings]
        return {"ids": ids, "len": [len(row) for row in ids]}

    ids_type = datasets.List(datasets.Value("uint16")) if hasattr(datasets, "List") else datasets.Sequence(
        datasets.Value("uint16"))
    tokenized = dataset.map(encode, batched=True, num_proc=options["procs"], remove_columns=["text"],
                            features=datasets.Features({"ids": ids_type, "len": datasets.Value("int64")}),
                            desc="tokenizing")
    mapped = time.perf_counter()
    total = int(np.sum(tokenized["len"], dtype=np.uint64))
    out = np.memmap(options["bin"], dtype=np.uint16, mode="w+", shape=(total,))
    # nanoGPT writes 1024 shards; a small corpus gets fewer (about 1M ids or more each).
    shards, at = max(1, min(1024, len(tokenized), total >> 20)), 0
    for index in range(shards):
        # nanoGPT takes the shard with_format("numpy") and concatenates its rows: the same ids, but
        # about 200x slower here (a numpy array per row); the flat Arrow column is what a careful
        # user would write, and the anchor should be the best of the usual way, not its worst.
        column = tokenized.shard(num_shards=shards, index=index, contiguous=True).with_format("arrow")["ids"]
        batch = (column.combine_chunks() if hasattr(column, "combine_chunks") else column).flatten().to_numpy()
        out[at : at + len(batch)] = batch
        at += len(batch)
    out.flush()
    written = time.perf_counter()
    return {
        "import_seconds": imported - started,
        "seconds": written - imported,
        "tokens": total,
        "vocab_size": tokenizer.get_vocab_size(),
        "workers": options["procs"],
        "stages": {"load": round(loaded - imported, 2), "map": round(mapped - loaded, 2),
                   "memmap": round(written - mapped, 2)},
        "sample_by": sample_by,
        "datasets": datasets.__version__,
        "rows": len(dataset),
    }


def child_imports(options: dict[str, Any]) -> dict[str, Any]:
    """Only the imports of a build child: the memory a build starts from."""
    import importlib

    started = time.perf_counter()
    for name in options["modules"]:
        importlib.import_module(name)
    return {"import_seconds": time.perf_counter() - started}


IMPORTS = {"lmexp": ["torch", "lmexp.data.datamodule"], "datasets anchor": ["torch", "datasets", "tokenizers"]}
CHILDREN = {"lmexp": child_lmexp, "anchor": child_anchor, "imports": child_imports}


def child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="one measured build (run by bench_data.py --sweep)")
    parser.add_argument("kind", choices=sorted(CHILDREN))
    parser.add_argument("options", help="JSON object of options")
    args = parser.parse_args(argv)
    options = json.loads(args.options)
    result = CHILDREN[args.kind](options)
    Path(options["out"]).write_text(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------- the sweep
@dataclass
class Row:
    size_mb: int
    source_mb: float
    tokenizer: str
    tool: str
    measured: Measured | None  # None: skipped
    note: str = ""


def sweep(args: argparse.Namespace, log: Any = print) -> list[Row]:
    """Generate the corpus, then per size and tokenizer: the lmexp build, then the anchor on its tokenizer."""
    scratch = Path(args.scratch) if args.scratch else None
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    else:
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix="lmexp-bench-sweep-", dir="/tmp"))
    if scratch.resolve().is_relative_to(ROOT):
        raise SystemExit(f"--scratch {scratch} is inside the repository: choose a folder outside it, e.g. /tmp")
    rows: list[Row] = []
    try:
        for tool, modules in IMPORTS.items():
            baseline = run_measured("imports", {"modules": modules}, scratch, max(args.timeout, 600))
            if baseline.status == "ok":
                args.baselines[tool] = baseline
        corpus = generate_corpus(Path(args.text), args.sweep, scratch, args.seed)
        log(f"corpus {corpus.path} ({corpus.path.stat().st_size / MB:.1f} MB"
            + (f", generated in {corpus.seconds:.1f}s)" if corpus.seconds else ", reused)"))
        for size in sorted(args.sweep):
            source = prefix_file(corpus, size, scratch)
            source_mb = source.stat().st_size / MB
            for kind in args.tokenizers:
                rows.extend(_one_size(args, scratch, source, size, source_mb, kind, log))
            if source != corpus.path and not args.keep:
                source.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            log(f"kept {scratch}")
    return rows


def _one_size(args: argparse.Namespace, scratch: Path, source: Path, size: int, source_mb: float, kind: str,
              log: Any) -> list[Row]:
    work = scratch / f"run-{size}MB-{kind}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    tokenizer_json = work / "tokenizer.json"
    try:
        log(f"{size} MB, {kind}: lmexp ...")
        lmexp = run_measured("lmexp", {
            "source": str(source), "tokenizer": kind, "vocab_size": args.vocab_size,
            "cache_dir": str(work / "cache"), "workers": args.workers, "shard_mb": args.shard_mb,
            "tokenizer_out": str(tokenizer_json),
        }, work, args.timeout)
        log(f"  {lmexp.status}, {lmexp.result.get('seconds', lmexp.wall):.1f}s, "
            f"peak RSS {lmexp.peak_rss_gb:.2f} GB{_tail(lmexp)}")
        rows = [Row(size, source_mb, kind, "lmexp", lmexp)]
        shutil.rmtree(work / "cache", ignore_errors=True)  # only its tokenizer is needed now
        if not tokenizer_json.exists():
            return [*rows, Row(size, source_mb, kind, "datasets anchor", None, "skipped: no tokenizer from lmexp")]
        if size in args.sizes_only_lmexp:
            return [*rows, Row(size, source_mb, kind, "datasets anchor", None, f"skipped at {size} MB (option)")]
        # The anchor's task exactly: encode with a tokenizer that exists (data.tokenizer=PATH), no training.
        log(f"{size} MB, {kind}: lmexp with the trained tokenizer given ...")
        given = run_measured("lmexp", {
            "source": str(source), "tokenizer": str(tokenizer_json), "vocab_size": args.vocab_size,
            "cache_dir": str(work / "cache-given"), "workers": args.workers, "shard_mb": args.shard_mb,
            "tokenizer_out": str(work / "tokenizer-given.json"),
        }, work, args.timeout)
        log(f"  {given.status}, {given.result.get('seconds', given.wall):.1f}s, "
            f"peak RSS {given.peak_rss_gb:.2f} GB{_tail(given)}")
        rows.append(Row(size, source_mb, kind, "lmexp, tokenizer given", given))
        shutil.rmtree(work / "cache-given", ignore_errors=True)
        log(f"{size} MB, {kind}: datasets anchor ...")
        hf = work / "hf"
        anchor = run_measured("anchor", {
            "source": str(source), "tokenizer_json": str(tokenizer_json), "procs": args.procs,
            "hf_cache": str(hf / "datasets"), "bin": str(work / "anchor.bin"),
        }, work, args.timeout, env={
            "HF_HOME": str(hf), "HF_DATASETS_CACHE": str(hf / "datasets"), "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
        })
        log(f"  {anchor.status}, {anchor.result.get('seconds', anchor.wall):.1f}s, "
            f"peak RSS {anchor.peak_rss_gb:.2f} GB{_tail(anchor)}")
        return [*rows, Row(size, source_mb, kind, "datasets anchor", anchor)]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tail(measured: Measured) -> str:
    return f"\n{measured.error_tail}" if measured.error_tail else ""


SWEEP_HEADER = [
    "corpus MB", "tokenizer", "vocab", "tool", "workers / procs", "seconds", "MB/s", "MB/s per core", "CPU s",
    "peak RSS tree (GB)", "peak PSS tree (GB)", "processes", "tokens", "stages (s)",
    "lmexp / anchor MB/s", "lmexp / anchor RSS (PSS)",
]


def baseline_note(baselines: dict[str, Measured]) -> str:
    """What a process that only imports what each tool's child imports takes, for reading the RSS columns."""
    return "; ".join(f"{tool} ({' + '.join(IMPORTS[tool])}) {m.peak_rss_gb:.2f} GB RSS, {m.peak_pss_gb:.2f} GB PSS, "
                     f"{m.result['import_seconds']:.1f} s" for tool, m in baselines.items())


def sweep_table(rows: list[Row], cores: int) -> list[list[str]]:
    """One line per build; the lmexp line carries its ratios to the anchor of the same size and tokenizer."""
    anchors = {(row.size_mb, row.tokenizer): row for row in rows if not row.tool.startswith("lmexp")}
    lines = []
    for row in rows:
        m = row.measured
        if m is None or m.status != "ok":
            status = row.note if m is None else f"{m.status} after {m.wall:.0f}s"
            lines.append([f"{row.source_mb:.0f}", row.tokenizer, "-", row.tool, "-", status,
                          *["-"] * (len(SWEEP_HEADER) - 6)])
            continue
        result = m.result
        rate = row.source_mb / result["seconds"]
        ratios = ["-", "-"]
        anchor = anchors.get((row.size_mb, row.tokenizer))
        if row.tool.startswith("lmexp") and anchor is not None and anchor.measured is not None and anchor.measured.status == "ok":
            anchor_rate = row.source_mb / anchor.measured.result["seconds"]
            other = anchor.measured
            pss = m.peak_pss_gb / max(other.peak_pss_gb, 1e-9)
            ratios = [f"{rate / anchor_rate:.2f}x", f"{m.peak_rss_gb / other.peak_rss_gb:.2f}x ({pss:.2f}x)"]
        stages = ", ".join(f"{name} {value:g}" for name, value in result.get("stages", {}).items()) or "-"
        lines.append([
            f"{row.source_mb:.0f}", row.tokenizer, str(result["vocab_size"]), row.tool, str(result["workers"]),
            f"{result['seconds']:.1f}", f"{rate:.2f}", f"{rate / cores:.2f}", f"{m.cpu:.0f}",
            f"{m.peak_rss_gb:.2f}", f"{m.peak_pss_gb:.2f}", str(m.max_processes),
            f"{result['tokens']:,}", stages, *ratios,
        ])
    return lines


if __name__ == "__main__":
    child_main(sys.argv[1:])
